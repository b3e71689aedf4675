"""Synthetic smears: deterministic, readable by OpenSlide, and their ground truth is right."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from wsi_pipeline.cli import main
from wsi_pipeline.errors import WsiTriageError
from PIL import Image

from wsi_pipeline.synth import RENDERER_VERSION, made_with
from wsi_pipeline.synth.smear import (PBC_MPP, SHIPPED_CELLS, SynthConfig, _transmittance, cut_out_cell,
    cut_out_red_cells, list_cells, read_cell_list, synthesize)

REPO = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """OD against the slide's own background (median of its brightest tenth)."""
    f = rgb.astype(np.float32)
    bright = f.sum(axis=2)
    bg = np.median(f[bright >= np.percentile(bright, 90)], axis=0)
    return -np.log(np.clip(f / bg, 1e-3, 1.0))


def _box_mask(shape, boxes, pad=0) -> np.ndarray:
    m = np.zeros(shape, bool)
    for x, y, w, h in boxes:
        m[max(y - pad, 0):y + h + pad, max(x - pad, 0):x + w + pad] = True
    return m


@pytest.fixture(scope="module")
def positive(tmp_path_factory):
    out = tmp_path_factory.mktemp("pos") / "smear.tiff"
    result = synthesize(out, SynthConfig(width=2048, height=1536, seed=5, fraction=0.5))
    return result, json.loads(result.truth.read_text())


@pytest.fixture(scope="module")
def negative(tmp_path_factory):
    out = tmp_path_factory.mktemp("neg") / "smear.tiff"
    result = synthesize(out, SynthConfig(width=2048, height=1536, seed=5, fraction=0.0))
    return result, json.loads(result.truth.read_text())


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    cfg = SynthConfig(width=1280, height=1024, seed=7)
    a = synthesize(tmp_path / "a" / "s.tiff", cfg)
    b = synthesize(tmp_path / "b" / "s.tiff", cfg)
    c = synthesize(tmp_path / "c" / "s.tiff", SynthConfig(width=1280, height=1024, seed=8))
    assert _sha(a.slide) == _sha(b.slide)
    assert a.truth.read_text() == b.truth.read_text()
    assert a.geojson.read_text() == b.geojson.read_text()
    assert _sha(a.slide) != _sha(c.slide)
    assert json.loads(a.truth.read_text())["cells"] != json.loads(c.truth.read_text())["cells"]


def test_truth_boxes_hold_the_placed_cells_and_nothing_dark_lies_outside(positive):
    result, truth = positive
    assert truth["counts"]["cells"] == len(truth["cells"]) > 10
    od = _optical_density(tifffile.imread(result.slide, level=0))
    assert od.shape[:2] == (truth["height"], truth["width"])
    nuclear = od[..., 1] > 1.0  # nuclei and granules; red cells and background stay far below
    for cell in truth["cells"]:
        x, y, w, h = cell["bbox"]
        assert 0 <= x and 0 <= y and x + w <= truth["width"] and y + h <= truth["height"]
        box = od[y:y + h, x:x + w]
        assert (box.sum(axis=2) > 0.3).mean() > 0.3, cell  # the box is filled by a stained object
        if not cell["blurred"]:
            assert nuclear[y:y + h, x:x + w].sum() >= 10, cell
    # Every strongly stained pixel belongs to a listed cell, a listed piece of debris or the pen mark.
    explained = _box_mask(nuclear.shape, [c["bbox"] for c in truth["cells"]] + truth["debris"]
                          + [truth["artifacts"]["pen"]["bbox"]], pad=2)
    assert nuclear.sum() > 1000
    assert (nuclear & ~explained).sum() <= 20


