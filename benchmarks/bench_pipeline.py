"""End-to-end `run` with the student and with the teacher: seconds per slide, tiles/s, peak RSS.

"e2e s" is one `run` (tile + score + aggregate, model loading included) in a process whose
libraries are already imported, as in a batch; the one-off import time is reported apart.
Slides: the real Aperio slide (../shared/data/slides/CMU-1-Small-Region.svs) and a large generated
smear (wsi_pipeline.synth, made once under --work). Each (slide, model) pair runs in a fresh
process with a fresh output folder, so tiling, scoring and aggregation are all timed and the
peak RSS (VmHWM of that process) belongs to that run alone.

``--placements``: instead, the whole ``wsi-triage run`` command with the student under each tile
placement (grid, cells) on a large generated smear (``--large-size``, default 60000 x 60000 px at
0.25 um/px, made once under --work and reused), each in a fresh process as a user runs it (imports
included): seconds, tiles scored and the peak RSS of the command with its worker processes
(sampled every 0.1 s) side by side. Target on the 2-core CPU for cells: under 5 minutes and 1.5 GB,
fewer tiles than the grid.

``--schedulers N``: instead, the dask scheduler of scoring, threads against processes, side by side
(alternating, each in a fresh ``wsi-triage`` process): one ``batch`` over N small generated smears
(``--small-size``, default 2048 px) and one ``run`` on the --smear-size smear; seconds, tiles/s and the
peak RSS of the command with all its worker processes (sampled every 0.1 s).

Student: the bundled demo checkpoint (or --student). Teacher: --teacher, else the distill
teacher run if it was exported in the checkpoint format, else a teacher-sized ViT (the student's
architecture with the teacher preset's 12 blocks) with random weights, which has the teacher's
cost. Both score one view per tile (a student declaring test-time views is compared through a
copy without them). Target on the 2-core CPU: scoring with the student >= 3.5x faster than with
the teacher.

    python benchmarks/bench_pipeline.py [--smear-size 8192] [--work /tmp/wsi-bench] [--json out.json]
    python benchmarks/bench_pipeline.py --placements [--large-size 60000] [--work /tmp/wsi-bench] [--tilings cells]
    python benchmarks/bench_pipeline.py --schedulers 20 [--small-size 2048] [--smear-size 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER_DEPTH = 12  # distill presets: 12 teacher blocks, 3 student blocks
TEACHER_CANDIDATES = ("runs/pbc/teacher/model.safetensors",)


def child(slide: str, ckpt: str, out: str, scheduler: str, tiling: str | None = None) -> None:
    """One `run` in this process; prints one JSON line."""
    t0 = time.perf_counter()
    import dask.array  # noqa: F401 - libraries are imported once per process (a batch pays this once)
    import matplotlib.figure  # noqa: F401
    import timm.models.vision_transformer  # noqa: F401
    import torch  # noqa: F401

    from wsi_pipeline.pipeline import RunOptions, run_slide
    from wsi_pipeline.scoring import ScoreConfig

    t_import = time.perf_counter() - t0
    run = run_slide(slide, out, RunOptions(checkpoint=ckpt, score=ScoreConfig(scheduler=scheduler), tiling=tiling or None))
    steps = run.steps
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:  # VmHWM: this process image alone (ru_maxrss carries the forking parent's peak across exec)
        with open("/proc/self/status") as fh:
            rss_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    print(json.dumps({
        "n_tiles": run.n_tiles, "n_grid": steps["tile"].get("grid_tiles", 0), "score": run.score, "seconds": run.seconds, "import_seconds": t_import,
        "tile_seconds": steps["tile"]["seconds"], "score_seconds": steps["score"]["seconds"],
        "aggregate_seconds": steps["aggregate"]["seconds"], "precision": steps["score"]["precision"],
        "device": steps["score"]["device"], "peak_rss_mb": rss_kb / 1024,
    }))


def model_throughput(ckpt: Path, n: int = 256, batch: int = 64) -> float:
    """Forward-only tiles/s of a checkpoint's model on random tiles (context for the run figures)."""
    import numpy as np

    from wsi_pipeline.scoring import load_checkpoint
    from wsi_pipeline.scoring import predict_probs

    loaded = load_checkpoint(ckpt)
    tiles = np.random.default_rng(0).integers(0, 255, (n, loaded.info.tile_size, loaded.info.tile_size, 3), np.uint8)
    predict_probs(loaded.model, loaded.info, tiles[:batch], batch_size=batch)
    best = float("inf")
    for _ in range(3):  # best of three: the machine is shared
        t = time.perf_counter()
        predict_probs(loaded.model, loaded.info, tiles, batch_size=batch)
        best = min(best, time.perf_counter() - t)
    return n / best


