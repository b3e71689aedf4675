"""`wsi-triage run` end to end: real Aperio slide, generated smears, reuse, new checkpoints, errors."""

from __future__ import annotations

import json
import shutil


import numpy as np
import pytest
from ckpt_util import random_checkpoint
from click.testing import CliRunner
from pipeline_util import cells_dir, smear

from wsi_contracts import tilestore as tile_store
from wsi_pipeline.aggregation import tile_suspicion
from wsi_pipeline.scoring import DEFAULT_CHECKPOINT
from wsi_pipeline.cli import main

OUTPUTS = ("summary.json", "overlay.png", "heatmap.png", "heatmap.npy", "gallery.png")


def _cli(*args, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def _run_json(*args) -> dict:
    out = _cli("run", *args, "--json").stdout
    return json.loads(out)


def _mtimes(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_run_on_the_real_aperio_slide_then_rerun_and_new_checkpoint(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    ckpt_a = random_checkpoint(tmp_path / "a.safetensors", seed=0, tile_size=64, tile_mpp=0.5)
    ckpt_b = random_checkpoint(tmp_path / "b.safetensors", seed=1, tile_size=64, tile_mpp=0.5)
    out = tmp_path / "out"
    first = _run_json(slide, "--checkpoint", ckpt_a, "--out", out, "--stain", "he")
    assert first["status"] == "ok" and first["n_tiles"] > 100
    assert not first["steps"]["tile"]["reused"] and not first["steps"]["score"]["reused"]
    folder = out / "CMU-1-Small-Region"
    for name in (*OUTPUTS, "CMU-1-Small-Region.geojson"):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["score"]["value"] == first["score"] and 0 <= first["score"] <= 1
    meta = tile_store.read_meta(tile_store.open_store(out / "CMU-1-Small-Region.zarr"))
    assert meta["tiler_config"]["target_mpp"] == 0.5 and meta["tiler_config"]["tile_size"] == 64  # from the checkpoint
    assert summary["provenance"]["slide_fingerprint"] == meta["slide_fingerprint"]

    before = _mtimes(out)
    second = _run_json(slide, "--checkpoint", ckpt_a, "--out", out, "--stain", "he")
    line = _cli("run", slide, "--checkpoint", ckpt_a, "--out", out, "--stain", "he").stdout
    assert "raw: ranks slides, no decision point" in line, line  # a checkpoint without a calibration
    assert all(second["steps"][s]["reused"] for s in ("tile", "score", "aggregate"))
    assert second["score"] == first["score"] and _mtimes(out) == before  # a second run writes nothing

    third = _run_json(slide, "--checkpoint", ckpt_b, "--out", out, "--stain", "he")
    assert third["steps"]["tile"]["reused"] and third["steps"]["tile"]["shards_written"] == 0
    assert not third["steps"]["score"]["reused"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["provenance"]["checkpoint_sha256"] != first["summary"]["provenance"]["checkpoint_sha256"]
    group = tile_store.open_store(out / "CMU-1-Small-Region.zarr")
    assert len(list(group["scores"].group_keys())) == 2


def test_generated_smear_end_to_end_without_the_slide_for_rescoring(shared_data, tmp_path):
    cells = cells_dir(shared_data)
    made = smear(tmp_path / "smear.tiff", cells, fraction=0.3, size=1536)
    ckpt_a = random_checkpoint(tmp_path / "a.safetensors", seed=0, tile_size=128, tile_mpp=0.27)
    ckpt_b = random_checkpoint(tmp_path / "b.safetensors", seed=1, tile_size=128, tile_mpp=0.27)
    out = tmp_path / "out"
    res = _run_json(made.slide, "--checkpoint", ckpt_a, "--out", out, "--gzip-geojson", "--quiet")
    assert res["status"] == "ok" and res["n_tiles"] > 0
    assert (out / "smear" / "smear.geojson.gz").is_file()

    made.slide.rename(tmp_path / "elsewhere.tiff")  # scoring and aggregating must not need the slide
    store = out / "smear.zarr"
    scored = json.loads(_cli("score", store, "--checkpoint", ckpt_b, "--json").stdout)
    assert not scored["reused"] and scored["tiles"] == res["n_tiles"]
    agg = json.loads(_cli("aggregate", store, "--checkpoint", ckpt_b, "--method", "fraction_above",
                          "--threshold", "0.2", "--json").stdout)
    assert agg["settings"] == {"threshold": 0.2} and agg["checkpoint_sha256"] == scored["checkpoint_sha256"]
    again = json.loads(_cli("score", store, "--checkpoint", ckpt_b, "--json").stdout)
    assert again["reused"]


def _tile_labels(coords: np.ndarray, truth: dict) -> np.ndarray:
    """1 where a tile holds the centre of a planted suspicious cell, else 0."""
    lab = np.zeros(len(coords), dtype=int)
    for c in truth["cells"]:
        if c["suspicious"]:
            x, y, w, h = c["bbox"]
            cx, cy = x + w / 2, y + h / 2
            lab[(coords[:, 0] <= cx) & (cx < coords[:, 0] + coords[:, 2])
                & (coords[:, 1] <= cy) & (cy < coords[:, 1] + coords[:, 3])] = 1
    return lab


def test_demo_student_ranks_a_positive_smear_above_its_negative_twin(shared_data, tmp_path):
    if not DEFAULT_CHECKPOINT.exists():
        pytest.skip(f"demo checkpoint not exported yet: {DEFAULT_CHECKPOINT}")
    cells = cells_dir(shared_data)
    pos = smear(tmp_path / "pos.tiff", cells, fraction=0.6, size=2048, seed=5)
    neg = smear(tmp_path / "neg.tiff", cells, fraction=0.0, size=2048, seed=5)  # same layout, no suspicious cell
    out = tmp_path / "out"
    p = _run_json(pos.slide, "--out", out, "--quiet")
    n = _run_json(neg.slide, "--out", out, "--quiet")
    assert p["score"] > n["score"], (p["score"], n["score"])
    # the demo student's score is calibrated, and the line says how to read it (a rerun: all reused)
    line = _cli("run", neg.slide, "--out", out).stdout
    assert "calibrated: >= 0.5 suspicious" in line and "reused tile, score, aggregate" in line, line
    # the demo student declares the cells placement (tiles centred on nucleated objects) and run follows it
    summary = json.loads((out / "pos" / "summary.json").read_text())
    assert summary["objects"]["n_objects"] > 0
    group = tile_store.open_store(out / "pos.zarr")
    assert tile_store.read_meta(group)["tiler_config"]["tiling"] == "cells"
    # tiles holding planted suspicious cells stand out from the rest of the slide
    coords = np.asarray(group["coords"][:])
    probs, scores = tile_store.read_scores(group)
    suspicion = tile_suspicion(probs, list(scores.class_names), list(scores.suspicious_classes))
    lab = _tile_labels(coords, json.loads(pos.truth.read_text()))
    assert lab.sum() >= 3
    hit, rest = suspicion[lab == 1], suspicion[lab == 0]
    auc = (hit[:, None] > rest[None, :]).mean() + 0.5 * (hit[:, None] == rest[None, :]).mean()
    assert auc >= 0.8, auc


def test_run_errors_are_one_line(shared_data, tmp_path):
    pickle_ckpt = tmp_path / "model.pth"
    import torch

    torch.save({"w": torch.zeros(2)}, pickle_ckpt)
    res = _cli("run", shared_data / "slides" / "CMU-1-Small-Region.svs", "--checkpoint", pickle_ckpt,
               "--out", tmp_path / "o", code=2)
    assert res.stderr.count("\n") == 1 and "unknown checkpoint format" in res.stderr
    ckpt = random_checkpoint(tmp_path / "a.safetensors", tile_size=64, tile_mpp=0.5)
    res = _cli("run", shared_data / "slides" / "broken.svs", "--checkpoint", ckpt, "--out", tmp_path / "o", code=2)
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and "broken.svs" in res.stderr


def test_score_refuses_a_store_tiled_for_another_geometry(tmp_path):
    from pipeline_util import blob_field, tiled_store

    store = tiled_store(blob_field(tmp_path / "f.png"), tmp_path / "out", tile_size=32, mpp=0.5)
    other = random_checkpoint(tmp_path / "o.safetensors", tile_size=128, tile_mpp=0.27)
    res = _cli("score", store, "--checkpoint", other, code=2)
    assert res.stderr.count("\n") == 1 and "expects 128 px tiles at 0.27 um/px" in res.stderr
    shutil.rmtree(store)
    res = _cli("aggregate", store, code=2)
    assert "no such tile store" in res.stderr

