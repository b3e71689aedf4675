"""Tile codec choice: store size and read speed of lossless (blosc-zstd) vs JPEG-in-zarr.

Tiles the real Aperio slide (or the slides given) with each codec and prints the
store's bytes per tile, compression ratio and read throughput (all tiles, shard by shard with
``tilestore.read_shard``, the way the scorer reads them; one thread). Usage: python benchmarks/bench_codec.py [SLIDE ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_contracts import tilestore as tile_store
from wsi_pipeline.tiling import TilerConfig, tile_slide

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path / "tiles").rglob("*") if p.is_file())


def read_all(path: Path) -> tuple[float, np.ndarray]:
    group = tile_store.require_complete(path)
    meta = tile_store.read_store_meta(group)
    start = time.perf_counter()
    for i in range(meta.n_shards):
        tile_store.read_shard(group, i)
    seconds = time.perf_counter() - start
    return meta.n_tiles / seconds, np.asarray(group["tiles"][:])


def main(slides: list[Path]) -> None:
    print(f"{'slide':28s} {'codec':10s} {'tiles':>6s} {'KiB/tile':>9s} {'ratio':>6s} {'read tiles/s':>13s} {'PSNR dB':>8s}")
    for slide in slides:
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for codec, quality in (("lossless", 0), ("jpeg", 90), ("jpeg", 95)):
                config = TilerConfig(stain="he", codec=codec, jpeg_quality=quality or 90)
                res = tile_slide(slide, Path(tmp) / f"{codec}{quality}", config)
                rate, tiles = read_all(res.path)
                rate = max(rate, read_all(res.path)[0])  # best of two (warm cache both times)
                results[codec] = tiles
                label = codec if codec == "lossless" else f"jpeg-q{quality}"
                nbytes = store_bytes(res.path)
                raw = tiles.size
                psnr = ""
                if codec == "jpeg":
                    mse = np.mean((tiles.astype(np.float64) - results["lossless"].astype(np.float64)) ** 2)
                    psnr = f"{10 * np.log10(255**2 / mse):.1f}"
                print(f"{slide.name[:28]:28s} {label:10s} {res.n_tiles:6d} {nbytes / res.n_tiles / 1024:9.1f} "
                      f"{raw / nbytes:6.1f} {rate:13.0f} {psnr:>8s}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slides", nargs="*", type=Path, default=[DEFAULT], help=f"slides to tile [default: {DEFAULT.name}]")
    args = parser.parse_args()
    missing = [s for s in args.slides if not s.is_file()]
    if missing:
        print(f"error: {missing[0]}: slide not found", file=sys.stderr)
        raise SystemExit(2)
    main(args.slides)
