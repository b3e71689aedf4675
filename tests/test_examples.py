"""The shipped example runs as a user would run it: a fresh process, the bundled student and cells."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_pipeline.scoring import DEFAULT_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]


def test_demo_triage_ranks_the_positive_smear_first(tmp_path):
    if not DEFAULT_CHECKPOINT.exists():
        pytest.skip(f"demo checkpoint not exported yet: {DEFAULT_CHECKPOINT}")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo_triage.py"), "--size", "2048x2048",
                           "--seed", "1", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    pos, neg = sorted(doc["rows"], key=lambda r: r["label"] != "positive")
    assert doc["positive_first"] and pos["rank"] == 1 and neg["rank"] == 2
    assert pos["score"] > neg["score"], (pos["score"], neg["score"])
    assert pos["planted"] > 0 and neg["planted"] == 0
    # twins: the same layout, so the same foreground tiles
    assert pos["tiles"] == neg["tiles"] > 0
    # --out keeps the smears, their ground truth and every triage output
    for r in (pos, neg):
        stem = r["slide"].removesuffix(".tiff")
        assert (out / r["slide"]).is_file() and (out / f"{stem}.truth.json").is_file()
        summary = json.loads((out / "triage" / stem / "summary.json").read_text())
        assert summary["score"]["value"] == pytest.approx(r["score"])
        assert (out / "triage" / stem / "overlay.png").is_file()


def test_demo_triage_reports_a_bad_checkpoint_in_one_line(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo_triage.py"), "--size", "512x512",
                           "--checkpoint", str(bogus)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bogus) in lines[0], proc.stderr
