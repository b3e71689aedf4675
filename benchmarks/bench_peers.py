"""wsi-triage ``tile`` against LazySlide and TIAToolbox on the same slides, alternately, in one run.

The peers live in throw-away virtual environments under ``--venv-dir`` (default
``<tmp>/wsi-peers``), one per peer, made with ``python -m venv`` and ``pip install lazyslide`` /
``pip install tiatoolbox`` on the first run and reused afterwards; they are never project
dependencies and CI never runs this script. Each contender runs as its own subprocess, in the
order A, B, C, D, A, B, C, D ... (``--repeats`` rounds per slide), so a change of machine load
hits every contender alike; the run with the shortest wall time of each is shown.

What each contender does, all at the same tile size and pixel size (``--tile-size`` 224 px at
``--target-mpp`` 0.5 um/px, the defaults of ``wsi-triage tile``):

* ``wsi-triage`` — ``wsi-triage tile SLIDE --out DIR --json --quiet`` from the project venv, fresh
  output each run: overview at ~2 um/px, stain decision, foreground mask with pen/ink and nuclei
  rules, grid plan, reads every kept tile (default reader threads: the CPU count), QC per tile
  (foreground fraction, blur), **JPEG-encodes every tile and writes the zarr v3 tile store**
  (shards, coords, QC arrays, thumbnail, mask, digests) atomically.
* ``wsi-triage --workers 1`` — the same with one reader thread, for a comparison at the peers'
  parallelism (both peers read one tile after another in the code below).
* ``lazyslide`` — its public API in its own venv: ``open_wsi(slide, store=None)`` (no zarr
  written), ``pp.find_tissues`` (defaults), ``pp.tile_tissues(wsi, tile, mpp=target)`` (defaults:
  tiles with >= 70 % tissue), then ``wsi.iter.tile_images("tiles")`` reading **every tile's
  pixels into memory** (an RGB uint8 array each); nothing is encoded or written.
* ``tiatoolbox`` — its public API in its own venv: ``WSIReader.open``, ``tissue_mask()``
  (defaults: Otsu at 1.25x objective power, power inferred from the mpp when absent),
  ``get_patch_extractor("slidingwindow", input_mask=mask, patch_size=tile, stride=tile,
  resolution=target, units="mpp")`` (default ``min_mask_ratio`` 0: any tile touching the mask),
  iterating the extractor, which reads **every patch's pixels into memory**; nothing is encoded
  or written.

So the work is NOT equal: each tool keeps the tiles its own tissue rule keeps (the ``kept``
column), and wsi-triage additionally computes per-tile QC, encodes each tile as JPEG and writes a
verified store, which the peers do not. A ratio above 1 therefore means more tiles per second
while doing more per tile.

Columns: ``kept`` tiles; ``wall s`` = the subprocess from start to exit (interpreter start,
imports, slide open, mask, tiling, reading; what a user waits for); ``tiles/s`` = kept / wall s;
``work t/s`` = kept / the tool's own time from opening the slide to the last tile (wsi-triage's
``seconds`` from ``--json``; the peers' code below times it the same way), which leaves out
interpreter start and imports (TIAToolbox's import alone takes several seconds); ``peak RSS`` =
``ru_maxrss`` of the subprocess from ``os.wait4`` (its largest process, children included, which
is the whole tree when the tool runs in one process, as all four do; it also includes the few MB
of this launcher at the fork); ``x`` columns = wsi-triage's (default workers) tiles/s divided by
the peer's, end to end and work only. Slides: a generated 20,000 x 20,000 px smear at 0.25 um/px
(``wsi-triage synth``, made once and cached under ``--venv-dir``) and the shared Aperio slide
(``../shared/data/slides/CMU-1-Small-Region.svs``); ``--slide`` replaces them. Each slide file is
read once first so no contender pays for the disk. A peer that cannot be installed, imported or
cannot open a slide gets the row ``unavailable: <reason>``; the script still exits 0.

Usage::

    python benchmarks/bench_peers.py [--repeats 2] [--venv-dir /tmp/wsi-peers] [--no-install]
        [--slide PATH ...] [--tools wsi-triage,wsi-triage-1w,lazyslide,tiatoolbox] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Peer", "PEERS", "ensure_peer", "main"]

SHARED = Path(os.environ.get("WSI_TRIAGE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
TOOLS = ("wsi-triage", "wsi-triage-1w", "lazyslide", "tiatoolbox")
MARKER = "bench-peers-install.json"

LAZYSLIDE_CODE = r"""
import json, sys, time
import lazyslide as zs
slide, tile, mpp = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.perf_counter()
wsi = zs.open_wsi(slide, store=None)
zs.pp.find_tissues(wsi)
zs.pp.tile_tissues(wsi, tile, mpp=mpp)
planned = time.perf_counter()
n = touched = 0
for item in wsi.iter.tile_images("tiles"):
    image = item.image
    if image.shape[:2] != (tile, tile):
        raise SystemExit(f"tile of shape {image.shape}, expected {tile} x {tile}")
    touched += int(image[tile // 2, tile // 2, 0])
    n += 1
end = time.perf_counter()
print(json.dumps({"tiles": n, "seconds": end - start, "plan_s": planned - start,
                  "read_s": end - planned, "reader": type(wsi.reader).__name__}))
"""

TIATOOLBOX_CODE = r"""
import json, sys, time
from tiatoolbox.tools.patchextraction import get_patch_extractor
from tiatoolbox.wsicore.wsireader import WSIReader
slide, tile, mpp = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.perf_counter()
reader = WSIReader.open(slide)
mask = reader.tissue_mask()
extractor = get_patch_extractor("slidingwindow", input_img=reader, input_mask=mask,
                                patch_size=(tile, tile), stride=(tile, tile), resolution=mpp, units="mpp")
planned = time.perf_counter()
n = touched = 0
for image in extractor:
    if image.shape[:2] != (tile, tile):
        raise SystemExit(f"patch of shape {image.shape}, expected {tile} x {tile}")
    touched += int(image[tile // 2, tile // 2, 0])
    n += 1
end = time.perf_counter()
print(json.dumps({"tiles": n, "seconds": end - start, "plan_s": planned - start,
                  "read_s": end - planned, "reader": type(reader).__name__}))
"""


@dataclass(frozen=True)
class Peer:
    """A peer library: its pip package, the module that proves it imports, and its benchmark code."""

    name: str
    package: str
    module: str
    code: str


PEERS = {
    "lazyslide": Peer("lazyslide", "lazyslide", "lazyslide", LAZYSLIDE_CODE),
    "tiatoolbox": Peer("tiatoolbox", "tiatoolbox", "tiatoolbox", TIATOOLBOX_CODE),
}


@dataclass(frozen=True)
class PeerEnv:
    """A peer's venv: its python, or why it is unavailable; install figures when known."""

    name: str
    python: str | None
    reason: str | None
    version: str | None = None
    install_s: float | None = None
    size_mb: float | None = None
    reused: bool = False


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _dir_mb(path: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total / 2**20


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _imports(python: Path, module: str) -> tuple[bool, str]:
    if not python.exists():
        return False, f"no venv at {python.parent.parent}"
    proc = subprocess.run([str(python), "-c", f"import importlib.metadata as m, {module}; print(m.version({module!r}))"],
                          capture_output=True, text=True)
    return (proc.returncode == 0, proc.stdout.strip() if proc.returncode == 0 else _last_line(proc.stderr))


def ensure_peer(peer: Peer, venv_dir: Path, install: bool, log=print) -> PeerEnv:
    """Reuse ``venv_dir/<peer>`` when the peer imports there; otherwise make it (``python -m venv``,
    ``pip install <package>``) unless ``install`` is False. Never raises: failures become a reason."""
    venv = venv_dir / peer.name
    python = _venv_python(venv)
    ok, detail = _imports(python, peer.module)
    marker = venv / MARKER
    if ok:
        info = json.loads(marker.read_text()) if marker.exists() else {}
        return PeerEnv(peer.name, str(python), None, detail, info.get("install_s"), info.get("size_mb"), True)
    if not install:
        return PeerEnv(peer.name, None, f"{peer.package} not installed in {venv} ({detail}); run without --no-install")
    log(f"installing {peer.package} into {venv} (pip; a few minutes the first time) ...")
    start = time.perf_counter()
    base = shutil.which("python3", path=str(Path(sys.base_prefix) / "bin")) or sys.executable  # the project venv's base
    try:
        venv_dir.mkdir(parents=True, exist_ok=True)
        steps = ([base, "-m", "venv", "--clear", str(venv)],
                 [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
                 [str(python), "-m", "pip", "install", "--quiet", peer.package])
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode:
                return PeerEnv(peer.name, None, f"`{' '.join(step[-3:])}` failed: {_last_line(proc.stderr)}")
    except OSError as exc:
        return PeerEnv(peer.name, None, f"cannot make {venv}: {exc}")
    seconds = time.perf_counter() - start
    ok, detail = _imports(python, peer.module)
    if not ok:
        return PeerEnv(peer.name, None, f"installed but `import {peer.module}` fails: {detail}")
    size = _dir_mb(venv)
    marker.write_text(json.dumps({"install_s": round(seconds, 1), "size_mb": round(size), "version": detail}))
    return PeerEnv(peer.name, str(python), None, detail, round(seconds, 1), round(size), False)


def measure(cmd: list[str], cwd: str | None = None) -> dict:
    """Run ``cmd``; wall time, exit code, stdout and peak RSS (``os.wait4``: the child's
    ``ru_maxrss`` including the children it reaped)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        return {"rc": proc.returncode, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


def _json_result(stdout: str) -> dict:
    """The tool's JSON result: the last JSON object it printed (wsi-triage prints one indented)."""
    text = stdout.strip()
    start = text.rfind("\n{")
    try:
        return json.loads(text[start + 1:] if start >= 0 else text)
    except ValueError:
        return {}


def run_tool(tool: str, slide: Path, args, envs: dict[str, PeerEnv]) -> dict:
    """One run of one contender on one slide: a row (or an ``unavailable`` reason)."""
    if tool in PEERS:
        env = envs[tool]
        if env.python is None:
            return {"unavailable": env.reason}
        cmd = [env.python, "-c", PEERS[tool].code, str(slide), str(args.tile_size), str(args.target_mpp)]
        result = measure(cmd, cwd=tempfile.gettempdir())
        if result["rc"]:
            return {"unavailable": f"exit {result['rc']} on {slide.name}: {_last_line(result['stderr'])}"}
        parsed = _json_result(result["stdout"])
        tiles, work = parsed.get("tiles"), parsed.get("seconds")
    else:
        cli = Path(sys.executable).with_name("wsi-triage")
        with tempfile.TemporaryDirectory(prefix="bench-peers-") as out:
            cmd = [str(cli), "tile", str(slide), "--out", out, "--tile-size", str(args.tile_size),
                   "--target-mpp", str(args.target_mpp), "--json", "--quiet"]
            if tool == "wsi-triage-1w":
                cmd += ["--workers", "1"]
            result = measure(cmd)
        if result["rc"]:
            return {"unavailable": f"exit {result['rc']} on {slide.name}: {_last_line(result['stderr'])}"}
        parsed = _json_result(result["stdout"])
        tiles, work = parsed.get("tiles"), parsed.get("seconds")
    if not isinstance(tiles, int) or not work:
        return {"unavailable": f"no result printed on {slide.name}: {_last_line(result['stdout'] + result['stderr'])}"}
    return {"tiles": tiles, "wall_s": round(result["wall_s"], 3), "work_s": round(float(work), 3),
            "tiles_per_s": round(tiles / result["wall_s"], 1), "work_tiles_per_s": round(tiles / float(work), 1),
            "peak_rss_mb": round(result["peak_rss_mb"]), **({"reader": parsed["reader"]} if "reader" in parsed else {})}


def synth_smear(cache: Path, size: int, log=print) -> Path:
    """The generated smear, made once with ``wsi-triage synth`` and reused."""
    path = cache / "slides" / f"smear-{size}-seed7.tiff"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"generating a {size} x {size} smear into {path} (once) ...")
        cli = Path(sys.executable).with_name("wsi-triage")
        proc = subprocess.run([str(cli), "synth", str(path), "--size", f"{size}x{size}", "--seed", "7",
                               "--fraction", "0.1", "--quiet"], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"error: {path}: wsi-triage synth failed: {_last_line(proc.stderr)}")
    return path


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def best_rows(runs: list[dict]) -> list[dict]:
    """Per (slide, tool): the run with the shortest wall time, or the first ``unavailable`` reason."""
    best: dict[tuple[str, str], dict] = {}
    for run in runs:
        key = (run["slide"], run["tool"])
        old = best.get(key)
        if old is None or ("unavailable" in old and "unavailable" not in run) or (
                "unavailable" not in run and "unavailable" not in old and run["wall_s"] < old["wall_s"]):
            best[key] = run
    rows = list(best.values())
    for row in rows:
        ref = best.get((row["slide"], "wsi-triage"))
        if row["tool"] in PEERS and "unavailable" not in row and ref and "unavailable" not in ref:
            row["ratio"] = round(ref["tiles_per_s"] / row["tiles_per_s"], 2)
            row["work_ratio"] = round(ref["work_tiles_per_s"] / row["work_tiles_per_s"], 2)
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'tool':14s} {'slide':26s} {'kept':>6s} {'wall s':>7s} {'tiles/s':>8s} {'work t/s':>9s} "
            f"{'peak RSS MB':>11s} {'x (wall)':>9s} {'x (work)':>9s}")
    print(head)
    print("-" * len(head))
    for row in rows:
        if "unavailable" in row:
            print(f"{row['tool']:14s} {row['slide'][:26]:26s} unavailable: {row['unavailable']}")
            continue
        ratio = f"{row['ratio']:9.2f}" if "ratio" in row else f"{'-':>9s}"
        work_ratio = f"{row['work_ratio']:9.2f}" if "work_ratio" in row else f"{'-':>9s}"
        print(f"{row['tool']:14s} {row['slide'][:26]:26s} {row['tiles']:6d} {row['wall_s']:7.2f} "
              f"{row['tiles_per_s']:8.1f} {row['work_tiles_per_s']:9.1f} {row['peak_rss_mb']:11d} "
              f"{ratio} {work_ratio}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds per slide; the fastest of each is shown")
    parser.add_argument("--venv-dir", type=Path, default=Path(tempfile.gettempdir()) / "wsi-peers",
                        help="where the peers' venvs and the generated smear live (never the repo)")
    parser.add_argument("--no-install", action="store_true", help="never run pip: a missing peer is unavailable")
    parser.add_argument("--slide", type=Path, action="append", help="slide to use (repeatable) [default: the "
                        "generated smear and the shared Aperio slide]")
    parser.add_argument("--size", type=int, default=20000, help="side of the generated smear (px)")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--target-mpp", type=float, default=0.5)
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown or not tools:
        parser.error(f"--tools: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(TOOLS)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.tools = tools
    if args.slide:
        for slide in args.slide:
            if not slide.is_file():
                print(f"error: {slide}: no such slide file", file=sys.stderr)
                raise SystemExit(2)
    if args.venv_dir.resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        parser.error(f"--venv-dir {args.venv_dir} is inside the repository; use a cache directory")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    envs = {name: ensure_peer(PEERS[name], args.venv_dir, not args.no_install, log) for name in args.tools if name in PEERS}
    slides = [s.resolve() for s in args.slide] if args.slide else [synth_smear(args.venv_dir, args.size, log), SHARED / "slides" / "CMU-1-Small-Region.svs"]
    for missing in [s for s in slides if not s.is_file()]:
        log(f"skipping {missing}: not present")
    slides = [s for s in slides if s.is_file()]
    host = machine()
    started = datetime.datetime.now(datetime.timezone.utc)
    log(f"{started:%Y-%m-%d %H:%M} UTC, {host['cpu']}, {host['cores']} cores, load {host['load_avg']}; "
        f"{args.tile_size} px tiles at {args.target_mpp} um/px; {args.repeats} rounds of {', '.join(args.tools)}")
    runs = []
    for slide in slides:
        warm_page_cache(slide)
        for round_ in range(args.repeats):
            for tool in args.tools:
                row = {"tool": tool, "slide": slide.name, "round": round_, **run_tool(tool, slide, args, envs)}
                runs.append(row)
                if not args.json:
                    log(f"  {slide.name} round {round_ + 1} {tool}: " + (
                        f"unavailable: {row['unavailable']}" if "unavailable" in row else
                        f"{row['tiles']} tiles, {row['wall_s']:.1f} s, {row['tiles_per_s']:.0f} tiles/s, "
                        f"{row['peak_rss_mb']} MB"))
    rows = best_rows(runs)
    host["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"date": f"{started:%Y-%m-%d %H:%M} UTC", "machine": host, "tile_size": args.tile_size,
              "target_mpp": args.target_mpp, "repeats": args.repeats,
              "peers": {name: asdict(env) for name, env in envs.items()}, "rows": rows, "runs": runs}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print()
    print_table(rows)
    for env in envs.values():
        if env.python:
            print(f"{env.name} {env.version}: venv {env.size_mb or '?'} MB, install "
                  f"{env.install_s if env.install_s is not None else '?'} s{' (reused)' if env.reused else ''}")
    print(f"load average at start {host['load_avg']}, at end {host['load_avg_end']}")


if __name__ == "__main__":
    main()
