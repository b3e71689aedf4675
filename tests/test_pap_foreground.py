"""Pap-stained cytology through the foreground stage: blue-green cells are cells, ink is ink.

The synthetic Pap fields (real shipped cells recoloured with the Pap dyes, ``synth.pap_field``)
run on every machine; the real Pap LBC fields, their nucleus labels (tests/data/pap_nuclei.json)
and the BCCD / Aperio material need ../shared/data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage import io

from wsi_pipeline.foreground import decide_stain, detect_foreground, pen_mask
from wsi_pipeline.pipeline import RunOptions, run_slide
from wsi_pipeline.slides import open_slide
from wsi_pipeline.synth import SynthConfig, pap_field, synthesize
from wsi_pipeline.tiling import TilerConfig, tile_slide

HERE = Path(__file__).parent
LABELS = json.loads((HERE / "data" / "pap_nuclei.json").read_text())
FIELD_MPP = 0.5


@pytest.fixture(scope="module")
def fields():
    """Two synthetic Pap fields per ink colour (1024 px at 0.5 um/px, a 100 um stroke)."""
    return {(ink, seed): pap_field(seed, (1024, 1024), FIELD_MPP, pen_ink=ink)
            for ink in ("green", "blue", "black", "red") for seed in (1, 2)}


def test_pap_groups_survive_and_ink_of_four_colours_is_found(fields):
    for (ink, seed), (rgb, truth) in fields.items():
        result = detect_foreground(rgb, FIELD_MPP, "pap")
        stroke = truth["pen"]["mask"]
        groups, cells = truth["group_mask"], truth["cell_mask"]
        # a Pap cell group is never removed: its area off the stroke stays foreground
        off = groups & ~stroke
        assert off.any()
        assert (result.mask & off).sum() / off.sum() > 0.95, (ink, seed)
        assert (result.mask & cells & ~stroke).sum() / (cells & ~stroke).sum() > 0.97, (ink, seed)
        # the stroke away from the cells it crosses is found as ink
        bare = stroke & ~ndi.binary_dilation(cells, iterations=int(15 / FIELD_MPP))
        assert (result.ink & bare).sum() / bare.sum() > 0.88, (ink, seed)
        # what stays foreground there is the red cells seen through the ink (not ink-coloured)
        assert (result.mask & bare).sum() / bare.sum() < 0.15, (ink, seed)


def test_a_pap_cell_group_crossed_by_a_stroke_is_never_removed(fields):
    """Every cell group the stroke crosses (one or three a field, 16 in all) keeps its cells: none
    of its area under the stroke is taken for ink, its area off the stroke stays foreground, and
    no nucleus of it lies on ink (the rule "no region holding nuclei is removed as ink")."""
    crossed = 0
    for (ink, seed), (rgb, truth) in fields.items():
        result = detect_foreground(rgb, FIELD_MPP, "pap")
        stroke = truth["pen"]["mask"]
        lab, n = ndi.label(truth["group_mask"])
        nuclei = np.array([[y, x] for x, y in truth["nuclei"]]).astype(int)
        for i in range(1, n + 1):
            group = lab == i
            on, off = group & stroke, group & ~stroke
            if not on.any():
                continue
            crossed += 1
            assert (result.ink & on).sum() <= 0.02 * on.sum(), (ink, seed, i, "the group under the stroke is ink")
            if off.sum() > 100:
                assert (result.mask & off).sum() / off.sum() > 0.95, (ink, seed, i, "the group off the stroke is lost")
            mine = nuclei[group[nuclei[:, 0], nuclei[:, 1]]]
            assert not result.ink[mine[:, 0], mine[:, 1]].any(), (ink, seed, i, "a group nucleus lies on ink")
    assert crossed >= 8  # (measured: 16, one or three a field)


def test_pen_filter_off_keeps_the_stroke(fields):
    rgb, truth = fields[("green", 1)]
    stroke = truth["pen"]["mask"]
    on = detect_foreground(rgb, FIELD_MPP, "pap")
    off = detect_foreground(rgb, FIELD_MPP, "pap", pen_filter=False)
    assert not off.ink.any()
    assert (off.mask & stroke).sum() / stroke.sum() > 0.9  # the stroke is foreground again
    assert (on.mask & stroke).sum() / stroke.sum() < 0.3  # (cells under it stay with the filter on)


def test_nuclei_are_found_on_synthetic_pap_cells(fields):
    rgb, truth = fields[("blue", 2)]
    found = detect_foreground(rgb, FIELD_MPP, "pap").nuclei
    true = np.array([[y, x] for x, y in truth["nuclei"]])
    dist, _ = cKDTree(found).query(true)
    assert np.mean(dist <= 8) > 0.6  # pale or blurred nuclei are missed; the mask still holds them
    assert 0.5 < len(found) / len(true) < 1.5


def test_ink_is_never_called_on_a_cell_without_context():
    """A lone cyanophilic cell on glass: a cell, not a stroke, whatever its blue-green colour."""
    rgb = np.full((400, 400, 3), 228, np.uint8)
    yy, xx = np.mgrid[:400, :400]
    cell = np.hypot(yy - 200, xx - 200) < 60
    rgb[cell] = (70, 150, 160)  # saturated Light Green cytoplasm
    rgb[np.hypot(yy - 200, xx - 200) < 9] = (40, 40, 110)  # hematoxylin nucleus
    result = detect_foreground(rgb, FIELD_MPP, "pap")
    assert not result.ink.any()
    assert result.mask[cell].mean() > 0.98
    assert len(result.nuclei) == 1


# --------------------------------------------------------------------------- real Pap fields

def test_every_labelled_pap_nucleus_lies_in_a_kept_tile(shared_data, tmp_path):
    folder = shared_data / "pap_fields" / "mendeley_lbc_512"
    hit = total = 0
    for stain in ("auto", "romanowsky"):
        for name, points in LABELS["fields"].items():
            res = tile_slide(folder / f"{name}.jpg", tmp_path / stain, TilerConfig(target_mpp=FIELD_MPP, tile_size=64,
                             stain=stain), mpp=FIELD_MPP, workers=2)
            group = zarr.open_group(str(res.path), mode="r")
            coords = np.asarray(group["coords"][:])
            pts = np.asarray(points, float)
            inside = ((pts[:, :1] >= coords[None, :, 0]) & (pts[:, :1] < coords[None, :, 0] + coords[None, :, 2])
                      & (pts[:, 1:] >= coords[None, :, 1]) & (pts[:, 1:] < coords[None, :, 1] + coords[None, :, 3]))
            hit += int(inside.any(axis=1).sum())
            total += len(pts)
            assert group["qc/nuclei"].shape == (len(coords),)
    assert hit / total >= 0.99, f"{hit}/{total}"


def test_no_pap_field_loses_cells_to_the_ink_rule(shared_data):
    paths = sorted((shared_data / "pap_fields" / "mendeley_lbc_512").glob("*.jpg"))
    assert len(paths) == 80
    for path in paths:
        assert not pen_mask(io.imread(path)[..., :3], FIELD_MPP).any(), path.name


def test_stain_auto_on_real_material(shared_data):
    pap = sorted((shared_data / "pap_fields" / "mendeley_lbc_512").glob("*.jpg"))[1::4]
    got = [decide_stain(io.imread(p)[..., :3], FIELD_MPP)[0].stain for p in pap]
    assert got.count("pap") >= len(got) - 1, got
    blood = sorted((shared_data / "smear_fields").glob("*.jpg"))[1::20]
    got = [decide_stain(io.imread(p)[..., :3], 0.07)[0].stain for p in blood]
    assert got.count("romanowsky") >= len(got) - 1, got
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        thumb, ds = slide.thumbnail(2.0)
    decision = decide_stain(thumb, 0.499 * ds)[0]
    assert decision.stain == "he" and decision.evidence["sheet_share"] > 0.5


# --------------------------------------------------------------------------- slides, CLI, run

@pytest.fixture(scope="module")
def pap_smear(tmp_path_factory):
    path = tmp_path_factory.mktemp("pap") / "pap-smear.tiff"
    synthesize(path, SynthConfig(width=3072, height=3072, mpp=0.5, seed=4, stain="pap", pen_ink="green",
                                 fraction=0.0, regions=0))
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "wsi_pipeline", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_tile_decides_the_stain_records_it_and_warns_about_ink(pap_smear, tmp_path):
    proc = _cli("tile", pap_smear, "--out", tmp_path / "a", "--quiet", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    fg = doc["foreground"]
    assert fg["stain"]["requested"] == "auto" and fg["stain"]["stain"] == "pap"
    assert "od_direction" in fg["stain"]["evidence"] and fg["preset"]["name"] == "pap"
    assert fg["pen_filter"] is True and fg["ink_share"] > 0.03 and fg["n_nuclei"] > 50
    assert "pen-ink rule removed" in proc.stderr and proc.stderr.count("\n") <= 3
    group = zarr.open_group(doc["store"], mode="r")
    assert group.attrs["wsi_triage"]["foreground"] == fg
    assert (group["qc/nuclei"][:] > 0).sum() > 0
    # the escape hatch: no ink removed, a different configuration (and store)
    proc = _cli("tile", pap_smear, "--out", tmp_path / "b", "--quiet", "--json", "--no-pen-filter")
    assert proc.returncode == 0, proc.stderr
    off = json.loads(proc.stdout)
    assert off["foreground"]["pen_filter"] is False and off["foreground"]["ink_share"] == 0
    assert off["tiles"] > doc["tiles"]


def test_run_warns_when_the_checkpoint_was_trained_on_another_stain(pap_smear, tmp_path):
    # the bundled demo student declares stain "romanowsky" (blood cells)
    run = run_slide(pap_smear, tmp_path, RunOptions())
    assert any("trained on romanowsky" in w and "pap-stained" in w for w in run.warnings), run.warnings
