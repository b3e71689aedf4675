"""``--stain auto``: synthetic smears of both stains as the tiler sees them, and the real fields.

The synthetic smears need nothing but the shipped cells; the real Pap LBC, BCCD and H&E material
needs ../shared/data (skipped with the reason otherwise). The thresholds were chosen on tuning
seeds 11-19 (benchmarks/eval_foreground.py); the seeds here are others.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from skimage import io

from wsi_pipeline.foreground import decide_stain, detect_foreground
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


# --------------------------------------------------------------------------- one pixel pass for every preset

def _assert_same_foreground(got, want):
    for name in ("mask", "nuclei", "ink", "ink_spared", "ink_opaque"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert (got.nuclei_in_ink, got.stain) == (want.nuclei_in_ink, want.stain)


@pytest.mark.parametrize("stain,key", [("romanowsky", "small"), ("romanowsky", "blue"), ("pap", "blue")])
def test_decided_foreground_is_the_chosen_presets_own(smears, stain, key):
    # speed (issue 11): decide_stain makes one per-pixel pass for every preset and reuses the Pap
    # stage's nuclei and ink for the chosen preset; what it returns is exactly detect_foreground's
    with open_slide(smears[stain, key]) as slide:
        mpp = slide.require_mpp().x
        thumb, ds = slide.thumbnail(mask_mpp_for(slide, TilerConfig(), mpp), workers=2)
    decision, fg = decide_stain(thumb, mpp * ds, 2)
    assert decision.stain == stain
    _assert_same_foreground(fg, detect_foreground(thumb, mpp * ds, decision.stain, 2))


def test_decided_foreground_on_real_fields_is_the_chosen_presets_own(shared_data):
    # BCCD fields (0.07 um/px: block-averaged, edges redrawn at native resolution) and Pap fields
    bccd = sorted((shared_data / "smear_fields").glob("*.jpg"))[3:200:49]
    pap = sorted((shared_data / "pap_fields" / "mendeley_lbc_512").glob("*.jpg"))[5:80:25]
    decided = []
    for path, mpp in [(p, 0.07) for p in bccd] + [(p, 0.5) for p in pap]:
        rgb = io.imread(path)[..., :3]
        decision, fg = decide_stain(rgb, mpp)
        decided.append(decision.stain)
        _assert_same_foreground(fg, detect_foreground(rgb, mpp, decision.stain))
    assert {"romanowsky", "pap"} <= set(decided), decided


def test_only_presets_passing_the_same_nucleus_pixels_share_the_pap_stage(shared_data):
    # the Pap stage's nuclei, ink and artefacts serve another preset only when its stain test passes
    # the same nucleus pixels (every real field and smear here: nucleus pixels are dark); then its
    # stage with its own stain test is the one it makes alone. A preset too strict for the paler
    # nuclei is not offered (decide_stain makes its stage anew).
    from wsi_pipeline.foreground import StainPreset, get_preset
    from wsi_pipeline.foreground import mask as fgmask

    rgb = io.imread(sorted((shared_data / "pap_fields" / "mendeley_lbc_512").glob("*.jpg"))[3])[..., :3]
    work = fgmask._working_image(rgb, 0.5, 1)
    strict = StainPreset("strict", od_threshold=0.3, saturation_threshold=0.6, min_object_um=4.0, min_foreground=0.05)
    pap, others = get_preset("pap"), (get_preset("romanowsky"), get_preset("he"), strict)
    passes = [fgmask._pixel_pass_presets(work.img, work.mpp, (pap, *others), work.bg)]
    stage, same = fgmask._stained_and_artefacts(work.img, work.mpp, pap, None, work.bg, passes=passes, others=others)
    assert passes == [] and set(same) == set(others[:2])
    alone, alone_same = fgmask._stained_and_artefacts(work.img, work.mpp, pap, None, work.bg)
    assert alone_same == {}
    for preset in others:
        own, _ = fgmask._stained_and_artefacts(work.img, work.mpp, preset, None, work.bg)
        if preset in same:
            stained = np.unpackbits(same[preset], count=own.stained.size).view(bool).reshape(own.stained.shape)
            np.testing.assert_array_equal(stained, own.stained)
            ref = stage
        else:
            assert 0 < len(own.nuclei) < len(stage.nuclei)  # the strict test did drop nucleus pixels
            continue
        for name in ("artefact", "ink", "ink_spared", "ink_opaque"):
            np.testing.assert_array_equal(getattr(ref, name), getattr(own, name), err_msg=name)
        np.testing.assert_array_equal(ref.nuclei.labels, own.nuclei.labels)
        np.testing.assert_array_equal(ref.nuclei.centres, own.nuclei.centres)
    for name in ("stained", "artefact", "ink", "ink_spared", "ink_opaque"):  # the Pap stage is the plain one
        np.testing.assert_array_equal(getattr(stage, name), getattr(alone, name), err_msg=name)