def test_glass_is_bright_and_lit_like_the_cells_and_red_cells_keep_their_source_colour(positive):
    result, truth = positive
    rgb = tifffile.imread(result.slide, level=0).astype(np.float32)
    bright = rgb.sum(axis=2)
    glass = np.median(rgb[bright >= np.percentile(bright, 90)], axis=0)
    # one white balance for glass and cells, the cell images' own (as any scanner lights a slide;
    # the shipped PBC cells: peach glass), within the seed's faint cast
    source_bg = np.median([_transmittance(np.asarray(Image.open(SHIPPED_CELLS / rel).convert("RGB")))[1]
                           for rel in list_cells(SHIPPED_CELLS).relpaths[::8][:40]], axis=0)
    assert glass.mean() >= 205, glass
    np.testing.assert_allclose(glass / glass.max(), source_bg / source_bg.max(), atol=0.04)
    np.testing.assert_allclose(np.asarray(truth["glass_rgb"]) / max(truth["glass_rgb"]), source_bg / source_bg.max(),
                               atol=0.04)
    # red cells: stained pixels outside every listed object (cells, debris, pen, blurred patch)
    listed = _box_mask(bright.shape, [c["bbox"] for c in truth["cells"]] + truth["debris"], pad=8)
    listed |= _box_mask(bright.shape, [truth["artifacts"]["pen"]["bbox"]], pad=80)
    listed |= _box_mask(bright.shape, [truth["artifacts"]["blur"]["bbox"]], pad=20)
    od = -np.log10(np.clip(rgb.mean(axis=2) / glass.mean(), 1e-3, 1.0))
    red = ~listed & (od > 0.06) & (od < 0.3)
    assert red.mean() > 0.05
    synth_rbc = np.median(rgb[red], axis=0)
    # the same red cells as they look in their source images (absolute colour, salmon pink)
    source = []
    for rel in list_cells(SHIPPED_CELLS).relpaths[::8][:40]:
        img = np.asarray(Image.open(SHIPPED_CELLS / rel).convert("RGB"))
        _, bg = _transmittance(img)
        source += [np.median(k[m].astype(np.float32) / 255.0 * bg, axis=0) for k, m in cut_out_red_cells(img, PBC_MPP)]
    source_rbc = np.median(np.array(source), axis=0)
    assert len(source) >= 30
    # pink: red well above green and blue (plain transmittance on neutral glass gave lavender, B > R)
    assert synth_rbc[0] > synth_rbc[2] + 20 and synth_rbc[0] > synth_rbc[1] + 20, synth_rbc
    np.testing.assert_allclose(synth_rbc[0] / synth_rbc[1:], source_rbc[0] / source_rbc[1:], rtol=0.06)


def test_empty_fields_are_bare_glass(tmp_path):
    result = synthesize(tmp_path / "e.tiff", SynthConfig(width=2048, height=2048, seed=4, fraction=0.0))
    truth = json.loads(result.truth.read_text())
    fields = truth["empty_fields"]
    assert fields  # seed 4 leaves a corner of this slide empty
    empty = _box_mask((truth["height"], truth["width"]), fields)
    cells = _box_mask(empty.shape, [c["bbox"] for c in truth["cells"]])
    assert not (empty & cells).any()
    rgb = tifffile.imread(result.slide, level=0).astype(np.float32)
    glass = empty & ~_box_mask(empty.shape, truth["debris"] + [truth["artifacts"]["pen"]["bbox"]], pad=4)
    assert glass.sum() > 0.5 * empty.sum()
    # OD against the glass of the empty fields (the illumination drifts by a few % across a slide)
    od = -np.log(np.clip(rgb / np.median(rgb[glass], axis=0), 1e-3, None)).sum(axis=2)
    assert (od[glass] > 0.25).mean() < 1e-3  # nothing stained there
    assert (od[~empty] > 0.25).mean() > 0.1  # unlike the rest of the slide


