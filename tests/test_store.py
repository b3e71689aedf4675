"""The tile store: shards (written and read through zarr, checked against their digests), typed metadata,
score arrays."""

from __future__ import annotations

import dataclasses

import imagecodecs
import numpy as np
import pytest
import zarr

from wsi_contracts import tilestore as tile_store
from wsi_contracts.errors import ShardError, StoreError


def _tiles(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields (JPEG-friendly, distinct per tile)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(0, 1, 3)
        for ch in range(3):
            out[i, ..., ch] = np.clip(255 * (0.5 + 0.4 * np.sin(6 * (a * xx + b * yy) + c + ch)), 0, 255)
    return out


def _store(path, n: int, per_shard: int, codec: str = "jpeg", size: int = 64) -> zarr.Group:
    return tile_store.create_store(
        path, coords=np.zeros((n, 4)), grid=np.zeros((n, 2)), foreground=np.ones(n),
        thumbnail=np.full((40, 30, 3), 200, np.uint8), mask=np.ones((40, 30), bool),
        thumbnail_downsample=4.0, thumbnail_mpp=2.0, tile_size=size, tiles_per_shard=per_shard,
        codec=codec, jpeg_quality=90, meta={})


def _jpeg_roundtrip(tiles: np.ndarray) -> np.ndarray:
    return np.stack([imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(t, level=90, subsampling="444"))
                     for t in tiles])


def test_shards_are_standard_zarr_and_match_per_tile_jpeg(tmp_path):
    n, per = 23, 8  # the last shard is partial
    group = _store(tmp_path / "s.zarr", n, per)
    tiles = _tiles(n)
    for index in range(3):
        sl = tile_store.shard_slice(index, n, per)
        tile_store.write_shard(group, index, tiles[sl], np.arange(sl.start, sl.stop))
    reopened = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    stored = np.asarray(reopened["tiles"][:])
    np.testing.assert_array_equal(stored, _jpeg_roundtrip(tiles))
    for index in range(3):
        sl = tile_store.shard_slice(index, n, per)
        np.testing.assert_array_equal(tile_store.read_shard(group, index), stored[sl])
    np.testing.assert_array_equal(np.asarray(reopened["qc/blur"][:]), np.arange(n, dtype=np.float32))
    assert tile_store.pending_shards(group) == []
    assert not list((tmp_path / "s.zarr" / "tiles").rglob("*.partial"))  # atomic: no temporaries left
    picked = tile_store.read_tiles(group, [22, 3, 9, 3])  # any order, across shards, repeats
    np.testing.assert_array_equal(picked, stored[[22, 3, 9, 3]])


def test_shards_written_by_zarr_alone_are_read_once_their_digest_is_recorded(tmp_path):
    n, per = 10, 4
    group = _store(tmp_path / "s.zarr", n, per)
    tiles = _tiles(n, seed=1)
    with zarr.config.set({"array.write_empty_chunks": True}):
        group["tiles"][:] = tiles  # zarr's own sharding writer
    for index in range(3):
        tile_store.record_shard_digest(group, index)
        sl = tile_store.shard_slice(index, n, per)
        np.testing.assert_array_equal(tile_store.read_shard(group, index), np.asarray(group["tiles"][sl]))


def test_rewriting_a_shard_removes_a_killed_writers_temporary(tmp_path):
    group = _store(tmp_path / "s.zarr", 4, 4)
    tile_store.write_shard(group, 0, _tiles(4), np.zeros(4))
    shard = tile_store.shard_file(group, 0)
    stale = shard.with_name(f"{shard.name}.0123456789abcdef.partial")
    stale.write_bytes(b"half a shard")
    tile_store.write_shard(group, 0, _tiles(4, seed=3), np.zeros(4))
    assert not stale.exists()
    np.testing.assert_array_equal(tile_store.read_shard(group, 0), _jpeg_roundtrip(_tiles(4, seed=3)))


def test_unwritten_shard_is_an_error_never_fill_values(tmp_path):
    n, per = 8, 4
    group = _store(tmp_path / "s.zarr", n, per)
    with pytest.raises(ShardError, match=r"tile shard 1 \(.*\) is missing"):
        tile_store.read_shard(group, 1)


