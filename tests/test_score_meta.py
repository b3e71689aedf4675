"""The score groups' typed attributes (ScoreMeta): one writer, one checked reader, stores written before it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr
from ckpt_util import random_checkpoint
from pipeline_util import blob_field, tiled_store

from wsi_contracts import tilestore as tile_store
from wsi_pipeline.aggregation import aggregate_store
from wsi_pipeline.errors import StoreError
from wsi_pipeline.scoring import ScoreConfig, ScoreMeta, read_scores, score_store
from wsi_pipeline.verify import verify_store

#: the attributes the scorer wrote before ScoreMeta existed (their names and JSON types; values from a store)
OLD_NAMES = {"class_names", "suspicious_classes", "checkpoint_sha256", "checkpoint_path", "checkpoint_metadata",
             "precision", "bf16_max_abs_diff", "ood", "device", "complete", "scored"}
DELETE = "<no such attribute>"
FP32 = ScoreConfig(precision="fp32", scheduler="sync")  # every shard scored by the shard tasks, as recorded


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("score-meta")
    store = tiled_store(blob_field(root / "field.png", seed=4, n=16), root / "pristine")
    ckpt = random_checkpoint(root / "a.safetensors", seed=3)
    result = score_store(store, ckpt, FP32)
    return {"root": root, "store": store, "ckpt": ckpt, "sha": result.checkpoint_sha256, "key": result.key}


def _copy(scored, tmp_path):
    store = tmp_path / scored["store"].name
    shutil.copytree(scored["store"], store)
    return store


def _attrs(store, key) -> dict:
    return dict(zarr.open_group(str(store / key), mode="r").attrs)


def _put(store, key, attrs: dict) -> None:
    """Replace a score group's attributes on disk, as another (older or damaged) writer left them."""
    zarr.open_group(str(store / key), mode="r+").attrs.put(attrs)


