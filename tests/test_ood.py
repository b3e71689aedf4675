"""The out-of-domain flag: statistics in the checkpoint, per-tile distances in the store, slide status.

Real models and images: the bundled demo student, the shipped held-out cells, synthetic smears of
them, and (when ../shared/data is present) the H&E slides and non-blood images it must flag."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ckpt_util import random_checkpoint
from wsi_contracts import tilestore as tile_store
from wsi_contracts.errors import CheckpointError
from wsi_pipeline.scoring import DEFAULT_CHECKPOINT, load_checkpoint, read_checkpoint_info
from wsi_pipeline.scoring import SLIDE_FRACTION, OodStats, ood_distance, ood_summary
from wsi_pipeline.pipeline import RunOptions, rank_rows, run_batch, run_slide
from wsi_pipeline.scoring import predict_probs, predict_probs_ood, read_ood, read_scores
from wsi_pipeline.synth import SHIPPED_CELLS, SynthConfig, synthesize

#: digest of the demo student's model tensors (names, dtypes, bytes) as fine-tuned (the export of
#: `distill.finetune`, wsi_pipeline/data/DEMO_STUDENT.md): the OOD statistics, calibration and placement were
#: added afterwards without touching a weight, so every probability is the fine-tune's
DEMO_WEIGHTS_DIGEST = "08cc6f0f8e00adefa411e212c06b2968724602bac55226ef06c1acf70d484231"


def weights_digest(path: Path) -> str:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    h = hashlib.sha256()
    for k in sorted(tensors):
        if k.startswith("ood."):
            continue
        h.update(k.encode())
        h.update(str(tensors[k].dtype).encode())
        h.update(tensors[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def demo():
    return load_checkpoint(None)


def test_demo_student_carries_ood_statistics_with_unchanged_weights(demo):
    assert weights_digest(DEFAULT_CHECKPOINT) == DEMO_WEIGHTS_DIGEST
    assert demo.ood is not None and demo.info.ood is not None
    assert demo.ood.class_means.shape == (9, 384) and demo.ood.precision.shape == (384, 384)
    assert demo.ood.threshold > 0 and demo.info.ood["method"] == "mahalanobis_tied"
    # the OOD path returns the very probabilities of the plain forward pass
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (5, 128, 128, 3), dtype=np.uint8)
    p_plain = predict_probs(demo.model, demo.info, tiles)
    p_ood, d = predict_probs_ood(demo.model, demo.info, tiles, ood=demo.ood)
    np.testing.assert_array_equal(p_plain, p_ood)
    assert d.shape == (5,) and np.isfinite(d).all()


def test_held_out_cells_are_in_domain_and_noise_is_not(demo):
    """PBC cells no model was trained on (shipped with the package) lie near the training features."""
    from PIL import Image

    files = sorted(SHIPPED_CELLS.glob("*/*.jpg"))[::4]
    assert len(files) >= 50
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB").resize((128, 128), Image.BILINEAR)) for f in files])
    _, d = predict_probs_ood(demo.model, demo.info, tiles, ood=demo.ood)
    assert np.mean(d > demo.ood.threshold) < 0.15  # about the 10 % design rate (90th percentile of validation)
    noise = np.random.default_rng(1).integers(0, 256, (16, 128, 128, 3), dtype=np.uint8)
    _, dn = predict_probs_ood(demo.model, demo.info, noise, ood=demo.ood)
    assert np.mean(dn > demo.ood.threshold) > SLIDE_FRACTION


def test_distance_matches_the_exporters_formula():
    from distill.ood_stats import fit_ood, ood_distances

    rng = np.random.default_rng(2)
    feats = rng.normal(size=(300, 8)) + np.repeat(np.eye(3, 8) * 5, 100, axis=0)
    labels = np.repeat(np.arange(3), 100)
    means, prec = fit_ood(feats, labels, 4)  # class 3 has no data: left out of the means
    assert means.shape == (3, 8)
    stats = OodStats(means.astype(np.float32), prec.astype(np.float32), threshold=3.0)
    probe = np.vstack([feats[:5], np.full((2, 8), 40.0)])
    np.testing.assert_allclose(ood_distance(probe, stats), ood_distances(probe, means, prec), rtol=1e-4)
    s = ood_summary(ood_distance(probe, stats), 3.0)
    assert s["n_flagged"] >= 2 and s["fraction"] == pytest.approx(s["n_flagged"] / 7)


def test_distance_on_real_features_equals_the_numpy_form(demo):
    """The distance is computed with torch (numpy's OpenBLAS threads spun beside the scoring threads,
    issue 11 speed); on the demo student's features of real cells it gives the float32 distances of
    the numpy form it replaced, printed as the max abs difference."""
    from PIL import Image

    from wsi_pipeline.scoring import features_and_logits

    files = sorted(SHIPPED_CELLS.glob("*/*.jpg"))[1::2]
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB").resize((128, 128), Image.BILINEAR)) for f in files])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(demo.info.mean).view(1, 3, 1, 1)) / torch.tensor(demo.info.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        feats = features_and_logits(demo.model, x)[0].numpy()
    f, p, mu = feats.astype(np.float64), demo.ood.precision.astype(np.float64), demo.ood.class_means.astype(np.float64)
    fp = f @ p
    d2 = np.einsum("nd,nd->n", fp, f)[:, None] - 2.0 * fp @ mu.T + np.einsum("cd,cd->c", mu @ p, mu)[None, :]
    want = np.sqrt(np.maximum(d2.min(axis=1), 0.0)).astype(np.float32)
    got = ood_distance(feats, demo.ood)
    diff = float(np.max(np.abs(got - want)))
    print(f"OOD distance, torch vs numpy form, {len(got)} real cells: max abs difference {diff:.3g}")
    assert got.dtype == np.float32 and len(got) >= 100 and diff < 1e-5


def _with_ood(src: Path, dst: Path, means_shape, prec_shape, meta_extra=None, drop_meta=False) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    tensors["ood.class_means"] = torch.zeros(means_shape)
    tensors["ood.precision"] = torch.eye(*prec_shape[:1]) if prec_shape[0] == prec_shape[1] else torch.zeros(prec_shape)
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    if not drop_meta:
        meta["ood"] = json.dumps({"method": "mahalanobis_tied", "layer": "pre_logits", "threshold": 10.0,
                                  **(meta_extra or {})})
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_reader_checks_ood_fields_before_loading(tmp_path):
    plain = random_checkpoint(tmp_path / "plain.safetensors")  # embed_dim 48, 8 classes
    assert read_checkpoint_info(plain).ood is None and load_checkpoint(plain).ood is None
    good = _with_ood(plain, tmp_path / "good.safetensors", (8, 48), (48, 48))
    loaded = load_checkpoint(good)
    assert loaded.ood.threshold == 10.0 and loaded.ood.dim == 48
    cases = {
        "bad_means": ((8, 47), (48, 48), None, False, "ood.class_means has shape"),
        "too_many": ((9, 48), (48, 48), None, False, "ood.class_means has shape"),
        "bad_prec": ((8, 48), (48, 40), None, False, "ood.precision has shape"),
        "threshold": ((8, 48), (48, 48), {"threshold": -1}, False, "threshold must be"),
        "method": ((8, 48), (48, 48), {"method": "energy"}, False, "method must be"),
        "no_meta": ((8, 48), (48, 48), None, True, "without the metadata field ood"),
    }
    for name, (ms, ps, extra, drop, msg) in cases.items():
        path = _with_ood(plain, tmp_path / f"{name}.safetensors", ms, ps, extra, drop)
        with pytest.raises(CheckpointError, match=msg):
            read_checkpoint_info(path)
    # a hostile header declaring a huge precision matrix is refused from the header alone
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["ood.precision"]["shape"] = [1_000_000, 1_000_000]
    blob = json.dumps(header).encode()
    hostile = tmp_path / "hostile.safetensors"
    hostile.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(CheckpointError, match="ood.precision has shape"):
        read_checkpoint_info(hostile)


def test_distill_adds_statistics_without_changing_weights_and_export_keeps_them(tmp_path):
    from distill.export import export
    from distill.ood_stats import add_ood_stats

    src = random_checkpoint(tmp_path / "student.safetensors", tile_size=32)
    before = weights_digest(src)
    cells = tmp_path / "cells"
    shutil.copytree(SHIPPED_CELLS, cells, ignore=shutil.ignore_patterns("*.md"))
    out = tmp_path / "with_ood.safetensors"
    entry = add_ood_stats(src, [cells], out, log=lambda m: None)
    assert weights_digest(out) == before
    # the command line gives the same statistics (wsi-distill ood-stats = python -m distill.ood_stats)
    from click.testing import CliRunner

    from distill.cli import main as distill_main

    res = CliRunner().invoke(distill_main, ["ood-stats", str(src), "--data", str(cells), "--out",
                                            str(tmp_path / "cli.safetensors"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["threshold"] == entry["threshold"] and weights_digest(tmp_path / "cli.safetensors") == before
    assert entry["n_train"] > entry["n_validation"] > 0 and 0 < entry["validation_flagged"] <= 0.15  # 90 % quantile of 49 images
    loaded = load_checkpoint(out)
    assert loaded.ood.class_means.shape == (8, 48) and loaded.ood.threshold == entry["threshold"]
    again = tmp_path / "exported.safetensors"
    export(out, again, fp16=True)  # a re-export carries the statistics over (fp32) with the fp16 weights
    reloaded = load_checkpoint(again)
    np.testing.assert_array_equal(reloaded.ood.precision, loaded.ood.precision)


def test_rank_puts_out_of_domain_after_scored_slides():
    rows = [{"slide": "a", "status": "out_of_domain", "score": 0.95}, {"slide": "b", "status": "ok", "score": 0.2},
            {"slide": "c", "status": "empty", "score": None}, {"slide": "d", "status": "error", "score": None}]
    assert [r["slide"] for r in rank_rows(rows)] == ["b", "a", "c", "d"]


def test_synthetic_held_out_smear_is_in_domain(tmp_path, demo):
    slide = tmp_path / "smear.tiff"
    synthesize(slide, SynthConfig(width=2048, height=2048, seed=11, fraction=0.3))
    run = run_slide(slide, tmp_path / "out", RunOptions())
    assert run.status == "ok"
    summary = json.loads((run.out_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["ood"]["fraction"] < SLIDE_FRACTION
    assert summary["ood"]["threshold"] == pytest.approx(demo.ood.threshold, rel=1e-5)
    group = tile_store.open_store(run.store)
    probs, attrs = read_scores(group, None)
    d, threshold = read_ood(group, attrs)
    assert d.shape == (len(probs),) and np.isfinite(d).all()
    assert summary["ood"]["n_flagged"] == int(np.sum(d > threshold))


# ----------------------------------------------------------------------------- real out-of-domain data


def test_he_slide_is_out_of_domain_in_summary_csv_and_report(shared_data, tmp_path):
    he = shared_data / "slides" / "CMU-1-Small-Region.svs"
    if not he.is_file():
        pytest.skip(f"{he} not present")
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / he.name).symlink_to(he)
    synthesize(slides / "smear.tiff", SynthConfig(width=1536, height=1536, seed=12, fraction=0.0))
    result = run_batch(slides, tmp_path / "out", RunOptions())
    by = {r["slide"]: r for r in result.rows}
    assert by["CMU-1-Small-Region"]["status"] == "out_of_domain", by
    assert by["smear"]["status"] == "ok"
    assert by["smear"]["rank"] < by["CMU-1-Small-Region"]["rank"]
    summary = json.loads((tmp_path / "out" / "CMU-1-Small-Region" / "summary.json").read_text())
    assert summary["status"] == "out_of_domain" and summary["ood"]["fraction"] > SLIDE_FRACTION
    assert summary["score"]["value"] is not None  # still recorded
    rows = {r["slide"]: r for r in csv.DictReader((tmp_path / "out" / "triage.csv").open())}
    assert rows["CMU-1-Small-Region"]["status"] == "out_of_domain"
    assert float(rows["CMU-1-Small-Region"]["ood_fraction"]) > SLIDE_FRACTION
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'class="status-out_of_domain"' in html and "out of domain" in html


def test_non_blood_images_are_flagged(shared_data, demo):
    """Histology tiles (H&E, IHC, pen marks) are out of domain for the blood-cell model; only tiles that
    show something count (blank glass is what its ``background`` class knows), as in eval_ood.py."""
    from PIL import Image

    files = sorted((shared_data / "tiles").glob("*.png"))
    if not files:
        pytest.skip(f"no images in {shared_data / 'tiles'}")
    flagged = []
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB"))
        h, w = a.shape[:2]
        tiles = [a[y:y + 128, x:x + 128] for y in range(0, h - 127, 128) for x in range(0, w - 127, 128)]
        tiles = [t for t in tiles if np.mean(t.mean(axis=-1) < 200) >= 0.10]
        if tiles:
            _, d = predict_probs_ood(demo.model, demo.info, np.stack(tiles), ood=demo.ood)
            flagged.append(np.mean(d > demo.ood.threshold) > SLIDE_FRACTION)
    assert len(flagged) >= 15 and np.mean(flagged) >= 0.75, f"{sum(flagged)}/{len(flagged)} images flagged"


def test_pbc_held_out_cells_are_in_domain(shared_data, demo):
    from PIL import Image

    from distill.data import read_exclude

    root = Path(__file__).resolve().parents[1]
    held = sorted(read_exclude(root / "configs" / "pbc_heldout.txt"))[::6]
    pbc = shared_data / "pbc"
    if not (pbc / held[0]).is_file():
        pytest.skip(f"{pbc} lacks the held-out PBC images")
    tiles = np.stack([np.asarray(Image.open(pbc / r).convert("RGB").resize((128, 128), Image.BILINEAR)) for r in held])
    _, d = predict_probs_ood(demo.model, demo.info, tiles, ood=demo.ood)
    assert np.mean(d > demo.ood.threshold) < 0.15  # about the 10 % design rate (90th percentile of validation)
