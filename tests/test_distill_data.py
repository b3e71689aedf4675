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


def test_tilestore_with_label_table(tmp_path):
    zarr = pytest.importorskip("zarr")
    store = tmp_path / "s.zarr"
    g = zarr.open_group(str(store), mode="w")
    tiles = np.stack([np.full((8, 8, 3), i * 20, np.uint8) for i in range(5)])
    arr = g.create_array("tiles", shape=tiles.shape, dtype="uint8", chunks=(1, 8, 8, 3))
    arr[:] = tiles
    g.attrs["wsi_triage"] = {"format": "wsi-triage-tilestore", "slide_fingerprint": "abc"}
    csv = tmp_path / "labels.csv"
    csv.write_text("tile_index,label\n4,ig\n1,neutrophil\n2,ig\n")
    ps = load_tilestore(store, csv, 8)
    assert ps.class_names == ["ig", "neutrophil"]
    assert ps.labels.tolist() == [0, 1, 0]
    assert [int(ps.images[i, 0, 0, 0]) for i in range(3)] == [80, 20, 40]
    ps16 = load_tilestore(store, csv, 16)
    assert ps16.images.shape == (3, 16, 16, 3)
    csv.write_text("tile_index,label\n9,ig\n")
    with pytest.raises(DistillError, match="outside the store"):
        load_tilestore(store, csv, 8)


def test_real_jpeg_tile_store_reads_without_importing_wsi_pipeline(tmp_path):
    # a store as the tiler writes it (JPEG shards); distill must read it in a process that never
    # imported wsi_pipeline: zarr finds the codec through the package's entry point
    import subprocess
    import sys

    from wsi_contracts import tilestore as tile_store

    n = 5
    group = tile_store.create_store(
        tmp_path / "s.zarr", coords=np.zeros((n, 4)), grid=np.zeros((n, 2)), foreground=np.ones(n),
        thumbnail=np.zeros((8, 8, 3), np.uint8), mask=np.ones((8, 8), bool), thumbnail_downsample=1.0,
        thumbnail_mpp=2.0, tile_size=16, tiles_per_shard=5, codec="jpeg", jpeg_quality=90, meta={})
    tile_store.write_shard(group, 0, np.stack([np.full((16, 16, 3), 40 * i, np.uint8) for i in range(n)]),
                           np.zeros(n))
    (tmp_path / "labels.csv").write_text("tile_index,label\n3,ig\n1,neutrophil\n")
    code = ("import sys; from distill.data import load_tilestore; "
            f"ps = load_tilestore({str(tmp_path / 's.zarr')!r}, {str(tmp_path / 'labels.csv')!r}, 16); "
            "print([int(ps.images[i, 8, 8, 0]) for i in range(2)], 'wsi_contracts.tilestore' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    values = [int(v.strip("[],")) for v in out[:2]]
    assert abs(values[0] - 120) <= 2 and abs(values[1] - 40) <= 2
    assert out[2] == "False"
