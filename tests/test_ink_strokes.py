"""Marker ink over blood at the tiler's overview: red cells seen through a stroke are not nuclei,
the stroke is found, its tiles are dropped, and the cells are kept (issue #9).

Everything here runs on every machine: hand-made fields (Beer-Lambert, ink as a transmittance
layer over the coverslip) and synthetic smears of both stains (``wsi-triage synth``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from wsi_pipeline.foreground import MIN_DENSITY, count_in_boxes, detect_foreground, label_nuclei, nucleus_pixels
from wsi_pipeline.foreground.nuclei import keep_nuclei, own_density
from wsi_pipeline.slides import open_slide
from wsi_pipeline.synth import SynthConfig, cell_box_mask, pen_stroke_mask, synthesize
from wsi_pipeline.tiling import TilerConfig, plan_tiles
from wsi_pipeline.tiling.tiler import INK_TILE_SHARE
from wsi_pipeline.foreground import tile_fractions

MPP = 2.0  # the tiler's overview
BLUE_INK = np.array([0.42, 0.52, 0.86])  # transmittance of the synthetic blue marker
GLASS = np.array([240.0, 236.0, 232.0])


def _field(h: int, w: int, seed: int = 0):
    """A blood-like field at 2 um/px: dense pale red cells (4 px discs, OD ~0.15 in red and green,
    below the nuclear density on their own) and a few dark nuclei (OD ~0.5), as OD (h, w, 3)."""
    rng = np.random.default_rng(seed)
    od = np.zeros((h, w, 3))
    yy, xx = np.mgrid[:h, :w]
    for y, x in rng.uniform((0, 0), (h, w), size=(h * w // 40, 2)):  # red cells
        disc = (yy[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4] - y) ** 2 + \
               (xx[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4] - x) ** 2 <= 4
        od[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4][disc] = (0.15, 0.16, 0.12)
    nuclei = rng.uniform((20, 20), (h - 20, w - 20), size=(max(2, h * w // 40000), 2))
    for y, x in nuclei:
        od[(yy - y) ** 2 + (xx - x) ** 2 <= 9] = (0.55, 0.5, 0.3)
    return od, nuclei


def _rgb(od: np.ndarray) -> np.ndarray:
    return np.clip(GLASS * 10.0 ** -od + 0.5, 0, 255).astype(np.uint8)


def _stroke(h: int, w: int, width_px: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.abs((yy - h / 2) - 0.3 * (xx - w / 2)) < width_px / 2


def test_own_density_subtracts_the_ink_under_a_nucleus():
    od, nuclei = _field(400, 400)
    ink_od = -np.log10(BLUE_INK)
    inked = od + ink_od  # the whole field under blue ink: densities add
    pixels = nucleus_pixels(inked[..., 0].astype(np.float32), inked[..., 1].astype(np.float32), MPP)
    found = label_nuclei(pixels, MPP)
    # through the ink, red cells reach the nuclear density: far more "nuclei" than the real ones
    assert len(found) > 5 * len(nuclei)
    od_rg = np.stack([inked[..., 0], inked[..., 1]]).astype(np.float32)
    own = own_density(od_rg, found, np.arange(len(found)), MPP)
    dist, which = cKDTree(found.centres).query(nuclei)
    assert (dist <= 6).all()  # every real nucleus is found (red cells touching it may shift its centre)
    assert (own[which] >= MIN_DENSITY).all()  # and is dense on its own
    real = np.zeros(len(found), bool)
    real[which] = True
    assert (own[~real] < MIN_DENSITY).mean() > 0.95  # red cells are not, once the ink is subtracted
    kept = keep_nuclei(found, own >= MIN_DENSITY)
    assert len(kept) == int((own >= MIN_DENSITY).sum()) and kept.labels.max() == len(kept)


def test_blue_stroke_over_blood_is_ink_and_the_real_cells_under_it_stay():
    h, w = 700, 1200  # 1.4 x 2.4 mm at 2 um/px
    od, nuclei = _field(h, w, seed=1)
    stroke = _stroke(h, w, 120)  # a 240-um stroke, 2.5 mm long
    rgb = _rgb(od + stroke[..., None] * -np.log10(BLUE_INK))
    result = detect_foreground(rgb, MPP, "romanowsky")
    found = result.nuclei
    near_nucleus = np.zeros((h, w), bool)
    near_nucleus[tuple(np.round(nuclei).astype(int).T)] = True
    near_nucleus = ndi.binary_dilation(near_nucleus, iterations=int(15 / MPP))
    bare = stroke & ~near_nucleus
    assert (result.ink & bare).sum() / bare.sum() > 0.9
    # every real nucleus is still found, under the ink or not, and is foreground
    dist = cKDTree(found).query(nuclei)[0]
    assert (dist <= 4).all()
    assert result.mask[tuple(np.round(nuclei).astype(int).T)].all()
    # (almost) no red cell under the ink is left as a nucleus
    fake = cKDTree(nuclei).query(found)[0] > 4
    in_stroke = stroke[tuple(np.round(found).astype(int).T)]
    assert (fake & in_stroke).sum() <= 2, (fake & in_stroke).sum()


def test_a_short_inked_patch_keeps_its_nuclei():
    """Only stroke-shaped regions (>= 1 mm long) are judged against the ink under them: a cell
    group's blue-green cytoplasm is never that long and thin, so it keeps every nucleus."""
    h, w = 300, 300
    od, _ = _field(h, w, seed=2)
    yy, xx = np.mgrid[:h, :w]
    patch = np.hypot(yy - 150, xx - 150) < 60  # a 240-um blob, not a stroke
    rgb = _rgb(od + patch[..., None] * -np.log10(BLUE_INK))
    with_patch = detect_foreground(rgb, MPP, "romanowsky")
    assert not with_patch.ink[patch].any()  # it holds many "nuclei": spared, as before
    assert np.count_nonzero(with_patch.ink_spared & patch) > 0.8 * patch.sum()