@pytest.mark.parametrize("digests", [True, False], ids=["digest", "pre-digest-store"])
def test_damaged_index_is_an_error(tmp_path, digests):
    group = _store(tmp_path / "s.zarr", 8, 4)
    if not digests:  # a store written before shard digests: the index CRC still guards the index
        tile_store.update_meta(group, shard_digest=None)
    tile_store.write_shard(group, 0, _tiles(4), np.zeros(4))
    shard = tile_store.shard_file(group, 0)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the index
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="recorded digest" if digests else "checksum"):
        tile_store.read_shard(group, 0)
    assert list(tile_store.damaged_shards(group)) == [0]


def test_damaged_tile_in_a_pre_digest_store_is_a_shard_error(tmp_path):
    group = _store(tmp_path / "s.zarr", 4, 4)
    tile_store.update_meta(group, shard_digest=None)  # only the index CRC guards the file
    tile_store.write_shard(group, 0, _tiles(4), np.zeros(4))
    shard = tile_store.shard_file(group, 0)
    data = bytearray(shard.read_bytes())
    data[2:40] = bytes(38)  # the first tile's JPEG header, the index untouched
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"a tile of shard 0 cannot be decoded .*verify --repair"):
        tile_store.read_shard(group, 0)


def test_lossless_store_uses_zarr_and_round_trips_exactly(tmp_path):
    n, per = 6, 4
    group = _store(tmp_path / "s.zarr", n, per, codec="lossless")
    tiles = _tiles(n, seed=2)
    tile_store.write_shard(group, 0, tiles[:4], np.zeros(4))
    tile_store.write_shard(group, 1, tiles[4:], np.zeros(2))
    np.testing.assert_array_equal(tile_store.read_shard(group, 1), tiles[4:])
    np.testing.assert_array_equal(np.asarray(group["tiles"][:]), tiles)


def test_typed_metadata_reads_what_create_store_wrote(tmp_path):
    grid = {"origin": [3, 4], "stride": [224, 224], "shape": [5, 6], "tile_level0": [224, 224]}
    group = tile_store.create_store(
        tmp_path / "s.zarr", coords=np.ones((9, 4)), grid=np.ones((9, 2)), foreground=np.ones(9),
        thumbnail=np.full((40, 30, 3), 200, np.uint8), mask=np.ones((40, 30), bool), thumbnail_downsample=4.0,
        thumbnail_mpp=2.0, tile_size=64, tiles_per_shard=4, codec="jpeg", jpeg_quality=80,
        meta={"slide_path": "/x/a.svs", "slide_mpp": {"x": 0.25, "y": 0.26, "source": "user"}, "grid": grid,
              "slide_dimensions": [1000, 800], "tiler_config": {"target_mpp": 0.5, "tiling": "cells"}, "n_grid": 30})
    meta = tile_store.read_store_meta(group)
    assert (meta.n_tiles, meta.n_shards, meta.tiles_per_shard, meta.tile_size) == (9, 3, 4, 64)
    assert meta.codec == "jpeg-q80-444" and not meta.complete and meta.shard_digest == "crc32c"
    assert meta.slide_mpp == tile_store.SlideMpp(0.25, 0.26, "user") and meta.slide_dimensions == (1000, 800)
    assert meta.grid.shape == (5, 6) and meta.grid.origin == (3.0, 4.0) and meta.grid.as_dict()["stride"] == [224, 224]
    assert meta.target_mpp == 0.5 and meta.placement == "cells" and meta.n_grid == 30
    with pytest.raises(AttributeError):  # frozen: a stage cannot change what it was handed
        meta.n_tiles = 3


