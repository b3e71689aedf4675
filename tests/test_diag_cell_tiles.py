"""benchmarks/diag_cell_tiles.py on a handful of real held-out PBC cells and one small synthetic smear:
every step yields a tile per cell, the demo student reads the original crops as distill measured it,
the smear row is the tile `run --tiling cells` scored, and bad input is one error line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "diag_cell_tiles.py"


def _module():
    spec = importlib.util.spec_from_file_location("diag_cell_tiles", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_tally_counts_top1_suspicion_and_lost_cells():
    mod = _module()
    names, susp = ["ig", "monocyte", "background"], ["ig"]
    probs = [np.array([0.9, 0.1, 0.0]), np.array([0.6, 0.4, 0.0]), None, np.array([0.1, 0.8, 0.1])]
    rows = mod.tally(["ig", "monocyte", "monocyte", "monocyte"], probs, names, susp)
    assert rows["ig"] == {"n": 1, "lost": 0, "top1": 1, "suspicious": 1, "top1_rate": 1.0, "suspicious_rate": 1.0}
    mono = rows["monocyte"]
    assert (mono["n"], mono["lost"], mono["top1"], mono["suspicious"]) == (3, 1, 1, 1)
    assert rows["all"]["n"] == 4 and rows["all"]["top1"] == 2


@pytest.mark.slow  # about 40 s on 2 CPUs: sprite banks, one 1024 px smear run
def test_steps_and_smear_row_on_real_cells(shared_data):
    if not (shared_data / "pbc").is_dir():
        pytest.skip(f"{shared_data / 'pbc'} not present")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--n", "1", "--smears", "1", "--smear-size", "1024",
                           "--seed", "7", "--json", "-"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    steps = doc["steps"]
    assert list(steps) == list(_module().STEPS)
    assert steps["pbc"]["all"]["n"] == 8 and steps["pbc"]["all"]["lost"] == 0
    # the original crops, prepared as distill evaluated them: the student is ~94 % top-1 on them
    assert steps["pbc"]["all"]["top1"] >= 6
    for name in ("cutout", "rescale", "jpeg"):  # one cut-out per image (the shipped cells all cut out)
        assert steps[name]["all"]["lost"] <= 1, name
    smear = doc["smear"]
    assert smear["smear"]["all"]["n"] > 0
    # the stored tile, rescored here, gives the run's own answers (the right tile was matched)
    assert smear["rescored"]["all"]["top1"] == smear["smear"]["all"]["top1"]
    assert smear["rescored"]["all"]["suspicious"] == smear["smear"]["all"]["suspicious"]


def test_bad_option_is_one_error_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--n", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_slide_bound_separates_only_when_normal_cells_stay_low():
    mod = _module()
    rng = np.random.default_rng(0)
    planted = {"ig": 0.6 + 0.4 * rng.random(50), "erythroblast": 0.6 + 0.4 * rng.random(50)}
    clean = mod.slide_bound({**planted, "neutrophil": 0.1 * rng.random(100)}, {"neutrophil": 1.0},
                            ("erythroblast", "ig"), 44, 4, n_slides=300)
    assert clean == {"auc": 1.0, "positives_topk_ge_0.5": 1.0, "negatives_topk_ge_0.5": 0.0}
    noisy = mod.slide_bound({**planted, "neutrophil": rng.random(100)}, {"neutrophil": 1.0},
                            ("erythroblast", "ig"), 44, 4, n_slides=300)
    assert noisy["auc"] < 0.75 and noisy["negatives_topk_ge_0.5"] > 0.9


def test_threshold_sweep_finds_the_thresholds_meeting_both_targets_or_none():
    mod = _module()
    rng = np.random.default_rng(0)
    sep = {"ig": rng.uniform(0.7, 1.0, 200), "monocyte": rng.uniform(0.0, 0.3, 200)}
    sw = mod.threshold_sweep(sep, ("ig",), ("monocyte",))
    assert sw["thresholds_meeting_both"] and min(sw["thresholds_meeting_both"]) >= 0.3
    assert max(sw["thresholds_meeting_both"]) <= 0.7
    row = next(r for r in sw["rows"] if r["threshold"] == 0.5)
    assert row["detection"]["ig"] == 1.0 and row["false"]["monocyte"] == 0.0
    # 12 % of the ig cells score low and 8 % of the monocytes high: no threshold meets both
    mixed = {"ig": np.r_[rng.uniform(0.6, 1.0, 88), rng.uniform(0.0, 0.2, 12)],
             "monocyte": np.r_[rng.uniform(0.0, 0.4, 92), rng.uniform(0.8, 1.0, 8)]}
    sw = mod.threshold_sweep(mixed, ("ig",), ("monocyte",))
    assert sw["thresholds_meeting_both"] == []
    assert next(r for r in sw["rows"] if r["threshold"] == 0.5)["min_detection"] == pytest.approx(0.88)