# --------------------------------------------------------------------------- synthetic smears


def _smear(tmp_path_factory, stain: str, ink: str, seed: int, size: int = 4096, mpp: float = 1.0):
    path = tmp_path_factory.mktemp(f"{stain}-{ink}") / "smear.tiff"
    synthesize(path, SynthConfig(width=size, height=size, mpp=mpp, seed=seed, stain=stain, pen_ink=ink,
                                 fraction=0.0, regions=0))
    truth = json.loads(path.with_suffix("").with_suffix(".truth.json").read_text())
    with open_slide(path) as slide:
        plan = plan_tiles(slide, TilerConfig(stain=stain), mpp, workers=2)
    return path, truth, plan


def _figures(truth, plan, size: int = 4096):
    ds = plan.thumbnail_downsample
    h, w = plan.thumbnail.shape[:2]
    stroke = pen_stroke_mask(truth["artifacts"]["pen"]["mask"], size, size, int(round(ds)))[:h, :w]
    cells = cell_box_mask(truth, (h, w), ds)
    fg = detect_foreground(plan.thumbnail, plan.thumbnail_mpp, plan.foreground_info["stain"]["stain"])
    bare = stroke & ~ndi.binary_dilation(cells, iterations=int(round(15.0 / plan.thumbnail_mpp)))
    found = (fg.ink & bare).sum() / bare.sum()
    rows, cols = plan.grid_meta["shape"]
    stride, tile0 = plan.grid_meta["stride"][0], plan.grid_meta["tile_level0"][0]
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    boxes = np.stack([np.round(cc.ravel() * stride), np.round(rr.ravel() * stride),
                      np.full(rr.size, tile0), np.full(rr.size, tile0)], 1)
    stroke_tiles = (tile_fractions(stroke, ds, boxes) >= 0.5) & ~(tile_fractions(cells, ds, boxes) > 0)
    kept = {(int(r), int(c)) for r, c in plan.grid}
    n_kept = sum((int(r), int(c)) in kept for r, c in zip(rr.ravel()[stroke_tiles], cc.ravel()[stroke_tiles]))
    pts = np.array([c["nucleus"] for c in truth["cells"] if c["nucleus"] is not None], float)
    group = np.array([c["group"] is not None for c in truth["cells"] if c["nucleus"] is not None])
    c = plan.coords
    inside = ((pts[:, :1] >= c[None, :, 0]) & (pts[:, :1] < c[None, :, 0] + c[None, :, 2])
              & (pts[:, 1:] >= c[None, :, 1]) & (pts[:, 1:] < c[None, :, 1] + c[None, :, 3])).any(axis=1)
    on_ink = tile_fractions(fg.ink, ds, c) >= INK_TILE_SHARE
    return found, n_kept, int(stroke_tiles.sum()), inside, group, on_ink


@pytest.mark.slow
@pytest.mark.parametrize("ink,seed", [("blue", 1), ("green", 2)])
def test_blue_and_green_ink_over_a_romanowsky_smear_is_found_and_its_tiles_dropped(tmp_path_factory, ink, seed):
    _, truth, plan = _smear(tmp_path_factory, "romanowsky", ink, seed)
    found, n_kept, n_stroke, inside, _, on_ink = _figures(truth, plan)
    assert found >= 0.9, f"{ink}: {100 * found:.1f} % of the stroke found"
    # (before the ink was subtracted: 31 / 29 % found, every stroke tile kept)
    assert n_stroke > 0 and n_kept <= 0.6 * n_stroke, f"{ink}: {n_kept}/{n_stroke} stroke tiles kept"
    assert inside.mean() >= 0.995, f"{ink}: nucleated cells in kept tiles {100 * inside.mean():.2f} %"
    # no kept tile lies mostly on ink without a nucleus (the rule the store reports on)
    assert not (on_ink & (plan.nuclei == 0)).any()
    assert isinstance(plan.foreground_info["ink_tiles_dropped"], int)


