"""``--stain auto``: synthetic smears of both stains as the tiler sees them, and the real fields.

The synthetic smears need nothing but the shipped cells; the real Pap LBC, BCCD and H&E material
needs ../shared/data (skipped with the reason otherwise). The thresholds were chosen on tuning
seeds 11-19 (benchmarks/eval_foreground.py); the seeds here are others.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from skimage import io

from wsi_pipeline.foreground import decide_stain
from wsi_pipeline.slides import open_slide
from wsi_pipeline.synth import SynthConfig, synthesize
from wsi_pipeline.tiling import TilerConfig, mask_mpp_for


def _overview_decision(path):
    """The decision ``wsi-triage tile`` makes: decide_stain on the tiler's overview."""
    with open_slide(path) as slide:
        mpp = slide.require_mpp().x
        thumb, ds = slide.thumbnail(mask_mpp_for(slide, TilerConfig(), mpp), workers=2)
    return decide_stain(thumb, mpp * ds, 2)[0]


@pytest.fixture(scope="module")
def smears(tmp_path_factory):
    """Both stains from the shipped cells: 2048 px at 0.25 um/px (the eval_triage smears' size) and
    a 4096 px one at 1 um/px under a blue stroke (ink the pen rule spares near nuclei)."""
    root = tmp_path_factory.mktemp("stain-auto")
    out = {}
    for stain in ("romanowsky", "pap"):
        for key, cfg in (("small", dict(width=2048, height=2048, mpp=0.25, seed=41)),
                         ("blue", dict(width=4096, height=4096, mpp=1.0, seed=42, pen_ink="blue", fraction=0.0))):
            path = root / f"{stain}-{key}.tiff"
            synthesize(path, SynthConfig(stain=stain, **cfg))
            out[stain, key] = path
    return out


@pytest.mark.parametrize("key", ["small", "blue"])
def test_synthetic_romanowsky_smear_is_romanowsky(smears, key):
    decision = _overview_decision(smears["romanowsky", key])
    assert decision.stain == "romanowsky", decision.as_dict()
    # the reason names the figures it was decided on
    red = decision.evidence["od_direction"][0]
    assert f"{red:.2f}" in decision.reason


def test_blue_ink_spared_near_nuclei_is_left_out_of_the_colour(smears):
    decision = _overview_decision(smears["romanowsky", "blue"])
    assert decision.evidence["ink_px_left_out"] > 0, decision.as_dict()


@pytest.mark.parametrize("key", ["small", "blue"])
def test_synthetic_pap_smear_is_pap(smears, key):
    decision = _overview_decision(smears["pap", key])
    assert decision.stain == "pap", decision.as_dict()
    assert decision.reason and "od_direction" in decision.evidence


def test_tile_runs_a_romanowsky_smear_with_the_romanowsky_preset(smears, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wsi_pipeline", "tile", str(smears["romanowsky", "small"]),
                           "--out", str(tmp_path / "t"), "--quiet", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    fg = json.loads(proc.stdout)["foreground"]
    assert fg["stain"]["requested"] == "auto" and fg["stain"]["stain"] == "romanowsky", fg["stain"]
    assert fg["preset"]["name"] == "romanowsky"


# --------------------------------------------------------------------------- real material (../shared)

def test_real_pap_fields_are_pap(shared_data):
    paths = sorted((shared_data / "pap_fields" / "mendeley_lbc_512").glob("*.jpg"))
    assert len(paths) == 80
    got = [decide_stain(io.imread(p)[..., :3], 0.5)[0].stain for p in paths[1::2]]  # the held-out half
    assert got.count("pap") == len(got), got


def test_real_bccd_fields_are_romanowsky(shared_data):
    paths = sorted((shared_data / "smear_fields").glob("*.jpg"))
    held_out = [p for i, p in enumerate(paths) if i % 8][::6]
    got = [decide_stain(io.imread(p)[..., :3], 0.07)[0].stain for p in held_out]
    assert got.count("romanowsky") >= len(got) - 1, got


def test_real_pbc_cells_smear_is_romanowsky(shared_data, tmp_path):
    path = tmp_path / "pbc.tiff"
    synthesize(path, SynthConfig(width=3072, height=3072, mpp=0.25, seed=43, cells=shared_data / "pbc"))
    decision = _overview_decision(path)
    assert decision.stain == "romanowsky", decision.as_dict()