def test_openslide_opens_it_as_a_generic_tiff_pyramid_with_the_pixel_size(positive):
    import openslide

    from wsi_pipeline.slides import open_slide, slide_info

    result, truth = positive
    with openslide.OpenSlide(str(result.slide)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25)
        assert s.level_count == len(truth["levels"]) >= 2
        assert [list(d) for d in s.level_dimensions] == truth["levels"]
        assert s.level_downsamples[1] == pytest.approx(2.0)
        x, y, w, h = truth["cells"][0]["bbox"]
        region = np.asarray(s.read_region((x, y), 0, (w, h)).convert("RGB")).astype(int)
    direct = tifffile.imread(result.slide, level=0)[y:y + h, x:x + w].astype(int)
    assert np.abs(region - direct).mean() < 2.0
    with open_slide(str(result.slide)) as s:
        info = slide_info(s)
    assert info["mpp"]["source"] == "tiff-resolution"
    assert info["mpp"]["x"] == pytest.approx(0.25)


def test_suspicious_cells_only_inside_planted_regions_at_the_fraction(positive):
    _, truth = positive
    assert truth["label"] == "positive"
    regions = truth["planted_regions"]
    assert regions and all(r["n_cells"] >= 4 for r in regions)
    suspicious = [c for c in truth["cells"] if c["suspicious"]]
    assert len(suspicious) == truth["counts"]["suspicious"] > 0
    for c in truth["cells"]:
        assert c["suspicious"] == (c["class"] in ("erythroblast", "ig"))
    for c in suspicious:
        rx, ry, rw, rh = regions[c["region"]]["bbox"]
        x, y, w, h = c["bbox"]
        assert rx <= x + w / 2 < rx + rw and ry <= y + h / 2 < ry + rh
    for i, r in enumerate(regions):
        members = [c for c in truth["cells"] if c["region"] == i]
        assert r["n_suspicious"] == sum(c["suspicious"] for c in members) == max(1, round(0.5 * len(members)))


def test_fraction_zero_gives_a_negative_slide_with_the_same_layout(positive, negative):
    _, pos = positive
    _, neg = negative
    assert neg["label"] == "negative"
    assert neg["counts"]["suspicious"] == 0
    assert not any(c["suspicious"] or c["class"] in ("erythroblast", "ig") for c in neg["cells"])
    assert [r["bbox"] for r in neg["planted_regions"]] == [r["bbox"] for r in pos["planted_regions"]]
    outside = lambda t: [c for c in t["cells"] if c["region"] is None]  # noqa: E731
    assert outside(neg) == outside(pos)  # only the planted cells differ


def test_only_cells_from_the_list_are_used(tmp_path):
    pool = list_cells()
    allowed = [r for cls in pool.classes for r in [p for p in pool.relpaths if p.startswith(cls + "/")][:3]]
    listing = tmp_path / "allowed.txt"
    listing.write_text("# three per class\n" + "\n".join(allowed) + "\n")
    cfg = SynthConfig(width=1536, height=1024, seed=3, cell_list=read_cell_list(listing),
                      cell_list_name=str(listing))
    result = synthesize(tmp_path / "s.tiff", cfg)
    truth = json.loads(result.truth.read_text())
    used = {c["source"] for c in truth["cells"]}
    assert used and used <= set(allowed)
    assert truth["cells_source"]["n_images"] == len(allowed)
    assert truth["cells_source"]["list"] == str(listing)

    with pytest.raises(WsiTriageError, match="not there"):
        list_cells(None, allowed + ["ig/not_a_cell.jpg"])
    assert made_with(result.truth, cfg)
    assert not made_with(result.truth, replace(cfg, cell_list=tuple(allowed[:-1])))  # another list, same name


