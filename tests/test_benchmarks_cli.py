"""Every benchmark and example script answers --help, and a user mistake in one line with exit 2.

Each script runs as a user runs it: a fresh interpreter, from a temporary working directory (not
the checkout), with nothing on ``sys.path`` but what the installed package provides. ``--help``
must print the usage and exit 0 before any work starts (``docs/img/make_images.py`` once took
``--help`` for its work folder and rebuilt the README's pictures). The bad-input cases are chosen
to fail before any slide is made, so the whole file stays fast.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py"), *ROOT.glob("docs/img/*.py")])


def run_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_every_script_is_found():
    names = {p.name for p in SCRIPTS}
    assert {"eval_triage.py", "bench_models.py", "demo_triage.py", "make_images.py"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_help(script, tmp_path):
    proc = run_script(script, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.lstrip().startswith("usage:"), proc.stdout
    assert list(tmp_path.iterdir()) == [], "--help must not write anything"


#: script -> (arguments that are a user mistake, text its one error line must hold); ``{tmp}`` is the
#: test's temporary folder, holding ``a-file`` (a file, not a folder) and no ``missing``
BAD_INPUTS = {
    "benchmarks/eval_triage.py": (["--checkpoint", "{tmp}/missing/m.safetensors"], "m.safetensors"),
    "benchmarks/eval_ood.py": (["--checkpoint", "{tmp}/missing/m.safetensors"], "m.safetensors"),
    "benchmarks/eval_foreground.py": (["--shared", "{tmp}/missing"], "{tmp}/missing"),
    "benchmarks/bench_models.py": (["--presets", "huge"], "huge"),
    "benchmarks/bench_scorer_feed.py": (["--batch", "0", "--work", "{tmp}/work"], "--batch"),
    "benchmarks/bench_speed.py": (["--shards", "0", "--work", "{tmp}/work"], "--shards"),
    "benchmarks/bench_viewer.py": (["--work", "{tmp}", "--size", "100"], "--size"),
    "examples/build_tile_set.py": (["--out", "{tmp}/a-file", "--pool", "heldout"], "{tmp}/a-file"),
    "examples/pack_pbc.py": (["--src", "{tmp}/missing", "--out", "{tmp}/pack"], "{tmp}/missing"),
    "docs/img/make_images.py": (["{tmp}/a-file/work", "--out", "{tmp}/img"], "{tmp}/a-file/work"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line(name, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    args, expected = BAD_INPUTS[name]
    proc = run_script(ROOT / name, *(a.format(tmp=tmp_path) for a in args), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected.format(tmp=tmp_path) in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"], "nothing written on bad input"
