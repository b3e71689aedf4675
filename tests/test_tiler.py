"""Tiler and tile store on real slides and on TIFFs/fields written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from wsi_contracts import tilestore as tile_store
from wsi_pipeline.errors import OutputError, UnknownMppError
from wsi_pipeline.tiling import TilerConfig, tile_slide


class Interrupt(Exception):
    """Raised from the progress callback to stop a run after some shards, like a kill."""


def shard_files(store: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(store)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted((store / "tiles" / "c").rglob("*"))
        if p.is_file()
    }


def write_pyramid(path: Path, image: np.ndarray, mpp: float, levels: int = 3, tile: int = 256) -> None:
    """A generic pyramidal JPEG TIFF (what scanners' generic exports and our synth slides look like)."""
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        level = image
        for i in range(levels):
            res = 1e4 / (mpp * 2**i)
            tif.write(level, tile=(tile, tile), compression="jpeg", photometric="rgb",
                      resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1)
            level = level[::2, ::2]


def sparse_field(shared_data: Path, size: int = 2048, n_cells: int = 12, seed: int = 0) -> np.ndarray:
    """A pale background with a few real blood cells pasted at known places (cells ~27 px at 0.27 um/px)."""
    rng = np.random.default_rng(seed)
    cells = sorted((shared_data / "pbc" / "lymphocyte").glob("*.jpg"))[:n_cells]
    field = np.full((size, size, 3), 236, np.uint8)
    field[..., 2] = 240
    from PIL import Image

    for i, path in enumerate(cells):
        cell = np.asarray(Image.open(path).convert("RGB"))[32:96, 32:96]
        y, x = rng.integers(0, size - 64, 2)
        field[y : y + 64, x : x + 64] = cell
    return field


def test_aperio_store_layout_and_pixels(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    result = tile_slide(slide, tmp_path, TilerConfig(stain="he"), workers=2)
    assert result.path == tmp_path / "CMU-1-Small-Region.zarr"
    assert not result.reused and result.n_tiles > 20 and result.n_tiles <= result.n_grid
    group = tile_store.require_complete(result.path)
    meta = tile_store.read_meta(group)
    n = meta["n_tiles"]
    assert group["tiles"].shape == (n, 224, 224, 3) and group["tiles"].dtype == np.uint8
    assert group["coords"].shape == (n, 4) and group["grid"].shape == (n, 2)
    assert group["qc/foreground"].shape == (n,) and group["qc/blur"].shape == (n,)
    assert np.all(np.isfinite(group["qc/blur"][:]))
    # a tile is kept for its foreground fraction or for a nucleus it holds (qc/nuclei)
    nuclei = group["qc/nuclei"][:]
    assert nuclei.shape == (n,) and nuclei.dtype == np.int32 and nuclei.sum() > n
    assert np.all((group["qc/foreground"][:] >= meta["tiler_config"]["min_foreground"]) | (nuclei > 0))
    assert meta["foreground"]["stain"] == {"requested": "he", "stain": "he", "reason": "given", "evidence": {}}
    assert meta["foreground"]["preset"]["name"] == "he" and meta["foreground"]["pen_filter"] is True
    assert meta["slide_mpp"]["source"] == "metadata" and abs(meta["slide_mpp"]["x"] - 0.499) < 0.001
    for key in ("slide_path", "slide_fingerprint", "tiler_config_hash", "package_version", "created", "grid"):
        assert meta[key]
    assert group["thumbnail"].ndim == 3 and group["mask"].shape == group["thumbnail"].shape[:2]
    # Stored tiles are the slide's pixels (mpp 0.499 ~ target 0.5: read at level 0, JPEG q90 in the store).
    coords = group["coords"][:]
    with openslide.OpenSlide(str(slide)) as osr:
        for i in (0, n // 2, n - 1):
            x, y, w, h = coords[i]
            rgba = np.asarray(osr.read_region((int(x), int(y)), 0, (224, 224)), dtype=np.float32)
            alpha = rgba[..., 3:] / 255  # outside the slide is transparent: white, as the tiler stores it
            ref = rgba[..., :3] * alpha + 255 * (1 - alpha)
            mse = np.mean((group["tiles"][i].astype(np.float32) - ref) ** 2)
            assert 10 * np.log10(255**2 / mse) > 30  # JPEG-in-zarr: lossy but faithful


def test_second_run_reuses_complete_store(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    first = tile_slide(slide, tmp_path, TilerConfig(stain="he"))
    before = shard_files(first.path)
    again = tile_slide(slide, tmp_path, TilerConfig(stain="he"))
    assert again.reused and again.shards_written == 0 and again.n_tiles == first.n_tiles
    assert shard_files(first.path) == before
    # A different configuration is not mistaken for the same store: it is rebuilt.
    other = tile_slide(slide, tmp_path, TilerConfig(stain="he", tile_size=256))
    assert not other.reused and zarr.open_group(str(other.path))["tiles"].shape[1] == 256


def test_interrupted_run_resumes_without_rewriting_finished_shards(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    config = TilerConfig(stain="he", max_tiles_per_shard=8)
    reference = tile_slide(slide, tmp_path / "ref", config, workers=1)

    calls = []

    def stop_after_two_shards(stage, done, total):
        if done:  # the first call (done 0) is the plan; then one per finished shard
            calls.append(done)
        if len(calls) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        tile_slide(slide, tmp_path / "run", config, workers=1, progress=stop_after_two_shards)
    path = tmp_path / "run" / "CMU-1-Small-Region.zarr"
    group = tile_store.open_store(path)
    assert not tile_store.is_complete(group)
    pending = tile_store.pending_shards(group)
    assert 0 < len(pending) < tile_store.read_meta(group)["n_shards"]
    finished = shard_files(path)

    resumed = tile_slide(slide, tmp_path / "run", config, workers=1)
    assert not resumed.reused and resumed.shards_written == len(pending)
    after = shard_files(path)
    assert all(after[name] == stamp for name, stamp in finished.items())  # untouched
    done = tile_store.require_complete(path)
    ref = zarr.open_group(str(reference.path))
    np.testing.assert_array_equal(done["coords"][:], ref["coords"][:])
    np.testing.assert_array_equal(done["tiles"][:], ref["tiles"][:])


def test_jpeg2000_slide_needs_mpp_and_reads_level_one(shared_data, tmp_path):
    slide = shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.raises(UnknownMppError, match="--mpp"):
        tile_slide(slide, tmp_path, TilerConfig(stain="he"))
    # At mpp 0.25 and target 0.5 the 2x level is used directly.
    result = tile_slide(slide, tmp_path, TilerConfig(stain="he", tile_size=128), mpp=0.25)
    meta = result.meta
    assert meta.slide_mpp.source == "user" and result.n_tiles > 0
    assert meta.grid.tile_level0 == (256, 256)


def test_sparse_smear_stores_only_cells(shared_data, tmp_path):
    field = sparse_field(shared_data)
    path = tmp_path / "sparse.tiff"
    write_pyramid(path, field, mpp=0.27, levels=3)
    result = tile_slide(path, tmp_path / "out", TilerConfig(target_mpp=0.27, tile_size=128, stain="romanowsky"))
    assert result.meta.slide_mpp.source == "tiff-resolution"
    assert 0 < result.n_tiles <= 4 * 12  # each pasted 64-px cell touches at most 4 tiles
    assert result.n_grid == 16 * 16
    size = sum(p.stat().st_size for p in (result.path / "tiles").rglob("*") if p.is_file())
    assert size < result.n_tiles * 128 * 128 * 3 / 4  # only kept tiles, compressed


def test_lossless_codec_roundtrip_exact(shared_data, tmp_path):
    field = sparse_field(shared_data, size=1024, n_cells=6)
    path = tmp_path / "field.png"
    from PIL import Image

    Image.fromarray(field).save(path)
    result = tile_slide(path, tmp_path / "out", TilerConfig(target_mpp=0.27, tile_size=128, stain="romanowsky",
                                                             codec="lossless"), mpp=0.27)
    group = tile_store.require_complete(result.path)
    for i, (x, y, w, h) in enumerate(group["coords"][:]):
        expected = np.full((128, 128, 3), 255, np.uint8)
        crop = field[y : y + 128, x : x + 128]
        expected[: crop.shape[0], : crop.shape[1]] = crop
        np.testing.assert_array_equal(group["tiles"][i], expected)


def test_blank_slide_gives_valid_empty_store(tmp_path):
    blank = np.full((1024, 1024, 3), 242, np.uint8)
    path = tmp_path / "blank.tiff"
    write_pyramid(path, blank, mpp=0.5, levels=2)
    result = tile_slide(path, tmp_path / "out", TilerConfig())
    assert result.n_tiles == 0 and "foreground" in result.empty_reason
    group = tile_store.require_complete(result.path)
    assert group["tiles"].shape[0] == 0 and tile_store.read_meta(group)["empty_reason"]


def test_unwritable_output_is_a_user_error(shared_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match="cannot write"):
        tile_slide(shared_data / "slides" / "CMU-1-Small-Region.svs", blocker / "out", TilerConfig())
