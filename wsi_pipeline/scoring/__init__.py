"""Scoring a tile store with a checkpoint (dask), and the out-of-domain distance."""

from __future__ import annotations

from .scorer import (MPP_TOLERANCE, LOCAL_SCHEDULERS, ScoreConfig, ScoreResult, scores_key, check_device,
    resolve_device, ScoringModel, scoring_model, fold_normalization,
    predict_probs, predict_probs_ood, cpu_has_native_bf16, choose_precision, score_shard,
    check_store_matches, ScoreMeta, list_scores, read_scores, read_ood, score_store)
from .model import (DEFAULT_CHECKPOINT, LoadedCheckpoint, build_model, cached_model, check_weights, load_checkpoint,
    read_checkpoint_info)
from .ood import (OOD_KEY, OOD_PREFIX, SLIDE_FRACTION, TENSORS, OodStats, features_and_logits, ood_distance,
    ood_summary, parse_ood_metadata)

__all__ = ['MPP_TOLERANCE', 'LOCAL_SCHEDULERS', 'ScoreConfig', 'ScoreResult', 'scores_key', 'check_device',
    'resolve_device', 'ScoringModel', 'scoring_model', 'cached_model',
    'fold_normalization', 'predict_probs', 'predict_probs_ood', 'cpu_has_native_bf16', 'choose_precision',
    'score_shard', 'check_store_matches', 'ScoreMeta', 'list_scores', 'read_scores', 'read_ood', 'score_store',
    'OOD_KEY', 'OOD_PREFIX', 'SLIDE_FRACTION', 'TENSORS', 'OodStats',
    'features_and_logits', 'ood_distance', 'ood_summary', 'parse_ood_metadata', 'DEFAULT_CHECKPOINT',
    'LoadedCheckpoint', 'build_model', 'check_weights', 'load_checkpoint', 'read_checkpoint_info']
