"""benchmarks/bench_peers.py without network or peers: a peer missing from the venv dir is an
``unavailable`` row (exit 0), wsi-triage's own row is a real measured run, bad arguments are
one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peers.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_missing_peers_are_unavailable_rows_and_wsi_triage_is_measured(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    proc = bench("--no-install", "--venv-dir", str(tmp_path / "venvs"), "--slide", str(slide),
                 "--repeats", "1", "--tools", "wsi-triage,lazyslide,tiatoolbox", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = {row["tool"]: row for row in result["rows"]}
    for peer in ("lazyslide", "tiatoolbox"):
        assert "not installed" in rows[peer]["unavailable"] and str(tmp_path / "venvs" / peer) in rows[peer]["unavailable"]
        assert "ratio" not in rows[peer]
    ours = rows["wsi-triage"]
    assert "unavailable" not in ours, ours
    assert ours["tiles"] > 0 and ours["wall_s"] > ours["work_s"] > 0 and ours["peak_rss_mb"] > 20
    assert not (tmp_path / "venvs" / "lazyslide").exists()  # --no-install never creates a venv


def test_table_prints_the_unavailable_reason(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    proc = bench("--no-install", "--venv-dir", str(tmp_path), "--slide", str(slide), "--repeats", "1",
                 "--tools", "tiatoolbox")
    assert proc.returncode == 0, proc.stderr
    assert any(line.startswith("tiatoolbox") and "unavailable: tiatoolbox not installed" in line
               for line in proc.stdout.splitlines()), proc.stdout


def test_bad_arguments_are_one_line_errors(tmp_path):
    proc = bench("--tools", "wsi-triage,qupath", "--venv-dir", str(tmp_path))
    assert proc.returncode == 2 and "unknown qupath" in proc.stderr
    proc = bench("--slide", str(tmp_path / "missing.svs"), "--venv-dir", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'missing.svs'}: no such slide file"
    proc = bench("--venv-dir", str(SCRIPT.parent / "venvs"))
    assert proc.returncode == 2 and "inside the repository" in proc.stderr
    assert "Traceback" not in proc.stderr
