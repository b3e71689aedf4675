"""Pap-stained synthetic material: dye physics, Pap fields in memory, pen inks, truth of the stroke."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from wsi_pipeline.cli import main
from wsi_pipeline.synth import SHIPPED_CELLS, SynthConfig, list_cells, pap_field, pen_stroke_mask, synthesize
from wsi_pipeline.synth.layout import Layout
from wsi_pipeline.synth.pap import EOSIN_Y, HEMATOXYLIN, LIGHT_GREEN, ORANGE_G, RED_CELL_DYE
from wsi_pipeline.synth.render import Renderer
from wsi_pipeline.synth.sprites import SpriteBank


def _angle(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def _hsv(rgb: np.ndarray):
    f = rgb.astype(np.float32) / 255.0
    mx, mn = f.max(axis=-1), f.min(axis=-1)
    s = np.where(mx > 0, 1 - mn / np.maximum(mx, 1e-6), 0)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60
    return h, s, mx


@pytest.fixture(scope="module")
def fields():
    return {seed: pap_field(seed) for seed in (0, 2)}


def test_dye_vectors_follow_the_published_spectra():
    for v in (HEMATOXYLIN, LIGHT_GREEN, ORANGE_G, EOSIN_Y, RED_CELL_DYE):
        assert v.shape == (3,) and abs(np.linalg.norm(v) - 1) < 1e-5 and (v > 0).all()
    # Light Green SF absorbs red (max 630 nm): it passes green and blue (blue-green)
    assert LIGHT_GREEN[0] > 3 * max(LIGHT_GREEN[1], LIGHT_GREEN[2])
    # Orange G (478 nm) absorbs blue most, eosin Y (517 nm) green most, hematoxylin red and green
    assert ORANGE_G.argmax() == 2 and EOSIN_Y.argmax() == 1
    assert min(HEMATOXYLIN[:2]) > 2 * HEMATOXYLIN[2]
    # close to the vectors Ruifrok & Johnston (2001) measured on an RGB camera
    assert _angle(HEMATOXYLIN, (0.650, 0.704, 0.286)) < 10
    assert _angle(EOSIN_Y, (0.072, 0.990, 0.105)) < 25


def test_pap_field_is_deterministic_and_seed_dependent(fields):
    rgb, truth = fields[0]
    again, truth2 = pap_field(0)
    assert rgb.dtype == np.uint8 and rgb.shape == (1024, 1024, 3)
    assert np.array_equal(rgb, again) and truth["nuclei"] == truth2["nuclei"]
    assert not np.array_equal(rgb, fields[2][0])
    assert truth["stain"] == "pap" and truth["pen"]["ink"] == "none" and truth["pen"]["area_px"] == 0
    assert not truth["pen"]["mask"].any()


def test_nucleus_centres_lie_on_dark_hematoxylin_and_cells_are_real(fields):
    for rgb, truth in fields.values():
        assert len(truth["nuclei"]) >= 20
        glass = np.asarray(truth["glass_rgb"], np.float32)
        od = -np.log10(np.clip(rgb.astype(np.float32) / glass, 1e-3, 1))
        # hematoxylin: dense, absorbing red and green far more than blue
        hem = (od.sum(axis=2) > 0.6) & (od[..., 2] < 0.8 * np.minimum(od[..., 0], od[..., 1]))
        sharp = [c["nucleus"] for c in truth["cells"] if c["nucleus"] is not None and not c["blurred"]]
        assert len(sharp) >= 15

        def near(x, y, r=3):  # within 1.5 um (lobed nuclei: the centroid may fall between lobes)
            return hem[int(round(y)) - r:int(round(y)) + r + 1, int(round(x)) - r:int(round(x)) + r + 1].any()

        good = sum(near(x, y) for x, y in sharp)
        assert good >= 0.95 * len(sharp), (good, len(sharp))
        # and not anywhere: points shifted by 12 um mostly miss a nucleus
        shifted = sum(near(min(x + 24, 1020), y) for x, y in sharp)
        assert shifted < 0.5 * len(sharp), shifted
        # the cells come from the shipped image pool
        pool = set(list_cells(SHIPPED_CELLS).relpaths)
        assert all(c["source"] in pool for c in truth["cells"])


def test_cyanophilic_cytoplasm_has_the_colour_the_old_pen_rule_calls_ink(fields):
    """The point of the material: saturated blue-green cells (hue 140-250, G >= R, saturation
    >= 0.4 is what foreground.pen_mask took for green/blue ink before issue 9)."""
    for rgb, truth in fields.values():
        cyto = truth["cell_mask"] & ~truth["pen"]["mask"]
        h, s, v = _hsv(rgb)
        inky = (h >= 140) & (h <= 250) & (rgb[..., 1] >= rgb[..., 0]) & (s >= 0.4)
        assert cyto.sum() > 20000
        assert inky[cyto].mean() > 0.25, inky[cyto].mean()
        # red cells and glass are not blue-green
        assert inky[~truth["cell_mask"]].mean() < 0.01


def test_groups_are_cohesive_sheets(fields):
    from scipy import ndimage as ndi

    n_groups = 0
    for _, truth in fields.values():
        for g in truth["groups"]:
            x, y, w, h = g["bbox"]
            if g["n_cells"] < 8:
                continue
            n_groups += 1
            sub = truth["group_mask"][y:y + h, x:x + w]
            lab, n = ndi.label(sub)
            sizes = np.bincount(lab.ravel())[1:]
            # the cells touch: one connected sheet holds most of the group's area
            assert sizes.max() >= 0.85 * sizes.sum(), (g, sizes)
            members = [c for c in truth["cells"] if c["group"] == g["id"]]
            assert len(members) == g["n_cells"]
            assert all(c["class"] not in ("lymphocyte", "platelet") for c in members)
    assert n_groups >= 2


@pytest.mark.parametrize("ink", ["green", "blue", "black", "red"])
def test_pen_ink_colours_and_stroke_mask(ink):
    rgb, truth = pap_field(3, pen_ink=ink)
    pen = truth["pen"]
    assert pen["ink"] == ink and pen["area_px"] == pen["mask"].sum() > 20000
    x, y, w, h = pen["bbox"]
    assert not pen["mask"][:y].any() and not pen["mask"][y + h:].any() and not pen["mask"][:, x + w:].any()
    glass = np.asarray(truth["glass_rgb"], np.float32)
    t = rgb.astype(np.float32) / glass
    stroke = pen["mask"] & ~truth["cell_mask"]
    core = np.median(t[stroke], axis=0)
    outside = np.median(t[~pen["mask"] & ~truth["cell_mask"]], axis=0)
    assert (core < outside - 0.04).any()  # the stroke is darker than what lies beside it
    if ink == "red":  # scarlet: red passes, green and blue absorbed about equally
        assert core[0] > core[1] + 0.25 and abs(core[1] - core[2]) < 0.1, core
    elif ink == "green":
        assert core[1] == core.max() and core[1] > core[0] + 0.1, core
    elif ink == "blue":
        assert core[2] == core.max() and core[2] > core[0] + 0.2, core
    else:
        assert core.max() < 0.6 and np.ptp(core) < 0.1, core


def test_a_named_ink_draws_the_same_slide_as_random():
    """--pen-ink X changes the ink only: random draws the same numbers (existing seeds keep their bytes)."""
    pool = list_cells()
    base = SynthConfig(width=1024, height=1024, seed=4, regions=1)
    bank = SpriteBank(pool, base.cells_mpp / base.mpp, base.cells_mpp, base.mpp, base.seed)
    lay = Layout(base, pool, bank)
    drawn = lay.pen_ink_name
    assert drawn in ("blue", "green", "black")
    x, y, w, h = lay.pen_bbox
    win = (max(y - 64, 0), min(y + h + 64, 1024), max(x - 64, 0), min(x + w + 64, 1024))
    ref = Renderer(lay).render(*win)
    for ink in ("blue", "green", "black", "red"):
        cfg = SynthConfig(width=1024, height=1024, seed=4, regions=1, pen_ink=ink)
        other = Layout(cfg, pool, SpriteBank(pool, cfg.cells_mpp / cfg.mpp, cfg.cells_mpp, cfg.mpp, cfg.seed))
        assert other.pen_bbox == lay.pen_bbox and other.pen_ink_name == ink
        img = Renderer(other).render(*win)
        assert np.array_equal(img, ref) == (ink == drawn), ink


def test_cli_writes_a_pap_smear_with_stain_ink_and_stroke_in_its_truth(tmp_path):
    out = tmp_path / "pap.tiff"
    res = CliRunner().invoke(main, ["synth", str(out), "--size", "2048x1536", "--mpp", "0.5", "--seed", "6",
                                    "--stain", "pap", "--pen-ink", "red", "--quiet"])
    assert res.exit_code == 0, res.output
    truth = json.loads((tmp_path / "pap.truth.json").read_text())
    assert truth["stain"] == "pap" and truth["config"]["stain"] == "pap" and truth["config"]["pen_ink"] == "red"
    pen = truth["artifacts"]["pen"]
    assert pen["ink"] == "red" and pen["ink_transmittance"] == [0.85, 0.3, 0.33]
    mask = pen_stroke_mask(pen["mask"], truth["width"], truth["height"])
    assert mask.sum() == pen["mask"]["area_px"] > 0
    rgb = tifffile.imread(out, level=0).astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    scarlet = (r > g + 60) & (np.abs(g - b) < 25)  # pale orange-red Pap red cells stay below
    assert scarlet[mask].mean() > 0.8  # the rendered stroke is where the truth says
    assert scarlet[~mask].mean() < 0.01
    # a mask at a coarser scale covers the same share of the slide
    small = pen_stroke_mask(pen["mask"], truth["width"], truth["height"], downsample=8)
    assert small.shape == (192, 256) and abs(small.mean() - mask.mean()) < 0.01
    assert truth["groups"] and all(c["nucleus"] is not None for c in truth["cells"] if c["class"] != "platelet")
    assert "stain=pap" in tifffile.TiffFile(out).pages[0].description


def test_cli_rejects_an_unknown_stain_or_ink(tmp_path):
    for opt in (["--stain", "he"], ["--pen-ink", "purple"]):
        res = CliRunner().invoke(main, ["synth", str(tmp_path / "x.tiff"), "--size", "512", *opt])
        assert res.exit_code == 2 and "Traceback" not in res.output
        assert not (tmp_path / "x.tiff").exists()


def test_library_config_checks_stain_and_ink(tmp_path):
    from wsi_pipeline.errors import WsiTriageError

    with pytest.raises(WsiTriageError, match="stain must be one of romanowsky, pap, got 'giemsa'"):
        synthesize(tmp_path / "a.tiff", SynthConfig(width=512, height=512, stain="giemsa"))
    with pytest.raises(WsiTriageError, match="pen_ink must be one of .*, got 'purple'"):
        synthesize(tmp_path / "a.tiff", SynthConfig(width=512, height=512, pen_ink="purple"))
