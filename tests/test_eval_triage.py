"""benchmarks/eval_triage.py's calibration: the Platt fit puts the decision point between the classes,
and --write-calibration publishes a checkpoint that carries it with every tensor unchanged."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_contracts import checkpoint as contract
from wsi_pipeline.aggregation import calibrated, calibration_for
from wsi_pipeline.errors import WsiTriageError
from wsi_pipeline.scoring import read_checkpoint_info

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_triage.py"


def _module():
    spec = importlib.util.spec_from_file_location("eval_triage", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_platt_fit_puts_one_half_between_separated_scores():
    mod = _module()
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0.70, 0.02, 12), rng.normal(0.85, 0.02, 12)
    fit = mod.platt_fit(np.r_[neg, pos], np.r_[np.zeros(12, bool), np.ones(12, bool)])
    entry = {**fit, "method": "topk_mean", "top_k": 3}
    assert fit["slope"] > 0
    assert all(calibrated(s, entry) < 0.5 for s in neg) and all(calibrated(s, entry) >= 0.5 for s in pos)
    middle = -fit["intercept"] / fit["slope"]
    assert neg.max() < middle < pos.min()


def test_write_calibrated_keeps_every_tensor_and_the_pipeline_reads_the_fit(tmp_path):
    mod = _module()
    source = read_checkpoint_info(None)  # the bundled demo student
    table = {"cells": {"slope": 12.5, "intercept": -9.0, "method": "topk_mean", "top_k": 3, "fitted_on": "test"}}
    out = tmp_path / "calibrated.safetensors"
    written = mod.write_calibrated(source, source.sha256, table, out)
    info = read_checkpoint_info(out)
    assert written["sha256"] == info.sha256 != source.sha256
    before, before_ood = contract.read_weights(source)
    after, after_ood = contract.read_weights(info)
    assert before.keys() == after.keys() and before_ood.keys() == after_ood.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and bool((before[name] == after[name]).all()), name
    for name in before_ood:
        assert bool((before_ood[name] == after_ood[name]).all()), name
    entry = calibration_for(info.sha256, info.metadata, "cells", "topk_mean", 3)
    assert entry["slope"] == 12.5 and calibrated(9.0 / 12.5, entry) == pytest.approx(0.5)
    assert calibration_for(info.sha256, info.metadata, "grid", "topk_mean", 3) is None  # only what was fitted
    # every other metadata field is carried over
    assert {k: v for k, v in info.metadata.items() if k != "calibration"} == \
        {k: v for k, v in source.metadata.items() if k != "calibration"}


def test_write_calibrated_refuses_a_checkpoint_that_changed(tmp_path):
    mod = _module()
    source = read_checkpoint_info(None)
    with pytest.raises(WsiTriageError, match="changed during the evaluation"):
        mod.write_calibrated(source, "0" * 64, {}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_validation_pool_is_the_split_the_demo_student_was_validated_on(shared_data):
    """--pool validation: the demo student's own validation images of PBC (the count its provenance
    records, none held out, none it trained on: the training side is the rest of the pool)."""
    pbc = shared_data / "pbc"
    if not pbc.is_dir():
        pytest.skip(f"{pbc} not present")
    mod = _module()
    info = read_checkpoint_info(None)
    val = mod.validation_list(pbc, info)
    recorded = next(d for d in info.metadata["provenance"]["data"] if Path(d["root"]).name == "pbc")
    assert len(val) == recorded["n_val"] == len(set(val))
    held = set(mod.read_cell_list(str(mod.HELDOUT_LIST)))
    pool = set(mod.tuning_list(pbc))
    assert not set(val) & held and set(val) <= pool
    assert len(pool) - len(val) == recorded["n_train"]
    # every class is in it, in about its share of the pool (stratified)
    for cls in {p.split("/")[0] for p in pool}:
        share = sum(p.startswith(cls + "/") for p in val) / sum(p.startswith(cls + "/") for p in pool)
        assert 0.13 < share < 0.17, cls


def test_validation_pool_refuses_a_checkpoint_without_a_recorded_split(shared_data, tmp_path):
    pbc = shared_data / "pbc"
    if not pbc.is_dir():
        pytest.skip(f"{pbc} not present")
    mod = _module()
    source = read_checkpoint_info(None)
    out = tmp_path / "no-provenance.safetensors"
    contract.copy_with_metadata(source, out, {"provenance": {"role": "test"}})
    with pytest.raises(WsiTriageError, match="records no split"):
        mod.validation_list(pbc, read_checkpoint_info(out))


def _slide(mod, label: str, score: float):
    return mod.SlideEval(slide=f"{label}-{score}", label=label, seed=0, status="ok", score=score, n_tiles=1,
                         n_tiles_flagged=0, n_tiles_flagged_clean=0, n_tiles_clean=1, planted=0, detected=0,
                         foreground_missed=0, synth_seconds=0.0, run_seconds=0.0, raw_score=score)


def test_summary_brier_score_is_zero_when_right_and_sure_and_a_quarter_at_one_half():
    mod = _module()
    sure = mod.summarise([_slide(mod, "positive", 1.0), _slide(mod, "negative", 0.0)], 0.5)
    half = mod.summarise([_slide(mod, "positive", 0.5), _slide(mod, "negative", 0.5)], 0.5)
    wrong = mod.summarise([_slide(mod, "positive", 0.2), _slide(mod, "negative", 0.9)], 0.5)
    assert sure["brier"] == 0.0 and half["brier"] == pytest.approx(0.25)
    assert wrong["brier"] == pytest.approx((0.8 ** 2 + 0.9 ** 2) / 2)


def test_best_split_is_the_threshold_any_calibration_could_reach():
    mod = _module()
    pos, neg = np.array([0.9, 0.8, 0.6, 0.3]), np.array([0.1, 0.2, 0.5, 0.7])
    best = mod.best_split(pos, neg)
    # at 0.6: positives 3/4 >= t, negatives 3/4 < t; no threshold puts more of both on their side
    assert best == {"threshold": 0.6, "positives_at_or_above": 0.75, "negatives_below": 0.75}
    assert mod.best_split(np.array([0.9, 0.8]), np.array([0.1, 0.2]))["positives_at_or_above"] == 1.0
    assert mod.best_split(np.array([]), neg) is None