@pytest.mark.slow
def test_pap_cell_groups_under_and_beside_a_blue_stroke_are_kept(tmp_path_factory):
    _, truth, plan = _smear(tmp_path_factory, "pap", "blue", 1)
    found, n_kept, n_stroke, inside, group, _ = _figures(truth, plan)
    assert found >= 0.9
    assert group.any() and inside[group].all(), "a Pap cell group's nucleus lies outside every kept tile"
    assert inside.mean() >= 0.99  # 99.3 % (the same before the ink change): cells under the stroke


@pytest.mark.slow
def test_a_green_stroke_crossing_pap_cells_is_found_around_the_red_cells_under_it(tmp_path_factory):
    """The Pap green stroke of eval_foreground's seed 1 crosses cell groups, so its region stays stain
    and only its parts beyond 15 um of every "nucleus" are ink; the red cells seen through it count
    as nuclei there. Measured as a distance (a disc) that leaves 96.9 % found; the square of a
    separable dilation kept 15-um squares around each (89.4 %), below the issue's 90 %."""
    _, truth, plan = _smear(tmp_path_factory, "pap", "green", 1, size=8192)
    found, _, _, inside, group, _ = _figures(truth, plan, size=8192)
    assert found >= 0.95, f"{100 * found:.1f} % of the stroke found"
    # the same cells in kept tiles with either shape: 99.7 %, groups 99.9 % (one neutrophil at the
    # smear's edge has no tile either way)
    assert group.any() and inside[group].mean() >= 0.99
    assert inside.mean() >= 0.995


@pytest.mark.slow
@pytest.mark.parametrize("stain", ["romanowsky", "pap"])
def test_tiles_on_opaque_black_ink_are_dropped_unless_a_nucleus_shows(tmp_path_factory, stain):
    """Under black ink nothing of the cells is visible, to the nucleus finder or to the model: a
    tile mostly on it is dropped like one on see-through ink unless a nucleus is found in its part
    off the ink; a tile holding a truth cell whose nucleus lies off the stroke is never dropped."""
    _, truth, plan = _smear(tmp_path_factory, stain, "black", 1)
    fg = detect_foreground(plan.thumbnail, plan.thumbnail_mpp, plan.foreground_info["stain"]["stain"])
    assert fg.ink_opaque.any(), "the black stroke is not judged opaque"
    ds = plan.thumbnail_downsample
    h, w = plan.thumbnail.shape[:2]
    rows, cols = plan.grid_meta["shape"]
    stride, tile0 = plan.grid_meta["stride"][0], plan.grid_meta["tile_level0"][0]
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    boxes = np.stack([np.round(cc.ravel() * stride), np.round(rr.ravel() * stride),
                      np.full(rr.size, tile0), np.full(rr.size, tile0)], 1)
    kept = np.zeros(rows * cols, bool)
    kept[plan.grid[:, 0] * cols + plan.grid[:, 1]] = True
    on_ink = tile_fractions(fg.ink, ds, boxes) >= INK_TILE_SHARE
    see_through = tile_fractions(fg.ink & ~fg.ink_opaque, ds, boxes) >= INK_TILE_SHARE
    nuclei = count_in_boxes(fg.nuclei, ds, boxes)
    dropped = on_ink & ~kept
    assert plan.foreground_info["ink_tiles_dropped"] > 0
    # tiles that only the opaque ink puts over the share are dropped (the rule before kept them all)
    assert (dropped & ~see_through).any(), "no tile on opaque ink was dropped"
    assert not (on_ink & kept & (nuclei == 0)).any()  # no tile mostly on ink, opaque or not, without a nucleus
    assert not (dropped & (nuclei > 0)).any()  # a tile with a nucleus is kept
    # every truth nucleus off the stroke (visible) in a dropped tile lies on the tile's edge, its
    # found nucleus in the kept neighbour (a nucleus is counted in one tile, by its centre)
    stroke = pen_stroke_mask(truth["artifacts"]["pen"]["mask"], 4096, 4096, int(round(ds)))[:h, :w]
    pts = np.array([c["nucleus"] for c in truth["cells"] if c["nucleus"] is not None], float)  # x, y level 0
    visible = ~stroke[np.clip((pts[:, 1] / ds).astype(int), 0, h - 1), np.clip((pts[:, 0] / ds).astype(int), 0, w - 1)]
    tile = (np.clip(pts[:, 1] // stride, 0, rows - 1) * cols + np.clip(pts[:, 0] // stride, 0, cols - 1)).astype(int)
    lost = visible & dropped[tile]
    for x, y in pts[lost]:
        near = ((boxes[:, 0] - ds <= x) & (x < boxes[:, 0] + boxes[:, 2] + ds)
                & (boxes[:, 1] - ds <= y) & (y < boxes[:, 1] + boxes[:, 3] + ds))
        assert (near & kept).any(), f"a visible nucleus at {x:.0f}, {y:.0f} lies in a dropped tile"
