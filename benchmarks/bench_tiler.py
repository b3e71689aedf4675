"""Tiler throughput against the floor: a bare OpenSlide ``read_region`` loop over the same tiles.

For each slide (the real Aperio slide, and a generated sparse smear of at least 40,000 x 40,000
px, a pyramidal JPEG TIFF), in one run and each in its own process so peak RSS is its own:

1. the tiler (plan from the mask, read kept tiles, QC, JPEG-in-zarr shards), fresh output;
2. a bare loop of ``openslide.OpenSlide.read_region`` over exactly the tiles the tiler kept, at
   the level it read them from, with the same number of worker threads.

The slide file is read once first (page cache warm for both), and the two run alternately
``--repeats`` times; the best run of each is shown. Prints tiles/s, the tiler/bare ratio (target
>= 0.7) and peak RSS (target < 1.5 GB on the large slide). ``--baseline DIR`` also runs, in the
same alternation, the tiler of another copy of the package (``DIR/wsi_pipeline``, put first on
PYTHONPATH; e.g. ``git archive REV wsi_pipeline | tar -x -C DIR``) and prints its row beneath,
so a change is measured before/after in one run. Usage::

    python benchmarks/bench_tiler.py [--workers 2] [--size 40960] [--repeats 2] [--cache DIR] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGET_MPP, TILE = 0.5, 224


def peak_rss_mb() -> float:
    """This process image's peak RSS (VmHWM). ru_maxrss would also count the parent it was
    forked from: Linux carries the high-water mark across exec."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tiler(slide: str, out: str, workers: int) -> dict:
    from wsi_pipeline.tiling import TilerConfig, tile_slide

    start = time.perf_counter()
    result = tile_slide(slide, out, TilerConfig(target_mpp=TARGET_MPP, tile_size=TILE, stain="romanowsky"), workers=workers)
    seconds = time.perf_counter() - start
    return {"tiles": result.n_tiles, "grid": result.n_grid, "seconds": seconds,
            "tiles_per_s": result.n_tiles / seconds, "peak_rss_mb": peak_rss_mb(), "store": str(result.path)}


def run_bare(slide: str, store: str, workers: int) -> dict:
    import numpy as np
    import openslide

    from wsi_contracts import tilestore as tile_store
    from wsi_pipeline.slides import open_slide

    coords = np.asarray(tile_store.open_store(store)["coords"][:])
    with open_slide(slide) as ours:
        level = ours.best_level_for_mpp(TARGET_MPP)
    osr = openslide.OpenSlide(slide)

    def read(i: int) -> None:
        x, y = int(coords[i, 0]), int(coords[i, 1])
        osr.read_region((x, y), level, (TILE, TILE))

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(read, range(len(coords)), chunksize=16))
    seconds = time.perf_counter() - start
    return {"tiles": int(len(coords)), "level": level, "seconds": seconds,
            "tiles_per_s": len(coords) / seconds, "peak_rss_mb": peak_rss_mb()}


def in_subprocess(kind: str, *args: str, pythonpath: Path | None = None) -> dict:
    env = None
    if pythonpath is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pythonpath), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm_page_cache(path: Path) -> None:
    """Read the file once so neither contender pays for the disk (the first would, otherwise)."""
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def make_large_smear(cache: Path, size: int) -> Path:
    from wsi_pipeline.synth import SynthConfig, synthesize

    path = cache / f"bench-smear-{size}.tiff"
    if not path.exists():
        print(f"generating {size} x {size} sparse smear (cached in {cache}) ...", flush=True)
        result = synthesize(path, SynthConfig(width=size, height=size, mpp=0.25, seed=7, fraction=0.1))
        print(f"  {result.mpx_per_second:.0f} Mpx/s, {result.bytes / 2**20:.0f} MiB, {result.n_cells} cells", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=40960, help="side of the generated smear (px)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is shown")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi-triage-bench")
    parser.add_argument("--baseline", type=Path, help="also time the tiler of DIR/wsi_pipeline (before/after in one run)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline is not None and not (args.baseline / "wsi_pipeline" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline}: no wsi_pipeline package there")
    if args.child:
        kind, *rest = args.child
        result = run_tiler(rest[0], rest[1], int(rest[2])) if kind == "tiler" else run_bare(rest[0], rest[1], int(rest[2]))
        print(json.dumps(result))
        return

    args.cache.mkdir(parents=True, exist_ok=True)
    slides = [SHARED / "slides" / "CMU-1-Small-Region.svs", make_large_smear(args.cache, args.size)]
    print(f"workers={args.workers}, target {TARGET_MPP} um/px, {TILE} px tiles")
    print(f"{'slide':26s} {'grid':>8s} {'kept':>7s} {'tiler t/s':>10s} {'bare t/s':>9s} {'ratio':>6s} "
          f"{'tiler s':>8s} {'bare s':>7s} {'tiler RSS MB':>13s} {'bare RSS MB':>12s}")
    for slide in slides:
        warm_page_cache(slide)
        tiler = base = bare = None
        best = lambda new, old: new if old is None or new["seconds"] < old["seconds"] else old  # noqa: E731
        for _ in range(args.repeats):  # alternating, best of each: this machine is noisy
            with tempfile.TemporaryDirectory() as out:
                t = in_subprocess("tiler", str(slide), out, str(args.workers))
                b = in_subprocess("bare", str(slide), t["store"], str(args.workers))
            tiler, bare = best(t, tiler), best(b, bare)
            if args.baseline is not None:
                with tempfile.TemporaryDirectory() as out:
                    base = best(in_subprocess("tiler", str(slide), out, str(args.workers), pythonpath=args.baseline), base)
        rows = [(slide.name[:26], tiler)] + ([("  baseline", base)] if base is not None else [])
        for name, run in rows:
            ratio = run["tiles_per_s"] / bare["tiles_per_s"]
            print(f"{name:26s} {run['grid']:8d} {run['tiles']:7d} {run['tiles_per_s']:10.0f} "
                  f"{bare['tiles_per_s']:9.0f} {ratio:6.2f} {run['seconds']:8.1f} {bare['seconds']:7.1f} "
                  f"{run['peak_rss_mb']:13.0f} {bare['peak_rss_mb']:12.0f}", flush=True)


if __name__ == "__main__":
    main()
