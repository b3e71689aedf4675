"""User mistakes end in one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest



def wsi_triage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsi_pipeline", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.svs"
    assert_one_line_error(wsi_triage("info", str(missing)), str(missing), "no such file")
    assert_one_line_error(wsi_triage("tile", str(missing), "--out", str(tmp_path)), str(missing))


def test_broken_slide(shared_data, tmp_path):
    broken = shared_data / "slides" / "broken.svs"
    assert_one_line_error(wsi_triage("info", str(broken)), str(broken))
    assert_one_line_error(wsi_triage("tile", str(broken), "--out", str(tmp_path)), str(broken))


def test_unknown_mpp_names_the_option(shared_data, tmp_path):
    slide = shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
    proc = wsi_triage("tile", str(slide), "--out", str(tmp_path), "--quiet")
    assert_one_line_error(proc, str(slide), "--mpp")
    assert not list(tmp_path.glob("*.zarr"))


def test_unwritable_output(shared_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = wsi_triage("tile", str(shared_data / "slides" / "CMU-1-Small-Region.svs"), "--out", str(blocker / "out"))
    assert_one_line_error(proc, str(blocker / "out"), "cannot write")


def test_info_json_and_tile_json(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    info = json.loads(wsi_triage("info", str(slide), "--json").stdout)
    assert info["backend"] == "openslide" and info["mpp"]["source"] == "metadata"
    proc = wsi_triage("tile", str(slide), "--out", str(tmp_path), "--stain", "he", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["tiles"] > 0 and Path(result["store"]).is_dir() and not result["reused"]
    again = json.loads(wsi_triage("tile", str(slide), "--out", str(tmp_path), "--stain", "he", "--json").stdout)
    assert again["reused"] and again["tiles"] == result["tiles"]


def test_blank_slide_warns_and_writes_empty_store(tmp_path):
    import numpy as np
    import tifffile

    path = tmp_path / "blank.tiff"
    tifffile.imwrite(path, np.full((600, 600, 3), 240, np.uint8), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    proc = wsi_triage("tile", str(path), "--out", str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 0
    assert "warning:" in proc.stderr and "empty store" in proc.stderr
    assert (tmp_path / "out" / "blank.zarr" / "zarr.json").is_file()


@pytest.mark.parametrize("args, line", [
    (["run", "{tmp}/none.svs", "--top-k", "0"], "error: --top-k must be >= 1, got 0"),
    (["run", "{tmp}/none.svs", "--gallery", "-1"], "error: --gallery must be >= 0, got -1"),
    (["run", "{tmp}/none.svs", "--workers", "0"], "error: --workers must be at least 1, got 0"),
    (["score", "{tmp}/none.zarr", "--score-workers", "0"], "error: --score-workers must be at least 1, got 0"),
    (["score", "{tmp}/none.zarr", "--batch-size", "0"], "error: --batch-size must be positive, got 0"),
    (["score", "{tmp}/none.zarr", "--scheduler", "gpu-farm"], "error: --scheduler must be threads, processes, sync"),
    (["aggregate", "{tmp}/none.zarr", "--quantile", "2"], "error: --quantile must be in [0, 1], got 2.0"),
    (["batch", "{tmp}", "--slide-timeout", "0"], "error: --slide-timeout must be a positive number of seconds"),
    (["synth", "{tmp}/s.tiff", "--size", "100x4000"], "error: --size must be between 256 and"),
    (["synth", "{tmp}/s.tiff", "--size", "12x"], "error: --size '12x': expected WIDTHxHEIGHT"),
    (["synth", "{tmp}/s.tiff", "--fraction", "2"], "error: --fraction must be between 0 and 1, got 2.0"),
], ids=["top-k", "gallery", "workers", "score-workers", "batch-size", "scheduler", "quantile", "slide-timeout",
        "size", "size-text", "fraction"])
def test_parameter_errors_name_the_flag(tmp_path, args, line):
    """The library names its parameter (top_k); the CLI shows the flag that set it (--top-k)."""
    (tmp_path / "a.tiff").write_bytes(b"not a slide")  # batch finds a slide before it checks the options
    proc = wsi_triage(*[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(proc)
    assert proc.stderr.strip().startswith(line), proc.stderr
    assert not (tmp_path / "none").exists() and not (tmp_path / "s.tiff").exists()  # refused before any work