def teacher_checkpoint(student: Path, work: Path, given: str | None) -> tuple[Path, str]:
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from wsi_contracts.checkpoint import write_checkpoint
    from wsi_pipeline.scoring import read_checkpoint_info

    if given:
        return Path(given), "given"
    info = read_checkpoint_info(student)
    same = ("embed_dim", "img_size", "patch_size")
    for cand in TEACHER_CANDIDATES:
        path = ROOT / cand
        if path.exists():
            try:
                teacher = read_checkpoint_info(path)
            except Exception:  # noqa: BLE001 - not in the checkpoint format: fall through
                continue
            # only the student's own teacher setting is a fair comparison (same width and input)
            if all(teacher.architecture.get(k) == info.architecture.get(k) for k in same):
                return path, "distill teacher run"
    arch = {**info.architecture, "depth": TEACHER_DEPTH}
    torch.manual_seed(0)
    model = VisionTransformer(**{k: v for k, v in arch.items() if k != "family"})
    meta = {**{k: v for k, v in info.metadata.items() if k not in ("ood", "tta")}, "architecture": arch,  # no ood.* tensors here
            "provenance": {"note": "benchmark: teacher-sized ViT with random weights (same cost as the teacher)"}}
    path = work / f"teacher-depth{TEACHER_DEPTH}.safetensors"
    write_checkpoint(path, model.state_dict(), meta)
    return path, f"random teacher-sized ViT (depth {TEACHER_DEPTH})"


