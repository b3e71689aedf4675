"""Tile shard I/O: a hand-written JPEG shard writer/reader against zarr's own codec pipeline.

``wsi_contracts.tilestore`` used to write (and read) JPEG tile shards itself: each writer thread
encoded its shard's tiles and wrote the shard file (zarr v3 sharding layout) in one atomic rename,
and reads decoded the checked bytes directly. That path lives on here only as the contender; the
store now uses zarr's public API (``array[shard] = tiles`` through zarr's sharding codec and the
registered ``wsi_triage.jpeg`` codec, then the shard file read back for its recorded digest;
``read_shard`` checks the file and lets zarr decode). The issue rule: keep a hand-written path
only if it is >= 1.3x faster; the last line prints the verdict for writing.

Both paths run in ONE process on the same real tiles (the Aperio slide tiled losslessly, repeated
to ``--tiles``), in fresh stores made by ``create_store`` (identical array layout), with the
writer threads the tiler uses, alternately, best of ``--repeats``; both must store the same
tiles. Besides wall-clock tiles/s it prints the process CPU time per tile, which a busy shared
machine distorts less. With ``--tiler SLIDE`` it also tiles that slide end to end (``tile_slide``,
fresh store each time) with each writer in turn (the hand-written one swapped in for
``tilestore.write_shard``), alternately, best of ``--repeats``: what the choice costs the tiler.

Usage: python benchmarks/bench_store_io.py [SLIDE] [--tiles 1024] [--threads N] [--repeats 3] [--tiler SLIDE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import google_crc32c
import numpy as np
import zarr

from wsi_contracts import tilestore as tile_store
from wsi_contracts.codecs import JpegTileCodec
from wsi_pipeline.tiling import TilerConfig, shard_size_for, tile_slide

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
KEEP_RATIO = 1.3


def real_tiles(slide: Path, n: int, tmp: Path) -> np.ndarray:
    """``n`` tiles of the slide (lossless, 224 px at 0.5 um/px), cycled when the slide has fewer."""
    result = tile_slide(slide, tmp / "source", TilerConfig(stain="he", codec="lossless"))
    group = tile_store.require_complete(result.path)
    tiles = tile_store.read_tiles(group, np.arange(tile_store.read_store_meta(group).n_tiles))
    if not len(tiles):
        raise SystemExit(f"error: {slide}: no tile kept")
    return tiles[np.arange(n) % len(tiles)]


def fresh_store(path: Path, tiles: np.ndarray) -> zarr.Group:
    n = len(tiles)
    if path.exists():
        shutil.rmtree(path)
    return tile_store.create_store(
        path, coords=np.arange(1, 4 * n + 1).reshape(n, 4), grid=np.arange(1, 2 * n + 1).reshape(n, 2),
        foreground=np.ones(n), thumbnail=np.full((64, 64, 3), 200, np.uint8), mask=np.ones((64, 64), bool),
        thumbnail_downsample=16.0, thumbnail_mpp=8.0, tile_size=tiles.shape[1],
        tiles_per_shard=shard_size_for(n, TilerConfig().max_tiles_per_shard), codec="jpeg", jpeg_quality=90, meta={})


_EMPTY = np.uint64(2**64 - 1)


def handwritten_write_shard(group: zarr.Group, index: int, tiles: np.ndarray, blur: np.ndarray) -> None:
    """The store's former direct path: encode in the calling thread, write the whole shard file (chunk
    bytes, the (offset, nbytes) index, its CRC32C) by one atomic rename, digest computed on the way."""
    meta = tile_store.read_store_meta(group)
    sl = tile_store.shard_slice(index, meta.n_tiles, meta.tiles_per_shard)
    codec = group["tiles"].metadata.codecs[0].codecs[0]  # the store's JpegTileCodec (quality as created)
    assert isinstance(codec, JpegTileCodec)
    parts = [codec.encode_tile(t) for t in tiles]
    table = np.full((meta.tiles_per_shard, 2), _EMPTY, dtype="<u8")
    sizes = np.array([len(p) for p in parts], dtype=np.uint64)
    table[: len(parts), 1] = sizes
    table[: len(parts), 0] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint64)
    index_bytes = table.tobytes()
    crc = np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes()
    path = tile_store.shard_file(group, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    body = b"".join(parts)
    with open(tmp, "wb") as fh:
        fh.write(body)
        fh.write(index_bytes)
        fh.write(crc)
    os.replace(tmp, path)
    digest = google_crc32c.extend(google_crc32c.extend(google_crc32c.value(body), index_bytes), crc)
    group["qc/blur"][sl] = blur
    group["shard_digest"][index] = np.asarray((digest, len(body) + len(index_bytes) + len(crc)), dtype=np.int64)
    group["shard_done"][index] = True


def handwritten_read(group: zarr.Group, index: int) -> np.ndarray:
    """The same checks as ``read_shard`` (file present, digest, index CRC, every tile), then each tile's
    JPEG decoded from the checked bytes in the calling thread."""
    problem = tile_store.shard_problem(group, index)
    if problem:
        raise SystemExit(f"error: {problem}")
    meta = tile_store.read_store_meta(group)
    sl = tile_store.shard_slice(index, meta.n_tiles, meta.tiles_per_shard)
    data = memoryview(tile_store.shard_file(group, index).read_bytes())
    size = meta.tiles_per_shard * 16
    table = np.frombuffer(data[len(data) - size - 4: len(data) - 4], dtype="<u8").reshape(-1, 2)
    return np.stack([JpegTileCodec.decode_tile(data[int(o): int(o + b)]) for o, b in table[: sl.stop - sl.start]])


def write_all(group: zarr.Group, tiles: np.ndarray, threads: int, writer) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) to write every shard."""
    meta = tile_store.read_store_meta(group)
    blur = np.zeros(len(tiles), np.float32)

    def one(index: int) -> None:
        sl = tile_store.shard_slice(index, meta.n_tiles, meta.tiles_per_shard)
        writer(group, index, tiles[sl], blur[sl])

    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(meta.n_shards)))
    return time.perf_counter() - start, time.process_time() - cpu