def test_a_smear_is_reused_only_when_this_renderer_drew_it_from_the_same_settings(positive, tmp_path):
    result, truth = positive
    cfg = SynthConfig(width=2048, height=1536, seed=5, fraction=0.5)
    assert truth["renderer_version"] == RENDERER_VERSION
    assert made_with(result.truth, cfg)
    assert made_with(result.truth, replace(cfg, workers=1))  # encoder threads draw no pixel
    for other in (replace(cfg, seed=6), replace(cfg, fraction=0.25), replace(cfg, width=4096),
                  replace(cfg, stain="pap"), replace(cfg, pen_ink="red"), replace(cfg, quality=90)):
        assert not made_with(result.truth, other)
    # a smear drawn by an earlier renderer (the 60,000 px benchmark smear was once measured so)
    old = tmp_path / "old.truth.json"
    for version in (None, RENDERER_VERSION - 1):
        doc = dict(truth)
        doc.pop("renderer_version")
        if version is not None:
            doc["renderer_version"] = version
        old.write_text(json.dumps(doc))
        assert not made_with(old, cfg)
    assert not made_with(tmp_path / "missing.truth.json", cfg)
    old.write_text("{not json")
    assert not made_with(old, cfg)


def test_evaluation_slides_from_the_held_out_pbc_list(shared_data, tmp_path):
    heldout = read_cell_list(REPO / "configs" / "pbc_heldout.txt")
    cfg = SynthConfig(width=1536, height=1024, seed=11, cells=shared_data / "pbc", cell_list=heldout)
    truth = json.loads(synthesize(tmp_path / "e.tiff", cfg).truth.read_text())
    assert {c["source"] for c in truth["cells"]} <= set(heldout)
    assert truth["label"] == "positive"


def test_shipped_cells_are_held_out_and_cut_from_their_background():
    heldout = set(read_cell_list(REPO / "configs" / "pbc_heldout.txt"))
    pool = list_cells(SHIPPED_CELLS)
    assert set(pool.classes) == {"basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte",
                                 "neutrophil", "platelet"}
    assert 200 <= len(pool.relpaths) <= 600 and set(pool.relpaths) <= heldout
    assert sum(f.stat().st_size for f in SHIPPED_CELLS.rglob("*.jpg")) < 5e6
    assert "CC BY 4.0" in (SHIPPED_CELLS / "ATTRIBUTION.md").read_text()
    from PIL import Image

    for rel in pool.relpaths[::12]:
        rgb = np.asarray(Image.open(SHIPPED_CELLS / rel).convert("RGB"))
        k, mask = cut_out_cell(rgb)
        assert 0.01 < mask.sum() / rgb[..., 0].size < 0.45, rel  # one cell, not the field around it
        assert (k[~mask] >= 235).mean() > 0.9, rel  # outside the cell: clear


def test_geojson_is_a_qupath_feature_collection(positive):
    result, truth = positive
    gj = json.loads(result.geojson.read_text())
    assert gj["type"] == "FeatureCollection"
    cells = [f for f in gj["features"] if f["properties"]["classification"]["name"] in truth["cells_source"]["classes"]]
    assert len(cells) == len(truth["cells"])
    for f, c in zip(cells, truth["cells"]):
        assert f["geometry"]["type"] == "Polygon"
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == c["class"]
        ring = np.array(f["geometry"]["coordinates"][0])
        x, y, w, h = c["bbox"]
        assert ring.min(axis=0).tolist() == [x, y] and ring.max(axis=0).tolist() == [x + w, y + h]
    names = {f["properties"]["classification"]["name"] for f in gj["features"]}
    assert {"Planted region", "Pen mark", "Blurred patch"} <= names


