"""Does the scorer keep the accelerator fed? Scorer tiles/s against the model's bare throughput.

The issue's GPU target: scoring a store runs within 2x of the student's bare batch throughput on
that GPU. In one run this script

1. generates a smear (``wsi_pipeline.synth``) and tiles it at the checkpoint's geometry
   (cached under ``--work``);
2. measures the bare model: every stored tile already decoded and already on the device as one
   uint8 tensor, batches of ``--batch`` through the scorer's own model (normalisation folded in,
   bf16 autocast when the scorer would choose it), synchronised, best of three passes;
3. scores the store with ``score_store`` (threads scheduler, ``--workers`` tasks at a time, each
   reading and decoding its shard from disk), once per worker count, from scratch each time.

Prints tiles/s for each and the ratio bare / scorer (target <= 2 on a GPU). Runs on the CPU too
(``--device cpu``), where the ratio shows the cost of reading and decoding tiles.

    python benchmarks/bench_scorer_feed.py [--device cuda] [--size 24576] [--workers 4,8,16] [--batch 256] [--json FILE|-]

``--json -`` prints the results as JSON on stdout and the progress lines on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from wsi_pipeline.errors import OptionError, WsiTriageError
from wsi_pipeline.script import at_least, run_script


def make_store(work: Path, size: int, info, tile_workers: int) -> Path:
    from wsi_pipeline.pipeline import RunOptions, tiler_config_for
    from wsi_pipeline.synth import SynthConfig, made_with, synthesize, truth_paths
    from wsi_pipeline.tiling import tile_slide

    slide = work / f"feed-smear-{size}.tiff"
    cfg = SynthConfig(width=size, height=size, mpp=0.25, seed=11, fraction=0.25)
    if not (slide.exists() and made_with(truth_paths(slide)[0], cfg)):  # reused only if this renderer drew it
        t = time.perf_counter()
        synthesize(slide, cfg)
        print(f"generated {slide.name} in {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    tiled = tile_slide(slide, work / "stores", tiler_config_for(info, RunOptions()), workers=tile_workers)
    print(f"store: {tiled.n_tiles} tiles of {info.tile_size} px ({'reused' if tiled.reused else 'tiled'} in "
          f"{time.perf_counter() - t:.1f} s, {tiled.n_tiles / max(tiled.seconds, 1e-9):.0f} tiles/s)", flush=True)
    return tiled.path


def bare_throughput(store: Path, info, device: str, precision: str, batch: int) -> float:
    """Model-only tiles/s: decoded tiles resident on the device, batches through the scoring model."""
    import numpy as np
    import torch

    from wsi_contracts import tilestore as tile_store
    from wsi_pipeline.scoring import scoring_model

    group = tile_store.open_store(store)
    n_shards = tile_store.read_store_meta(group).n_shards
    tiles = np.concatenate([tile_store.read_shard(group, i) for i in range(n_shards)])
    scoring = scoring_model(info.path, info.sha256, device)
    model = scoring.pixel_model or scoring.loaded.model
    dev = torch.device(device)
    x_all = torch.from_numpy(tiles).to(dev)
    mean = torch.tensor(info.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=dev).view(1, 3, 1, 1)

    def one_pass() -> None:
        with torch.inference_mode(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                                                     enabled=precision == "bf16"):
            for s in range(0, len(x_all), batch):
                x = x_all[s:s + batch].permute(0, 3, 1, 2).float()
                if scoring.pixel_model is None:
                    x = (x / 255.0 - mean) / std
                torch.softmax(model(x).float(), dim=1)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    one_pass()  # warm-up (kernel selection, allocator)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - t)
    return len(tiles) / best


def scorer_throughput(store: Path, info, device: str, workers: int, batch: int) -> tuple[float, str]:
    import zarr

    from wsi_pipeline.scoring import ScoreConfig, score_store

    group = zarr.open_group(str(store), mode="r+")
    if "scores" in group:
        del group["scores"]
    result = score_store(store, info.path, ScoreConfig(device=device, workers=workers, batch_size=batch))
    return result.n_tiles / result.seconds, result.precision


def worker_counts(text: str) -> list[int]:
    """--workers: comma-separated positive integers."""
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 4,8,16") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: worker counts must be >= 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda or cpu [default: cuda when available]")
    ap.add_argument("--checkpoint", default=None, help="student checkpoint [default: bundled demo]")
    ap.add_argument("--size", type=int, default=24576, help="generated smear side (px at 0.25 um/px)")
    ap.add_argument("--workers", type=worker_counts, default=None,
                    help="comma-separated scorer worker counts [default: CPU count]")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--work", default="/tmp/wsi-feed", help="scratch folder (slide and store are reused)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results here ('-' = stdout)")
    args = ap.parse_args(argv)
    return run_script(lambda: measure(args), args.json)


def measure(args: argparse.Namespace) -> dict:
    """Bare model and scorer throughput on one generated store, printed as measured."""
    at_least("--batch", args.batch)
    import torch

    from wsi_pipeline.scoring import read_checkpoint_info
    from wsi_pipeline.scoring import resolve_device

    device = resolve_device(args.device)
    info = read_checkpoint_info(args.checkpoint)
    if device != "cpu" and not device.startswith("cuda"):
        raise OptionError("--device", f"{device!r}: use cpu or cuda (cuda:N)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("--device", f"{device}: CUDA is not available on this machine (use --device cpu)")
    work = Path(args.work)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsiTriageError(f"{work}: cannot create the folder ({exc.strerror or exc})") from None
    cpus = os.cpu_count() or 1
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "-"
    print(f"device {device} ({gpu}), {cpus} CPUs, torch {torch.__version__}, student depth "
          f"{info.architecture.get('depth')} width {info.architecture.get('embed_dim')} input {info.input_size} px",
          flush=True)
    store = make_store(work, args.size, info, cpus)
    counts = args.workers or [cpus]
    results = {"device": device, "gpu": gpu, "cpus": cpus, "batch": args.batch, "runs": []}
    # a first scoring warms the device (CUDA context, kernels) and the per-process model cache
    _, precision = scorer_throughput(store, info, device, counts[0], args.batch)
    bare = bare_throughput(store, info, device, precision, args.batch)
    results["bare_tiles_per_second"] = bare
    print(f"bare model ({precision}, batch {args.batch}, tiles resident on {device}): {bare:.0f} tiles/s", flush=True)
    for workers in counts:
        rate = scorer_throughput(store, info, device, workers, args.batch)[0]
        results["runs"].append({"workers": workers, "tiles_per_second": rate, "bare_over_scorer": bare / rate})
        print(f"scorer, {workers:3d} workers: {rate:8.0f} tiles/s   bare / scorer = {bare / rate:.2f} "
              f"(target <= 2 on a GPU)", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