def read_all(group: zarr.Group, threads: int, reader) -> tuple[float, float, np.ndarray]:
    """(wall seconds, process CPU seconds, tiles) to read every shard."""
    n_shards = tile_store.read_store_meta(group).n_shards
    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(lambda i: reader(group, i), range(n_shards)))
    return time.perf_counter() - start, time.process_time() - cpu, np.concatenate(parts)


def tiler_run(slide: Path, out: Path, threads: int, writer) -> tuple[int, float]:
    """(tiles, seconds) of tiling ``slide`` afresh with ``writer`` as the store's shard writer."""
    from wsi_pipeline.tiling import tile_slide

    shutil.rmtree(out, ignore_errors=True)
    original = tile_store.write_shard
    tile_store.write_shard = writer  # the tiler calls tilestore.write_shard for every shard
    try:
        start = time.perf_counter()
        result = tile_slide(slide, out, TilerConfig(stain="romanowsky"), workers=threads)
        return result.n_tiles, time.perf_counter() - start
    finally:
        tile_store.write_shard = original


def compare_tiler(slide: Path, tmp: Path, threads: int, repeats: int) -> None:
    best = {"direct": np.inf, "zarr": np.inf}
    n = 0
    for _ in range(repeats):
        for name, writer in (("direct", handwritten_write_shard), ("zarr", tile_store.write_shard)):
            n, seconds = tiler_run(slide, tmp / f"tiler-{name}", threads, writer)
            best[name] = min(best[name], seconds)
    d, z = n / best["direct"], n / best["zarr"]
    print(f"tile_slide {slide.name} ({n} tiles, {threads} workers, best of {repeats}): hand-written writer "
          f"{d:.0f} tiles/s, zarr {z:.0f} tiles/s, {d / z:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slide", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--tiles", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="writer/reader threads (the tiler uses one per CPU) [default: CPU count]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiler", type=Path, help="also tile this slide end to end with each writer")
    args = parser.parse_args(argv)
    for slide in (args.slide, args.tiler):
        if slide is not None and not slide.is_file():
            print(f"error: {slide}: slide not found", file=sys.stderr)
            raise SystemExit(2)
    print(f"zarr {zarr.__version__}, imagecodecs {version('imagecodecs')}, google-crc32c {version('google-crc32c')}, "
          f"numpy {np.__version__}; {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tiles = real_tiles(args.slide, args.tiles, tmp)
        per_shard = shard_size_for(len(tiles), TilerConfig().max_tiles_per_shard)
        print(f"{len(tiles)} real {tiles.shape[1]}-px tiles of {args.slide.name}, JPEG q90 4:4:4, "
              f"{per_shard} tiles per shard, best of {args.repeats}")
        print(f"{'':18s} {'tiles/s (wall, best)':^34s} {'CPU ms per tile (all threads, best)':^38s}")
        print(f"{'operation threads':18s} {'direct':>10s} {'zarr':>10s} {'direct/zarr':>12s} "
              f"{'direct':>10s} {'zarr':>10s} {'zarr/direct':>12s}")
        verdict = {}
        for threads in sorted({1, max(1, args.threads)}):
            wall = {(op, name): np.inf for op in ("write", "read") for name in ("direct", "zarr")}
            cpu = dict(wall)
            decoded, groups = {}, {}
            for _ in range(args.repeats):  # alternate the two paths so machine load hits both alike
                for name, writer, reader in (("direct", handwritten_write_shard, handwritten_read),
                                             ("zarr", tile_store.write_shard, tile_store.read_shard)):
                    group = groups[name] = fresh_store(tmp / f"{name}.zarr", tiles)
                    w, c = write_all(group, tiles, threads, writer)
                    wall["write", name], cpu["write", name] = min(wall["write", name], w), min(cpu["write", name], c)
                    w, c, decoded[name] = read_all(group, threads, reader)
                    wall["read", name], cpu["read", name] = min(wall["read", name], w), min(cpu["read", name], c)
            # the same tiles both ways, and the store reads hand-written shards (as older stores hold)
            old = tile_store.read_tiles(groups["direct"], np.arange(len(tiles)))
            if not (np.array_equal(decoded["direct"], decoded["zarr"]) and np.array_equal(old, decoded["zarr"])):
                raise SystemExit("error: the two paths stored different tiles")
            n = len(tiles)
            for op in ("write", "read"):
                d, z = n / wall[op, "direct"], n / wall[op, "zarr"]
                cd, cz = 1e3 * cpu[op, "direct"] / n, 1e3 * cpu[op, "zarr"] / n
                verdict[(op, threads)] = d / z
                print(f"{op:9s} {threads:8d} {d:10.0f} {z:10.0f} {d / z:11.2f}x {cd:10.2f} {cz:10.2f} {cz / cd:11.2f}x")
        for op in ("write", "read"):
            worst = min(v for (o, _), v in verdict.items() if o == op)
            print(f"shard {op}: hand-written path {worst:.2f}x zarr's tiles/s at worst; a hand-written path is "
                  f"kept only if >= {KEEP_RATIO}x: " + ("it would be" if worst >= KEEP_RATIO else "zarr it is"))
        if args.tiler:
            compare_tiler(args.tiler, tmp, max(1, args.threads), args.repeats)


if __name__ == "__main__":
    main()