def test_cli_synth_writes_slide_and_truth_and_reports_speed(tmp_path):
    out = tmp_path / "demo.tiff"
    res = CliRunner().invoke(main, ["synth", str(out), "--size", "1280x1024", "--seed", "2", "--fraction", "0",
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["label"] == "negative" and summary["mpx_per_second"] > 0
    assert out.is_file() and (tmp_path / "demo.truth.json").is_file() and (tmp_path / "demo.truth.geojson").is_file()

    res = CliRunner().invoke(main, ["synth", str(tmp_path / "x.tiff"), "--size", "100x100"])
    assert res.exit_code == 2 and res.output.strip().startswith("error: --size must be between 256 and")
    res = CliRunner().invoke(main, ["synth", str(tmp_path / "x.tiff"), "--suspicious", "blast"])
    assert res.exit_code == 2 and "blast" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.tiff").exists()


_PEAK_RSS = """
import json, resource, sys
from wsi_pipeline.synth import SynthConfig, synthesize
w, h = int(sys.argv[1]), int(sys.argv[2])
r = synthesize(sys.argv[3], SynthConfig(width=w, height=h, seed=1, workers=2))
# VmHWM is this process image's own peak; ru_maxrss would include the RSS of the (large) pytest
# process this one was forked from, which Linux carries across exec.
try:
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mib": peak, "levels": r.levels}))
"""


def _peak_rss_mib(tmp_path: Path, w: int, h: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(w), str(h), str(tmp_path / f"{w}x{h}.tiff")],
                         capture_output=True, text=True, env=env, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


@pytest.mark.slow
def test_memory_does_not_grow_with_slide_height_and_stays_bounded_at_100k_width(tmp_path):
    pytest.importorskip("resource")
    small = _peak_rss_mib(tmp_path, 1024, 1024)
    tall = _peak_rss_mib(tmp_path, 1024, 32768)  # 96 MiB of RGB at level 0
    wide = _peak_rss_mib(tmp_path, 100_000, 256)  # one band of a 100,000 px wide slide
    assert tall - small < 48, (small, tall)
    assert wide < 1024, wide


def test_ome_tiff_option_writes_a_deterministic_subifd_pyramid(tmp_path):
    cfg = SynthConfig(width=1280, height=1024, seed=4, ome=True)
    a = synthesize(tmp_path / "a" / "s.ome.tiff", cfg)
    b = synthesize(tmp_path / "b" / "s.ome.tiff", cfg)
    assert _sha(a.slide) == _sha(b.slide)
    assert a.truth.name == "s.truth.json"
    with tifffile.TiffFile(a.slide) as tif:
        assert tif.is_ome
        assert [lv.shape for lv in tif.series[0].levels] == [(1024, 1280, 3), (512, 640, 3)]
        assert 'PhysicalSizeX="0.25"' in tif.ome_metadata


def test_truth_has_nucleus_centres_groups_and_the_rendered_pen_stroke(positive):
    from wsi_pipeline.synth import pen_stroke_mask

    result, truth = positive
    assert truth["stain"] == "romanowsky" and truth["config"]["pen_ink"] == "random"
    rgb = tifffile.imread(result.slide, level=0)
    od = _optical_density(rgb)
    nuclear = od[..., 1] > 1.0
    sharp = [c for c in truth["cells"] if c["nucleus"] is not None and not c["blurred"]]
    assert len(sharp) >= 0.8 * len(truth["cells"]) > 10
    for c in sharp:
        x, y = c["nucleus"]
        bx, by, bw, bh = c["bbox"]
        assert bx <= x < bx + bw and by <= y < by + bh, c
    near = [nuclear[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4].any() for x, y in (c["nucleus"] for c in sharp)]
    assert np.mean(near) >= 0.9
    # groups list the clustered cells
    for g in truth["groups"]:
        members = [c for c in truth["cells"] if c["group"] == g["id"]]
        assert len(members) == g["n_cells"] >= 1
    # the stroke mask is where the ink was rendered: darker than the glass around it
    pen = truth["artifacts"]["pen"]
    mask = pen_stroke_mask(pen["mask"], truth["width"], truth["height"])
    assert mask.sum() == pen["mask"]["area_px"] > 1000
    x, y, w, h = pen["mask"]["bbox"]
    px, py, pw, ph = pen["bbox"]
    assert px <= x and py <= y and x + w <= px + pw and y + h <= py + ph
    ink = np.asarray(pen["ink_transmittance"])
    inky = -np.log(np.clip(ink, 1e-3, 1)).sum() * 0.4  # at least 40 % of the ink's density
    assert (od.sum(axis=2)[mask] > inky).mean() > 0.8