def test_round_trip_through_the_one_writer_and_reader(scored, tmp_path):
    store = _copy(scored, tmp_path)
    group = tile_store.open_store(store, mode="r+")
    meta = ScoreMeta(checkpoint_sha256="0123456789ab" + "c" * 52, class_names=("a", "b", "c"),
                     suspicious_classes=("b", "c"), checkpoint_path="/x/m.safetensors",
                     checkpoint_metadata={"tile_size": 32, "class_names": ["a", "b", "c"]}, precision="bf16",
                     bf16_max_abs_diff=0.004, ood={"method": "mahalanobis_tied", "threshold": 7.5}, device="cpu",
                     complete=True, scored="2026-01-01T00:00:00+00:00")
    sg = tile_store.create_scores(group, meta)
    assert sg["probs"].shape == (tile_store.read_store_meta(group).n_tiles, 3) and "ood" in sg
    written = tile_store.read_score_meta(group, meta.key)
    assert written == dataclasses.replace(meta, complete=False)  # a new group is never complete
    assert set(_attrs(store, meta.key)) == OLD_NAMES and _attrs(store, meta.key)["class_names"] == ["a", "b", "c"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        written.complete = True
    finished = tile_store.complete_scores(group, meta.key)
    assert finished.complete and finished.scored and finished == tile_store.read_score_meta(group, meta.key)
    assert set(tile_store.list_scores(group)) == {scored["key"], meta.key}
    assert finished.ood_threshold == 7.5 and finished.key == "scores/0123456789ab"
    # the writer checks what it writes as the reader does
    with pytest.raises(StoreError, match="suspicious_classes' names 'z', not in class_names"):
        tile_store.create_scores(group, dataclasses.replace(meta, suspicious_classes=("z",)))


def test_scores_written_before_score_meta_still_read_and_aggregate_the_same(scored, tmp_path):
    store = _copy(scored, tmp_path)
    old = _attrs(scored["store"], scored["key"])
    assert set(old) == OLD_NAMES
    first = aggregate_store(store, tmp_path / "a").summary
    # the dict an older scorer wrote, literally: same names, plain JSON lists, every field present
    _put(store, scored["key"], json.loads(json.dumps(old)))
    _, meta = read_scores(tile_store.open_store(store), scored["sha"])
    assert meta.class_names == tuple(old["class_names"]) and meta.scored == old["scored"]
    again = aggregate_store(store, tmp_path / "b").summary
    strip = ("created",)
    assert {k: v for k, v in again.items() if k not in strip} == {k: v for k, v in first.items() if k not in strip}
    # earlier versions did not record precision, device, the bf16 check, OOD or the checkpoint's path/metadata
    minimal = {k: old[k] for k in ("class_names", "suspicious_classes", "checkpoint_sha256", "complete", "scored")}
    _put(store, scored["key"], minimal)
    _, meta = read_scores(tile_store.open_store(store))
    assert (meta.precision, meta.device, meta.ood, meta.bf16_max_abs_diff, meta.checkpoint_path,
            meta.checkpoint_metadata) == (None, None, None, None, None, None)
    assert tile_store.read_ood(tile_store.open_store(store), meta) is None
    summary = aggregate_store(store, tmp_path / "c").summary
    assert summary["score"] == first["score"] and summary["top_tiles"] == first["top_tiles"]
    assert summary["provenance"]["precision"] is None and summary["provenance"]["device"] is None
    # a scorer rerun with the same checkpoint reuses them (nothing rescored, the recorded fields kept)
    reused = score_store(store, scored["ckpt"])
    assert reused.reused and reused.precision == "fp32" and _attrs(store, scored["key"]) == minimal


@pytest.mark.parametrize("field, value, problem", [
    ("class_names", "basophil", "not a list of class names"),
    ("class_names", [], "is empty"),
    ("class_names", None, "not a list of class names"),
    ("class_names", ["a", 3], "not a list of class names"),
    ("complete", DELETE, "is missing"),
    ("suspicious_classes", ["nope"], "not in class_names"),
    ("checkpoint_sha256", DELETE, "is missing"),
    ("checkpoint_sha256", None, "not a sha256"),
    ("checkpoint_sha256", "AB" * 32, "not a sha256"),
    ("checkpoint_sha256", "ab" * 32, "not the checkpoint of"),
    ("complete", "yes", "not true or false"),
    ("precision", "fp16", "not fp32 or bf16"),
    ("bf16_max_abs_diff", "small", "not a number"),
    ("ood", {"method": "mahalanobis_tied"}, "is None, not a number"),
    ("checkpoint_metadata", [1], "not an object"),
])
def test_a_missing_or_ill_typed_attribute_is_one_store_error(scored, tmp_path, field, value, problem):
    store = _copy(scored, tmp_path)
    attrs = _attrs(store, scored["key"])
    if value == DELETE:
        del attrs[field]
    else:
        attrs[field] = value
    _put(store, scored["key"], attrs)
    group = tile_store.open_store(store)
    for call in (lambda: tile_store.read_score_meta(group, scored["key"]), lambda: tile_store.list_scores(group),
                 lambda: read_scores(group), lambda: read_scores(group, scored["sha"])):
        with pytest.raises(StoreError, match=rf"{store.name}: score attribute '{scored['key']}\.{field}[.\w]*' .*{problem}"
                           ) as info:
            call()
        assert "\n" not in str(info.value) and "wsi-triage score" in str(info.value)
    # verify reports it (a finding, rescoring repairs it); scoring again rewrites the group from scratch
    report = verify_store(store)
    assert not report.ok and any(f"'{scored['key']}.{field}" in p for p in report.problems)
    redone = score_store(store, scored["ckpt"], FP32)
    assert not redone.reused and redone.shards_scored == tile_store.read_store_meta(group).n_shards
    probs, meta = read_scores(tile_store.open_store(store), scored["sha"])
    expected, _ = read_scores(tile_store.open_store(scored["store"]), scored["sha"])
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert meta.complete and verify_store(store).ok


def test_cli_aggregate_of_a_damaged_attribute_is_one_error_line(scored, tmp_path):
    store = _copy(scored, tmp_path)
    attrs = _attrs(store, scored["key"])
    attrs["class_names"] = "basophil,eosinophil"
    _put(store, scored["key"], attrs)
    proc = subprocess.run([sys.executable, "-m", "wsi_pipeline", "aggregate", str(store), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert str(store) in lines[0] and f"'{scored['key']}.class_names'" in lines[0] and "not a list" in lines[0]
    assert not (tmp_path / "o" / "summary.json").exists()
