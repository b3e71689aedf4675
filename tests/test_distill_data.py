import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import (
    AugConfig,
    augment,
    balanced_epoch_indices,
    load_imagefolder,
    load_tilestore,
    read_exclude,
    stratified_split,
    to_input,
)
from distill.errors import DistillError


def _write_folder(root, counts):
    rng = np.random.default_rng(0)
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{c}_{i}.png")


def test_stratified_split_is_deterministic_disjoint_and_stratified():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 3)
    tr, va = stratified_split(labels, 0.2, seed=7)
    tr2, va2 = stratified_split(labels, 0.2, seed=7)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(tr) + len(va) == len(labels)
    assert torch.bincount(labels[va]).tolist() == [10, 4, 1]
    _, va3 = stratified_split(labels, 0.2, seed=8)
    assert not torch.equal(va, va3)


def test_imagefolder_exclude_list_removes_images(tmp_path):
    root = tmp_path / "set"
    _write_folder(root, {"a": 3, "b": 2})
    ex = tmp_path / "ex.txt"
    ex.write_text("# held out\na/a_1.png\nb/b_0.png\n")
    assert read_exclude(ex) == {"a/a_1.png", "b/b_0.png"}
    ps = load_imagefolder(root, 16, exclude=ex)
    assert ps.class_names == ["a", "b"]
    assert ps.images.shape == (3, 16, 16, 3) and ps.images.dtype == torch.uint8
    assert ps.labels.tolist() == [0, 0, 1]
    full = load_imagefolder(root, 16)
    assert full.fingerprint != ps.fingerprint
    with pytest.raises(DistillError, match="exclude list not found"):
        load_imagefolder(root, 16, exclude=tmp_path / "missing.txt")


def test_imagefolder_cache_gives_same_pixels(tmp_path):
    root = tmp_path / "set"
    _write_folder(root, {"a": 2, "b": 2})
    a = load_imagefolder(root, 12, cache_dir=tmp_path / "cache")
    b = load_imagefolder(root, 12, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").glob("*.npy")) and torch.equal(a.images, b.images)


def test_augment_without_jitter_is_a_symmetry_of_the_image():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 255, (8, 16, 16, 3), dtype=torch.uint8)
    cfg = AugConfig(scale=None, brightness=0, contrast=0, saturation=0, stain=0)
    out = augment(img, cfg, g)
    base = to_input(img)
    assert out.shape == (8, 3, 16, 16)
    for i in range(8):  # every output is one of the 8 flips/rotations of its input
        cands = [torch.rot90(v, k, (1, 2)) for v in (base[i], base[i].flip(2)) for k in range(4)]
        assert min((out[i] - c).abs().max().item() for c in cands) < 1e-4
    jit = augment(img, AugConfig(), torch.Generator().manual_seed(1))
    assert jit.shape == out.shape and torch.isfinite(jit).all()


def test_balanced_epoch_indices_equal_per_class():
    labels = torch.tensor([0] * 90 + [1] * 5 + [2] * 30)
    g = torch.Generator().manual_seed(0)
    idx = balanced_epoch_indices(labels, 60, g)
    assert torch.bincount(labels[idx]).tolist() == [20, 20, 20]
    assert sorted(balanced_epoch_indices(labels, None, g).tolist()) == list(range(len(labels)))


def _tile_store(path, values, size=8, per_shard=5, codec="lossless"):
    """A real tile store (as the tiler writes it) whose tile i is filled with ``values[i]``."""
    from wsi_contracts import tilestore as tile_store

    n = len(values)
    group = tile_store.create_store(
        path, coords=np.arange(1, 4 * n + 1).reshape(n, 4), grid=np.arange(1, 2 * n + 1).reshape(n, 2),
        foreground=np.ones(n), thumbnail=np.zeros((8, 8, 3), np.uint8), mask=np.ones((8, 8), bool),
        thumbnail_downsample=1.0, thumbnail_mpp=2.0, tile_size=size, tiles_per_shard=per_shard, codec=codec,
        jpeg_quality=90, meta={"slide_fingerprint": "abc"})
    tiles = np.stack([np.full((size, size, 3), v, np.uint8) for v in values])
    meta = tile_store.read_store_meta(group)
    for i in range(meta.n_shards):
        sl = tile_store.shard_slice(i, n, meta.tiles_per_shard)
        tile_store.write_shard(group, i, tiles[sl], np.zeros(sl.stop - sl.start))
    tile_store.update_meta(group, complete=True)
    return group


