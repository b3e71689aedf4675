"""Scoring a tile store with a checkpoint (dask), and the out-of-domain distance."""

from __future__ import annotations

from .scorer import (MPP_TOLERANCE, LOCAL_SCHEDULERS, ScoreConfig, ScoreResult, scores_key, check_device,
    resolve_device, ScoringModel, scoring_model, cached_model, clear_model_cache, fold_normalization,
    predict_probs, predict_probs_ood, cpu_has_native_bf16, choose_precision, score_shard,
    check_store_matches, list_scores, read_scores, read_ood, score_store, score_config_dict)
from .model import DEFAULT_CHECKPOINT, LoadedCheckpoint, build_model, check_weights, load_checkpoint, read_checkpoint_info
from .ood import (OOD_KEY, OOD_PREFIX, SLIDE_FRACTION, TENSORS, OodStats, features_and_logits, ood_distance,
    ood_summary, parse_ood_metadata)

__all__ = ['MPP_TOLERANCE', 'LOCAL_SCHEDULERS', 'ScoreConfig', 'ScoreResult', 'scores_key', 'check_device',
    'resolve_device', 'ScoringModel', 'scoring_model', 'cached_model', 'clear_model_cache',
    'fold_normalization', 'predict_probs', 'predict_probs_ood', 'cpu_has_native_bf16', 'choose_precision',
    'score_shard', 'check_store_matches', 'list_scores', 'read_scores', 'read_ood', 'score_store',
    'score_config_dict', 'OOD_KEY', 'OOD_PREFIX', 'SLIDE_FRACTION', 'TENSORS', 'OodStats',
    'features_and_logits', 'ood_distance', 'ood_summary', 'parse_ood_metadata', 'DEFAULT_CHECKPOINT',
    'LoadedCheckpoint', 'build_model', 'check_weights', 'load_checkpoint', 'read_checkpoint_info']
