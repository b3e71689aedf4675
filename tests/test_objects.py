"""Nucleated objects and the ``cells`` tile placement, on real smear fields and synthetic smears with truth."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from pipeline_util import cells_dir, smear

from wsi_contracts import tilestore as tile_store
from wsi_pipeline.errors import OptionError
from wsi_pipeline.foreground import foreground_mask
from wsi_pipeline.tiling import ObjectTable, detect_objects, merge_near_duplicates, place_tiles, read_objects
from wsi_pipeline.slides import open_slide
from wsi_pipeline.tiling import TilerConfig, tile_slide

SMEAR_MPP = 0.07  # smear_fields: see tests/test_foreground.py
TILE_UM = 128 * 0.27  # the demo student's tile: 128 px at 0.27 um/px
CELLS = TilerConfig(target_mpp=0.27, tile_size=128, stain="romanowsky", tiling="cells")


class Interrupt(Exception):
    """Raised from the progress callback to stop a run after some shards, like a kill."""


def wbc_boxes(xml_path: Path) -> list[tuple[int, int, int, int]]:
    root = ET.parse(xml_path).getroot()
    return [tuple(int(o.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax"))
            for o in root.iter("object") if o.find("name").text == "WBC"]


def field_objects(jpg: Path, work_mpp: float = 2.0) -> tuple[ObjectTable, np.ndarray, tuple[int, int]]:
    rgb = np.asarray(Image.open(jpg).convert("RGB"))
    h, w = rgb.shape[:2]
    small = np.asarray(Image.fromarray(rgb).resize((round(w * SMEAR_MPP / work_mpp), round(h * SMEAR_MPP / work_mpp)),
                                                   Image.Resampling.BOX))
    ds = (w / small.shape[1] + h / small.shape[0]) / 2
    mask = foreground_mask(small, SMEAR_MPP * ds, "romanowsky")
    return detect_objects(small, mask, SMEAR_MPP * ds, ds, tile_um=TILE_UM), rgb, (w, h)


def test_smear_fields_every_white_cell_gets_a_centred_tile(shared_data):
    """Real BCCD fields: each boxed white cell gets a tile centred on it (as far as the field's edges allow)."""
    folder = shared_data / "smear_fields"
    xmls = sorted((folder / "annotations").glob("*.xml"))[::6]  # 61 of the 364 fields
    tile0 = TILE_UM / SMEAR_MPP
    n = good = tiles = 0
    for xml in xmls:
        objects, _, (w, h) = field_objects(folder / f"{xml.stem}.jpg")
        coords = place_tiles(objects, tile0, (w, h)).coords
        tiles += len(coords)
        for x0, y0, x1, y1 in wbc_boxes(xml):
            n += 1
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            ideal = (min(max(cx - tile0 / 2, 0), max(w - tile0, 0)), min(max(cy - tile0 / 2, 0), max(h - tile0, 0)))
            if len(coords):
                good += np.hypot(coords[:, 0] - ideal[0], coords[:, 1] - ideal[1]).min() <= 0.15 * tile0
    assert n >= 60
    assert good / n >= 0.95, f"{good}/{n} white cells with a centred tile"
    assert tiles / len(xmls) < 2.0  # about one tile per field (a grid at this tile size needs 2)


def test_red_cells_alone_are_not_objects(shared_data):
    """A BCCD field cropped to red cells only (no white-cell box) yields no nucleated object."""
    folder = shared_data / "smear_fields"
    xml = folder / "annotations" / "BloodImage_00000.xml"
    rgb = np.asarray(Image.open(folder / "BloodImage_00000.jpg").convert("RGB"))
    (x0, y0, x1, y1), = wbc_boxes(xml)
    crop = rgb[:, :max(x0 - 20, 1)]  # left of the only white cell: red cells and glass
    small = np.asarray(Image.fromarray(crop).resize((max(1, round(crop.shape[1] * SMEAR_MPP / 2.0)),
                                                     round(crop.shape[0] * SMEAR_MPP / 2.0)), Image.Resampling.BOX))
    ds = crop.shape[0] / small.shape[0]
    mask = foreground_mask(small, SMEAR_MPP * ds, "romanowsky")
    assert mask.any()  # the red cells are foreground ...
    assert len(detect_objects(small, mask, SMEAR_MPP * ds, ds, tile_um=TILE_UM)) == 0  # ... but not nucleated


def test_group_larger_than_a_tile_gets_the_fewest_aligned_tiles():
    # one group 2.5 tiles wide and 1.5 tiles high, one isolated cell, one near-duplicate of it
    tile0 = 100.0
    objects = ObjectTable(centre=np.array([[300.0, 300.0], [900.0, 900.0], [910.0, 905.0]]),
                          area=np.array([5000.0, 150.0, 50.0], np.float32),
                          bbox=np.array([[175, 225, 250, 150], [890, 890, 20, 20], [905, 900, 10, 10]]),
                          n_nuclei=np.array([9, 1, 1], np.int32))
    placement = place_tiles(objects, tile0, (2000, 2000), overlap=0.1, merge=0.2)
    assert len(placement.objects) == 2  # the near-duplicate merged into the isolated cell
    group = placement.coords[placement.tile_object == 0]
    # fewest tiles with >= 10 % overlap: ceil((250 - 10) / 90) = 3 across, ceil((150 - 10) / 90) = 2 down
    assert len(group) == 6
    assert group[:, 0].min() == 175 and group[:, 0].max() + 100 == 425  # aligned to the group's box
    assert group[:, 1].min() == 225 and group[:, 1].max() + 100 == 375
    xs = np.unique(group[:, 0])
    assert np.all(np.diff(xs) <= 90)
    single = placement.coords[placement.tile_object == 1]
    assert len(single) == 1
    merged = placement.objects.take(np.array([1]))
    assert merged.n_nuclei[0] == 2 and merged.area[0] == pytest.approx(200.0)
    centre = single[0, :2] + 50
    assert np.hypot(*(centre - merged.centre[0])) < 1.0  # centred on the merged object


def test_tiles_stay_inside_the_slide():
    objects = ObjectTable(np.array([[5.0, 5.0], [995.0, 500.0]]), np.ones(2, np.float32),
                          np.array([[0, 0, 10, 10], [990, 495, 10, 10]]), np.ones(2, np.int32))
    coords = place_tiles(objects, 100.0, (1000, 600)).coords
    assert coords[:, 0].min() >= 0 and coords[:, 1].min() >= 0
    assert (coords[:, 0] + coords[:, 2]).max() <= 1000 and (coords[:, 1] + coords[:, 3]).max() <= 600


def test_merge_keeps_distant_objects():
    objects = ObjectTable(np.array([[0.0, 0.0], [100.0, 0.0]]), np.ones(2, np.float32),
                          np.array([[0, 0, 5, 5], [100, 0, 5, 5]]), np.ones(2, np.int32))
    assert len(merge_near_duplicates(objects, 50.0)) == 2
    assert len(merge_near_duplicates(objects, 150.0)) == 1


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    cells = cells_dir(shared if shared.is_dir() else None)
    if cells is not None and not cells.is_dir():
        pytest.skip("no cell images for synthetic smears (shipped cells or ../shared/data/pbc)")
    root = tmp_path_factory.mktemp("objects")
    path = root / "smear.tiff"
    smear(path, cells, fraction=0.3, seed=3, size=2048)
    return path, json.loads(path.with_suffix(".truth.json").read_text())


def test_synthetic_smear_white_cells_are_found(synthetic):
    """Every nucleated cell (platelets aside) of a synthetic smear lies in a tile centred near it."""
    path, truth = synthetic
    with open_slide(path) as slide:
        thumb, ds = slide.thumbnail(2.0)
        dims = slide.dimensions
    mpp = truth["mpp"] * ds
    objects = detect_objects(thumb, foreground_mask(thumb, mpp, "romanowsky"), mpp, ds, tile_um=TILE_UM)
    tile0 = TILE_UM / truth["mpp"]
    coords = place_tiles(objects, tile0, dims).coords
    centres = coords[:, :2] + coords[:, 2:] / 2
    cells = [c for c in truth["cells"] if c["class"] != "platelet" and not c.get("blurred")]
    near = 0
    for c in cells:
        x, y, w, h = c["bbox"]
        near += np.hypot(centres[:, 0] - (x + w / 2), centres[:, 1] - (y + h / 2)).min() <= 0.25 * tile0
    assert len(cells) >= 20
    assert near / len(cells) >= 0.9, f"{near}/{len(cells)}"
    # and the objects are cells, not red cells or debris: nearly all lie on a listed cell
    listed = np.array([[x + w / 2, y + h / 2] for x, y, w, h in (c["bbox"] for c in truth["cells"])])
    d = np.hypot(objects.centre[:, None, 0] - listed[None, :, 0], objects.centre[:, None, 1] - listed[None, :, 1])
    on_cell = (d.min(axis=1) <= 10 / truth["mpp"]) | (objects.n_nuclei > 1)
    assert on_cell.mean() >= 0.9


def test_cells_store_records_objects_and_resumes(synthetic, tmp_path):
    path, _ = synthetic
    reference = tile_slide(path, tmp_path / "ref", CELLS, workers=1)
    assert reference.n_tiles > 0 and reference.n_tiles < reference.n_grid
    group = tile_store.open_store(reference.path)
    objects, tile_object = read_objects(group)
    assert len(tile_object) == reference.n_tiles
    assert set(np.unique(tile_object)) == set(range(len(objects)))  # every object has a tile, every tile an object
    assert list(group["objects/id"][:]) == list(range(len(objects)))
    meta = tile_store.read_meta(group)
    assert meta["tiler_config"]["tiling"] == "cells" and meta["foreground"]["placement"] == "cells"
    assert meta["tiler_config_hash"] == CELLS.hash(0.25) != TilerConfig(target_mpp=0.27, tile_size=128,
                                                                           stain="romanowsky").hash(0.25)
    # each single-cell tile holds its object's centre near its own centre
    coords = np.asarray(group["coords"][:])
    single = objects.n_nuclei[tile_object] == 1
    offset = coords[:, :2] + coords[:, 2:] / 2 - objects.centre[tile_object]
    inside = (coords[:, 0] > 0) & (coords[:, 1] > 0) & (coords[:, 0] + coords[:, 2] < 2048) & (coords[:, 1] + coords[:, 3] < 2048)
    assert np.abs(offset[single & inside]).max() <= 0.2 * coords[0, 2]

    calls = []

    def stop_after_two_shards(stage, done, total):
        if done:  # the first call (done 0) is the plan; then one per finished shard
            calls.append(done)
        if len(calls) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        tile_slide(path, tmp_path / "run", CELLS, workers=1, progress=stop_after_two_shards)
    store = tmp_path / "run" / "smear.zarr"
    before = {p: p.stat().st_mtime_ns for p in (store / "tiles").rglob("*") if p.is_file()}
    pending = tile_store.pending_shards(tile_store.open_store(store))
    assert 0 < len(pending) < meta["n_shards"]
    resumed = tile_slide(path, tmp_path / "run", CELLS, workers=1)
    assert not resumed.reused and resumed.shards_written == len(pending)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished shards untouched
    done = tile_store.require_complete(store)
    ref = zarr.open_group(str(reference.path))
    for name in ("coords", "tile_object", "objects/bbox", "objects/centre"):
        np.testing.assert_array_equal(done[name][:], ref[name][:])
    np.testing.assert_array_equal(tile_store.read_shard(done, 0), tile_store.read_shard(ref, 0))
    assert tile_slide(path, tmp_path / "run", CELLS, workers=1).reused


def test_unknown_tiling_is_refused():
    with pytest.raises(OptionError, match="tiling must be one of grid, cells, got 'hex'"):
        TilerConfig(tiling="hex").resolved()


def test_tiling_is_part_of_the_hash():
    assert TilerConfig().hash(0.5) == TilerConfig(tiling="grid").hash(0.5) != TilerConfig(tiling="cells").hash(0.5)


def test_run_follows_the_checkpoints_placement(synthetic, tmp_path):
    """A checkpoint that declares ``placement: cells`` is run with tiles on the objects; --tiling overrides it."""
    from ckpt_util import random_checkpoint

    from wsi_pipeline.pipeline import RunOptions, run_slide

    path, _ = synthetic
    ckpt = random_checkpoint(tmp_path / "cells.safetensors", tile_size=32, tile_mpp=1.0, placement="cells",
                             stain="romanowsky")
    run = run_slide(path, tmp_path / "out", RunOptions(checkpoint=ckpt))
    meta = tile_store.read_meta(tile_store.open_store(run.store))
    assert meta["tiler_config"]["tiling"] == "cells"
    assert run.summary["score"]["over"] == "objects" and run.summary["objects"]["n_objects"] > 0
    grid = run_slide(path, tmp_path / "grid", RunOptions(checkpoint=ckpt, tiling="grid"))
    assert tile_store.read_meta(tile_store.open_store(grid.store))["tiler_config"]["tiling"] == "grid"
    assert grid.summary["score"]["over"] == "tiles" and "objects" not in grid.summary


@pytest.mark.parametrize("ink", ["black", "blue"])
def test_marker_ink_is_neither_an_object_nor_in_an_objects_tile(ink, tmp_path):
    """Synthetic smears with a black or a blue pen stroke: no object on the stroke, no tile mostly over it."""
    from wsi_pipeline.synth import SynthConfig, synthesize

    path = tmp_path / f"{ink}.tiff"
    synthesize(path, SynthConfig(width=2048, height=2048, mpp=0.25, seed=11, fraction=0.0, pen_ink=ink))
    truth = json.loads(path.with_suffix(".truth.json").read_text())
    pen = np.asarray(truth["artifacts"]["pen"]["path"], float)
    with open_slide(path) as slide:
        thumb, ds = slide.thumbnail(2.0)
    mpp = 0.25 * ds
    objects = detect_objects(thumb, foreground_mask(thumb, mpp, "romanowsky"), mpp, ds, tile_um=TILE_UM)
    assert len(objects) >= 10
    assert objects.n_nuclei.max() <= 12  # the stroke is not a "group" of a hundred nuclei
    # distance of each object to the stroke's centre line (sampled densely)
    t = np.linspace(0, 1, 20)[:, None]
    line = np.concatenate([a + t * (b - a) for a, b in zip(pen[:-1], pen[1:])])
    d = np.hypot(objects.centre[:, None, 0] - line[None, :, 0], objects.centre[:, None, 1] - line[None, :, 1]).min(1)
    stroke_width = truth["artifacts"]["pen"]["mask"]["area_px"] / np.hypot(*np.diff(pen, axis=0).T).sum()
    assert (d < stroke_width / 2).sum() == 0


def test_tissue_is_tiled_on_the_grid_under_the_cells_placement(shared_data, tmp_path):
    """An H&E slide has no separate cells to centre on: the cells placement (e.g. the demo student's)
    tiles it on the grid, says so, records it, and a rerun reuses the store."""
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    cells = TilerConfig(target_mpp=0.5, tile_size=128, tiling="cells")
    grid = TilerConfig(target_mpp=0.5, tile_size=128, tiling="grid")
    got = tile_slide(slide, tmp_path / "cells", cells, workers=1)
    ref = tile_slide(slide, tmp_path / "grid", grid, workers=1)
    assert got.n_tiles == ref.n_tiles > 50 and got.empty_reason is None
    group = tile_store.open_store(got.path)
    fg = tile_store.read_store_meta(group).foreground
    assert fg["stain"]["stain"] == "he" and fg["placement"] == "grid"
    assert any("tiled on the grid instead of the cells placement" in w for w in fg["warnings"])
    assert read_objects(group) is None
    np.testing.assert_array_equal(group["coords"][:], tile_store.open_store(ref.path)["coords"][:])
    assert tile_slide(slide, tmp_path / "cells", cells, workers=1).reused


def test_ink_shares_and_peak_shortcuts_equal_their_plain_forms(tmp_path):
    """Speed (issue 11): ink_mask (per-channel tables) equals the plain OD formula, and made
    once on the overview and counted per window it equals the formula on each window; the split's shortcuts (peaks as the global maxima when every
    neighbourhood holds the whole component, no labelling for a single peak) give the labels and
    counts of the plain maximum filter, on every component of a synthetic smear with a black stroke."""
    import math

    from scipy import ndimage as ndi

    from wsi_pipeline.synth import SynthConfig, synthesize
    from wsi_pipeline.tiling import objects as obj

    path = tmp_path / "black.tiff"
    synthesize(path, SynthConfig(width=2048, height=2048, mpp=0.25, seed=11, fraction=0.2, pen_ink="black"))
    with open_slide(path) as slide:
        thumb, ds = slide.thumbnail(2.0)
    mpp, cfg = 0.25 * ds, obj.ObjectConfig()
    mask = foreground_mask(thumb, mpp, "romanowsky")
    glass = obj._glass_rgb(thumb, mask)
    ink = obj.ink_mask(thumb, glass, cfg)

    def plain_ink(rgb):  # the formula itself: OD of every channel, mean and spread over the channel axis
        od = np.log10(np.maximum(glass, 1.0))[None, None, :] - obj._LOG[rgb]
        mean = od.mean(axis=-1)
        return (mean > cfg.ink_od) & (od.max(axis=-1) - od.min(axis=-1) < cfg.ink_spread * mean)

    np.testing.assert_array_equal(ink, plain_ink(thumb))
    assert ink.any()
    h, w = ink.shape
    half = 9
    rr, cc = np.meshgrid(np.arange(0, h, 7), np.arange(0, w, 7), indexing="ij")
    rows, cols = rr.ravel(), cc.ravel()
    want = [plain_ink(thumb[max(r - half, 0):r + half + 1, max(c - half, 0):c + half + 1]).mean()
            for r, c in zip(rows.tolist(), cols.tolist())]
    got = obj._ink_shares(thumb, glass, rows, cols, half, cfg)
    np.testing.assert_array_equal(got, np.asarray(want))
    assert (got > 0).sum() >= 10, got.max()

    min_px = math.pi * (cfg.min_nucleus_um / 2.0) ** 2 / (mpp * mpp)
    comp, _ = ndi.label(obj.nuclear_mask(thumb, mask, cfg, min_px), structure=np.ones((3, 3), bool))
    split_px, covered, several = cfg.split_um / mpp, 0, 0
    for index, sl in enumerate(ndi.find_objects(comp), start=1):
        y0, y1, x0, x1 = max(sl[0].start - 3, 0), sl[0].stop + 3, max(sl[1].start - 3, 0), sl[1].stop + 3
        nuc = comp[y0:y1, x0:x1] == index
        extent = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        for md in (max(1, int(round(split_px))), max(1, int(round(split_px / 2.0)))):
            fast, k_fast = obj._split(nuc, md, min_px, extent)
            plain, k_plain = obj._split(nuc, md, min_px)
            np.testing.assert_array_equal(fast, plain)
            assert k_fast == k_plain
            covered += extent <= md + 1
            several += k_plain > 1
    assert covered > 20 and several > 0