@pytest.mark.parametrize("field, value, problem", [
    ("n_tiles", None, "is missing"),
    ("n_tiles", "9", "not an integer"),
    ("tiles_per_shard", 0, "below 1"),
    ("n_shards", 7, "make 3"),
    ("complete", "yes", "not true or false"),
    ("codec", 5, "not a string"),
    ("grid", {"stride": [1, 1], "shape": [2.5, 3]}, "not a pair of integers"),
    ("slide_mpp", {"x": "a", "y": 1}, "not a pair of numbers"),
    ("tiler_config", [1], "not an object"),
])
def test_missing_or_ill_typed_attribute_is_one_store_error(tmp_path, field, value, problem):
    group = _store(tmp_path / "s.zarr", 9, 4)
    raw = tile_store.read_meta(group)
    if value is None:
        del raw[field]
    else:
        raw[field] = value
    group.attrs[tile_store.META_KEY] = raw
    for call in (lambda: tile_store.open_store(tmp_path / "s.zarr"), lambda: tile_store.read_store_meta(group)):
        with pytest.raises(StoreError, match=rf"s\.zarr: tile store attribute 'wsi_triage\.{field}[.\w]*' .*{problem}") as info:
            call()
        assert "\n" not in str(info.value)


def test_score_arrays_round_trip_through_the_store_layout(tmp_path):
    group = _store(tmp_path / "s.zarr", 6, 4)
    key = tile_store.scores_key("ab" * 32)
    assert key == "scores/abababababab"
    meta = tile_store.ScoreMeta(checkpoint_sha256="ab" * 32, class_names=("a", "b", "c"), suspicious_classes=("c",),
                                ood={"threshold": 2.5})
    assert meta.key == key
    tile_store.create_scores(group, meta)
    probs = np.arange(18, dtype=np.float32).reshape(6, 3)
    tile_store.write_scores(group, key, 1, probs[4:], np.array([1.0, 9.0], np.float32))
    assert list(group[key]["shard_done"][:]) == [False, True]
    tile_store.write_scores(group, key, 0, probs[:4], np.zeros(4, np.float32))
    with pytest.raises(StoreError, match="no complete scores"):
        tile_store.read_scores(group)
    group[key].attrs["complete"] = True
    got, attrs = tile_store.read_scores(group, "ab" * 32)
    np.testing.assert_array_equal(got, probs)
    assert attrs == dataclasses.replace(meta, complete=True) and attrs.ood_threshold == 2.5
    distances, threshold = tile_store.read_ood(group, attrs)
    assert threshold == 2.5 and distances.tolist() == [0, 0, 0, 0, 1, 9]
    assert list(tile_store.list_scores(group)) == [key]
    chunk = tmp_path / "s.zarr" / "scores" / "abababababab" / "probs" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert tile_store.unflag_damaged_scores(tmp_path / "s.zarr", key) == [1]
    assert list(group[key]["shard_done"][:]) == [True, False] and group[key].attrs["complete"] is False


def test_a_damaged_shard_is_rewritten_whole(tmp_path):
    # zarr merges a write into an existing shard file; a truncated one must not stop its rewrite
    group = _store(tmp_path / "s.zarr", 8, 4)
    tile_store.write_shard(group, 1, _tiles(4), np.zeros(4))
    shard = tile_store.shard_file(group, 1)
    shard.write_bytes(shard.read_bytes()[:-100])
    assert list(tile_store.damaged_shards(group)) == [1]
    tile_store.write_shard(group, 1, _tiles(4, seed=5), np.zeros(4))
    assert tile_store.damaged_shards(group) == {}
    np.testing.assert_array_equal(tile_store.read_shard(group, 1), _jpeg_roundtrip(_tiles(4, seed=5)))


def test_store_io_benchmark_runs_and_the_store_reads_hand_written_shards(shared_data):
    # bench_store_io.py writes one store with the former hand-written shard writer (the files older
    # stores hold) and one with zarr, and exits non-zero unless read_tiles gets the same tiles from both
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_store_io.py"
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    proc = subprocess.run([sys.executable, str(script), str(slide), "--tiles", "24", "--repeats", "1", "--threads", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "shard write: hand-written path" in proc.stdout and "shard read: hand-written path" in proc.stdout
    proc = subprocess.run([sys.executable, str(script), str(slide.with_name("absent.svs"))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("absent.svs: slide not found")