def run_child(slide: Path, ckpt: Path, out: Path, scheduler: str, tiling: str = "") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(slide), str(ckpt), str(out), scheduler, tiling],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"child failed for {slide.name} / {ckpt.name}:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_seconds"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=5, metavar=("SLIDE", "CKPT", "OUT", "SCHEDULER", "TILING"), help=argparse.SUPPRESS)
    ap.add_argument("--placements", action="store_true", help="grid vs cells on one large generated smear")
    ap.add_argument("--schedulers", type=int, default=0, metavar="N",
                    help="threads vs processes: a batch of N small smears and a run on the --smear-size smear")
    ap.add_argument("--small-size", type=int, default=2048, help="side in px of each --schedulers batch smear")
    ap.add_argument("--large-size", type=int, default=60000, help="side in px of the --placements smear (0.25 um/px)")
    ap.add_argument("--tilings", default="grid,cells",
                    help="--placements: the placements to run, comma-separated [default: grid,cells]")
    ap.add_argument("--student", default=None, help="student checkpoint [default: bundled demo]")
    ap.add_argument("--teacher", default=None, help="teacher checkpoint [default: see module doc]")
    ap.add_argument("--smear-size", type=int, default=8192, help="generated smear side in px at 0.25 um/px")
    ap.add_argument("--work", default="/tmp/wsi-bench", help="scratch folder (smear and outputs)")
    ap.add_argument("--scheduler", default="threads")
    ap.add_argument("--shared", default=os.environ.get("WSI_TRIAGE_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.placements:
        placements(args)
        return
    if args.schedulers:
        schedulers(args)
        return

    import torch

    from wsi_contracts.checkpoint import TTA_KEY, copy_with_metadata
    from wsi_pipeline.scoring import DEFAULT_CHECKPOINT, read_checkpoint_info

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    student = Path(args.student) if args.student else DEFAULT_CHECKPOINT
    sinfo = read_checkpoint_info(student)
    if sinfo.tta.n_views > 1:  # the models are compared one view each: test-time views re-score a share of
        # the tiles that depends on the weights (a random teacher's would differ), not on the architecture
        student = work / "student-one-view.safetensors"
        copy_with_metadata(sinfo, student, {TTA_KEY: {"views": "none", "floor": 0.0}})
        sinfo = read_checkpoint_info(student)
    teacher, teacher_kind = teacher_checkpoint(student, work, args.teacher)
    tinfo = read_checkpoint_info(teacher)
    if (tinfo.tile_size, tinfo.tile_mpp) != (sinfo.tile_size, sinfo.tile_mpp):
        raise SystemExit("student and teacher must share the tile geometry for a like-for-like run")

    slides = []
    cmu = Path(args.shared) / "slides" / "CMU-1-Small-Region.svs"
    if cmu.exists():
        slides.append(("aperio CMU-1-Small-Region", cmu))
    smear = made_once(work / f"smear-{args.smear_size}.tiff", args.smear_size, seed=0)
    slides.append((f"generated smear {args.smear_size}x{args.smear_size}", smear))

    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, scheduler {args.scheduler}")
    print(f"student: {student.name} depth {sinfo.architecture.get('depth')} width {sinfo.architecture.get('embed_dim')} "
          f"input {sinfo.input_size} px; teacher: {teacher_kind}, depth {tinfo.architecture.get('depth')}")
    fwd = {"student": model_throughput(student), "teacher": model_throughput(teacher)}
    print(f"model forward only (batch 64, tile {sinfo.tile_size} px -> input {sinfo.input_size} px): "
          f"student {fwd['student']:.0f} tiles/s, teacher {fwd['teacher']:.0f} tiles/s "
          f"({fwd['student'] / fwd['teacher']:.2f}x)")

    results = {"forward_tiles_per_second": fwd, "teacher_kind": teacher_kind, "runs": []}
    header = f"{'slide':34} {'model':8} {'tiles':>6} {'e2e s':>7} {'tile s':>7} {'score s':>8} {'agg s':>6} " \
             f"{'e2e t/s':>8} {'score t/s':>9} {'peak RSS MB':>11}"
    print(header)
    for label, slide in slides:
        pair = {}
        for name, ckpt in (("student", student), ("teacher", teacher)):
            r = run_child(slide, ckpt, work / f"out-{name}", args.scheduler)
            pair[name] = r
            results["runs"].append({"slide": label, "model": name, **r})
            print(f"{label:34} {name:8} {r['n_tiles']:6d} {r['seconds']:7.1f} {r['tile_seconds']:7.1f} "
                  f"{r['score_seconds']:8.1f} {r['aggregate_seconds']:6.1f} {r['n_tiles'] / r['seconds']:8.1f} "
                  f"{r['n_tiles'] / r['score_seconds']:9.1f} {r['peak_rss_mb']:11.0f}")
        s, t = pair["student"], pair["teacher"]
        print(f"{'':34} speed-up student vs teacher: scoring {t['score_seconds'] / s['score_seconds']:.2f}x, "
              f"whole run (tile+score+aggregate) {t['seconds'] / s['seconds']:.2f}x; "
              f"library import {s['import_seconds']:.1f} s per process")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def made_once(path: Path, size: int, seed: int) -> Path:
    """The generated smear (``size`` px square at 0.25 um/px, a quarter of the planted cells
    suspicious), made once and reused while this renderer would draw the same pixels
    (``wsi_pipeline.synth.made_with``: a smear drawn by an older renderer is made anew)."""
    from wsi_pipeline.synth import SynthConfig, made_with, synthesize, truth_paths

    cfg = SynthConfig(width=size, height=size, mpp=0.25, seed=seed, fraction=0.25)
    if path.exists() and made_with(truth_paths(path)[0], cfg):
        return path
    t = time.perf_counter()
    synthesize(path, cfg)
    print(f"generated {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s",
          file=sys.stderr)
    return path


def placements(args) -> None:
    """Whole `run` with the student under each placement on one large smear, each in a fresh process."""
    from wsi_pipeline.scoring import DEFAULT_CHECKPOINT

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    student = Path(args.student) if args.student else DEFAULT_CHECKPOINT
    smear = made_once(work / f"smear-large-{args.large_size}.tiff", args.large_size, seed=7)
    print(f"{os.cpu_count()} CPUs, scheduler {args.scheduler}; slide {smear.name} "
          f"({args.large_size} x {args.large_size} px at 0.25 um/px); student {student.name}")
    print(f"{'placement':10} {'tiles':>7} {'grid':>7} {'e2e s':>7} {'tile s':>7} {'score s':>8} {'agg s':>6} "
          f"{'peak RSS MB':>11} {'score':>7}")
    results = []
    tilings = [t.strip() for t in args.tilings.split(",") if t.strip()]
    if not tilings or any(t not in ("grid", "cells") for t in tilings):
        raise SystemExit(f"error: --tilings: expected grid and/or cells, got {args.tilings!r}")
    for tiling in tilings:
        r = run_command(smear, student, work / f"out-{tiling}", args.scheduler, tiling)
        results.append({"tiling": tiling, **r})
        print(f"{tiling:10} {r['n_tiles']:7d} {r.get('n_grid', 0):7d} {r['seconds']:7.1f} {r['tile_seconds']:7.1f} "
              f"{r['score_seconds']:8.1f} {r['aggregate_seconds']:6.1f} {r['peak_rss_mb']:11.0f} "
              f"{(r['score'] or 0):7.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def run_command(slide: Path, ckpt: Path, out: Path, scheduler: str, tiling: str, env: dict | None = None,
                cwd: Path | None = None) -> dict:
    """One ``wsi-triage run`` as a user runs it, in a fresh process (imports included, which also sets
    what lies under the tiling's peak): its figures from ``--json``, the peak RSS of the command with
    its worker processes (``env``/``cwd``: see :func:`measured`)."""
    shutil.rmtree(out, ignore_errors=True)
    seconds, peak, stdout = measured([sys.executable, "-m", "wsi_pipeline", "run", str(slide), "--out", str(out),
                                      "--checkpoint", str(ckpt), "--scheduler", scheduler, "--tiling", tiling,
                                      "--quiet", "--json"], env, cwd)
    run = json.loads(stdout[stdout.find("{"):])
    steps = run["steps"]
    return {"n_tiles": run["n_tiles"], "n_grid": steps["tile"].get("grid_tiles", 0), "score": run["score"],
            "seconds": seconds, "tile_seconds": steps["tile"]["seconds"], "score_seconds": steps["score"]["seconds"],
            "aggregate_seconds": steps["aggregate"]["seconds"], "precision": steps["score"]["precision"],
            "device": steps["score"]["device"], "peak_rss_mb": peak}


def measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB of the process and all its descendants together, stdout) of a command
    (``env``/``cwd``: its environment and folder, default this process's)."""
    import threading

    import psutil

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            peak[0] = max(peak[0], total)
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} failed:\n{err[-3000:]}")
    return time.perf_counter() - t, peak[0] / 2**20, out


def schedulers(args) -> None:
    """Scoring on dask's threads vs processes scheduler: a batch of small slides and one larger slide."""

    work = Path(args.work)
    small = work / f"small-{args.small_size}"
    small.mkdir(parents=True, exist_ok=True)
    for i in range(args.schedulers):
        made_once(small / f"smear{i:02d}.tiff", args.small_size, seed=100 + i)
    smear = made_once(work / f"smear-{args.smear_size}.tiff", args.smear_size, seed=0)
    student = ["--checkpoint", args.student] if args.student else []
    print(f"{os.cpu_count()} CPUs; scoring scheduler threads vs processes (fresh process each, alternating)")
    print(f"{'workload':42} {'scheduler':10} {'tiles':>6} {'seconds':>8} {'tiles/s':>8} {'peak RSS MB':>11}")
    results = []
    workloads = [(f"batch of {args.schedulers} smears {args.small_size}x{args.small_size}",
                  ["batch", str(small)]), (f"run on smear {args.smear_size}x{args.smear_size}", ["run", str(smear)])]
    for label, command in workloads:
        pair = {}
        for scheduler in ("threads", "processes"):
            out = work / f"sched-{scheduler}"
            shutil.rmtree(out, ignore_errors=True)
            secs, peak, stdout = measured([sys.executable, "-m", "wsi_pipeline", *command, "--out", str(out),
                                           "--scheduler", scheduler, "--quiet", "--json", *student])
            doc = json.loads(stdout)
            tiles = sum(r["n_tiles"] or 0 for r in doc["slides"]) if "slides" in doc else doc["n_tiles"]
            pair[scheduler] = (secs, peak)
            results.append({"workload": label, "scheduler": scheduler, "tiles": tiles, "seconds": secs,
                            "peak_rss_mb": peak})
            print(f"{label:42} {scheduler:10} {tiles:6d} {secs:8.1f} {tiles / secs:8.1f} {peak:11.0f}", flush=True)
        (ts, tm), (ps, pm) = pair["threads"], pair["processes"]
        print(f"{'':42} processes / threads: {ps / ts:.2f}x the time, {pm / tm:.2f}x the memory")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