def test_tilestore_with_label_table(tmp_path):
    store = tmp_path / "s.zarr"
    _tile_store(store, [i * 20 for i in range(7)], per_shard=3)
    csv = tmp_path / "labels.csv"
    csv.write_text("tile_index,label\n4,ig\n1,neutrophil\n6,ig\n2,ig\n")
    ps = load_tilestore(store, csv, 8)
    assert ps.class_names == ["ig", "neutrophil"]
    assert ps.labels.tolist() == [0, 1, 0, 0]
    assert [int(ps.images[i, 0, 0, 0]) for i in range(4)] == [80, 20, 120, 40]  # label-table order, any shard
    ps16 = load_tilestore(store, csv, 16)
    assert ps16.images.shape == (4, 16, 16, 3)
    csv.write_text("tile_index,label\n9,ig\n")
    with pytest.raises(DistillError, match="outside the store"):
        load_tilestore(store, csv, 8)


def test_tilestore_shard_damage_is_one_line_naming_the_shard(tmp_path):
    from wsi_contracts import tilestore as tile_store

    store = tmp_path / "s.zarr"
    group = _tile_store(store, [10, 20, 30, 40, 50, 60], per_shard=2, codec="jpeg")
    csv = tmp_path / "labels.csv"
    csv.write_text("tile_index,label\n0,a\n3,b\n")
    shard = tile_store.shard_file(group, 1)
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF  # inside tile 2's JPEG: only the recorded digest notices
    shard.write_bytes(bytes(data))
    with pytest.raises(DistillError, match=r"tile shard 1 \(.*\) does not match its recorded digest") as info:
        load_tilestore(store, csv, 8)
    assert "\n" not in str(info.value)
    shard.unlink()
    with pytest.raises(DistillError, match=r"tile shard 1 \(.*\) is missing"):
        load_tilestore(store, csv, 8)
    csv.write_text("tile_index,label\n0,a\n4,b\n")  # shards 0 and 2 are intact
    assert load_tilestore(store, csv, 8).labels.tolist() == [0, 1]


def test_tilestore_that_is_not_one_or_incomplete_is_refused(tmp_path):
    import zarr

    from wsi_contracts import tilestore as tile_store

    csv = tmp_path / "labels.csv"
    csv.write_text("tile_index,label\n0,a\n")
    bare = tmp_path / "bare.zarr"  # a zarr group with tiles but no store attributes
    zarr.open_group(str(bare), mode="w").create_array("tiles", shape=(1, 8, 8, 3), dtype="uint8")
    with pytest.raises(DistillError, match="not a wsi-triage tile store"):
        load_tilestore(bare, csv, 8)
    with pytest.raises(DistillError, match="no such tile store"):
        load_tilestore(tmp_path / "absent.zarr", csv, 8)
    group = _tile_store(tmp_path / "s.zarr", [1, 2])
    tile_store.update_meta(group, complete=False)
    with pytest.raises(DistillError, match="incomplete"):
        load_tilestore(tmp_path / "s.zarr", csv, 8)


def test_real_jpeg_tile_store_reads_without_importing_wsi_pipeline(tmp_path):
    # a store as the tiler writes it (JPEG shards); distill reads it through wsi_contracts in a process
    # that never imports wsi_pipeline
    import subprocess
    import sys

    _tile_store(tmp_path / "s.zarr", [40 * i for i in range(5)], size=16, codec="jpeg")
    (tmp_path / "labels.csv").write_text("tile_index,label\n3,ig\n1,neutrophil\n")
    code = ("import sys; from distill.data import load_tilestore; "
            f"ps = load_tilestore({str(tmp_path / 's.zarr')!r}, {str(tmp_path / 'labels.csv')!r}, 16); "
            "print([int(ps.images[i, 8, 8, 0]) for i in range(2)], "
            "any(m.split('.')[0] == 'wsi_pipeline' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    values = [int(v.strip("[],")) for v in out[:2]]
    assert abs(values[0] - 120) <= 2 and abs(values[1] - 40) <= 2
    assert out[2] == "False"


def test_split_paths_is_the_split_training_makes(tmp_path):
    """split_paths (no decoding) names the same validation images as training's own split of the
    decoded folder (load_imagefolder + stratified_split), with an exclude list and with groups."""
    from pathlib import Path

    from distill.data import group_keys, split_paths

    cells = Path(__file__).resolve().parents[1] / "wsi_pipeline" / "data" / "cells"  # shipped real cells
    first = sorted(p for p in cells.glob("*/*") if p.suffix.lower() in {".jpg", ".png"})[:5]
    ex = tmp_path / "ex.txt"
    ex.write_text("".join(f"{p.parent.name}/{p.name}\n" for p in first))
    for pattern in (None, r"^[a-z]+/[A-Z]+_\d"):
        train, val = split_paths(cells, 0.2, 3, ex, pattern)
        ps = load_imagefolder(cells, 8, exclude=ex)
        tr, va = stratified_split(ps.labels, 0.2, 3, group_keys(ps.paths, pattern))
        assert val == [ps.paths[i] for i in va.tolist()] and train == [ps.paths[i] for i in tr.tolist()]
        assert not set(val) & set(train) and len(val) + len(train) == len(ps.paths)
        assert not {f"{p.parent.name}/{p.name}" for p in first} & (set(val) | set(train))
