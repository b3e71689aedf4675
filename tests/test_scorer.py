"""The dask scorer: per-shard probabilities in the store, reuse, resume, schedulers, precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ckpt_util import random_checkpoint
from pipeline_util import blob_field, tiled_store

from wsi_contracts import tilestore as tile_store
from wsi_pipeline.scoring import load_checkpoint
from wsi_pipeline.errors import CheckpointError, OptionError, StoreError
from wsi_pipeline.scoring import ScoreConfig, list_scores, read_scores, score_store, scores_key


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorer")
    slide = blob_field(root / "field.png", seed=2)
    store = tiled_store(slide, root / "out")
    ckpt_a = random_checkpoint(root / "a.safetensors", seed=0)
    ckpt_b = random_checkpoint(root / "b.safetensors", seed=1)
    return {"root": root, "slide": slide, "store": store, "a": ckpt_a, "b": ckpt_b}


def _reference_probs(ckpt, tiles: np.ndarray) -> np.ndarray:
    """The model applied by hand to the stored tiles, as the checkpoint's normalisation prescribes."""
    loaded = load_checkpoint(ckpt)
    mean = torch.tensor(loaded.info.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.info.std).view(1, 3, 1, 1)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        return torch.softmax(loaded.model((x - mean) / std), dim=1).numpy()


def test_scores_every_tile_in_shards_with_attributes(work):
    result = score_store(work["store"], work["a"], ScoreConfig(precision="fp32"))
    group = tile_store.open_store(work["store"])
    meta = tile_store.read_meta(group)
    assert meta["n_shards"] > 1 and result.shards_scored == meta["n_shards"] and not result.reused
    probs, attrs = read_scores(group, result.checkpoint_sha256)
    tiles = np.asarray(group["tiles"][:])
    assert probs.shape == (meta["n_tiles"], 8) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, _reference_probs(work["a"], tiles), atol=1e-5)
    arr = group[result.key]["probs"]
    assert arr.chunks == (meta["tiles_per_shard"], 8)
    assert isinstance(attrs, tile_store.ScoreMeta) and attrs.key == result.key
    assert attrs.complete and attrs.checkpoint_sha256 == result.checkpoint_sha256 and attrs.scored
    assert attrs.class_names[3] == "ig" and attrs.suspicious_classes == ("erythroblast", "ig")
    assert attrs.checkpoint_metadata["tile_size"] == 32 and attrs.precision == "fp32" and attrs.ood is None
    assert attrs.checkpoint_path == str(work["a"].resolve()) and attrs.device == result.device
    # on disk: the attribute names and JSON values of docs/contracts.md, as before ScoreMeta
    assert dict(group[result.key].attrs) == attrs.as_attrs()
    assert set(group[result.key].attrs) == {"class_names", "suspicious_classes", "checkpoint_sha256", "checkpoint_path",
                                            "checkpoint_metadata", "precision", "bf16_max_abs_diff", "ood", "device",
                                            "complete", "scored"}
    assert list_scores(group) == {result.key: attrs}
    assert result.key == scores_key(result.checkpoint_sha256) == f"scores/{result.checkpoint_sha256[:12]}"


def test_second_scoring_with_the_same_checkpoint_does_nothing(work):
    first = score_store(work["store"], work["a"])
    chunk_files = sorted((work["store"] / first.key / "probs").rglob("*"))
    before = {p: p.stat().st_mtime_ns for p in chunk_files if p.is_file()}
    again = score_store(work["store"], work["a"])
    assert again.reused and again.shards_scored == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_interrupted_scoring_resumes_only_missing_shards(work):
    done = score_store(work["store"], work["a"])
    group = tile_store.open_store(work["store"], mode="r+")
    meta = tile_store.read_meta(group)
    expected, _ = read_scores(group, done.checkpoint_sha256)
    sub = group[done.key]
    for i in (1, 3):  # as if the run died before these shards finished
        sub["shard_done"][i] = False
        sub["probs"][tile_store.shard_slice(i, meta["n_tiles"], meta["tiles_per_shard"])] = np.nan
    sub.attrs["complete"] = False
    resumed = score_store(work["store"], work["a"])
    assert resumed.shards_scored == 2 and not resumed.reused
    probs, attrs = read_scores(tile_store.open_store(work["store"]), done.checkpoint_sha256)
    assert attrs.complete
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_new_checkpoint_scores_from_the_store_without_the_slide(work, tmp_path):
    store = tiled_store(blob_field(tmp_path / "moved.png", seed=4), tmp_path / "out")
    (tmp_path / "moved.png").rename(tmp_path / "gone.png")  # the slide cannot be read any more
    a = score_store(store, work["a"], ScoreConfig(precision="fp32"))
    b = score_store(store, work["b"], ScoreConfig(precision="fp32"))
    assert a.key != b.key and not b.reused
    group = tile_store.open_store(store)
    assert set(list_scores(group)) == {a.key, b.key}
    pa, _ = read_scores(group, a.checkpoint_sha256)
    pb, _ = read_scores(group, b.checkpoint_sha256)
    assert pa.shape == pb.shape and np.abs(pa - pb).max() > 1e-3
    np.testing.assert_allclose(pb, _reference_probs(work["b"], np.asarray(group["tiles"][:])), atol=1e-5)


def test_checkpoint_with_other_tile_geometry_is_refused(work, tmp_path):
    other = random_checkpoint(tmp_path / "big.safetensors", tile_size=64, tile_mpp=0.27)
    with pytest.raises(CheckpointError, match="expects 64 px tiles at 0.27 um/px but .* holds 32 px tiles at 0.5") as err:
        score_store(work["store"], other)
    assert "\n" not in str(err.value)


def test_missing_or_incomplete_store_is_a_one_line_error(tmp_path, work):
    with pytest.raises(StoreError, match="no such tile store"):
        score_store(tmp_path / "nothing.zarr", work["a"])


def test_processes_scheduler_matches_threads(work, tmp_path):
    store = tiled_store(work["slide"], tmp_path / "out")
    threads = score_store(store, work["a"], ScoreConfig(scheduler="threads", workers=2, precision="fp32"))
    expected, _ = read_scores(tile_store.open_store(store), threads.checkpoint_sha256)
    store2 = tiled_store(work["slide"], tmp_path / "out2")
    score_store(store2, work["a"], ScoreConfig(scheduler="processes", workers=1, precision="fp32"))  # one spawned worker process
    got, _ = read_scores(tile_store.open_store(store2), threads.checkpoint_sha256)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # the worker process stays for the next slide with the model loaded (a batch does not start
    # new processes and reload the model for every slide)
    from wsi_pipeline.scoring.scorer import process_pool

    assert process_pool(1).submit(_models_loaded_here).result() >= 1


def _models_loaded_here() -> int:
    """Run in a scoring worker process: how many folded models it holds."""
    from wsi_pipeline.scoring.scorer import scoring_model

    return scoring_model.cache_info().currsize


def test_distributed_local_cluster_matches_threads(work, tmp_path):
    distributed = pytest.importorskip("distributed")
    store = tiled_store(work["slide"], tmp_path / "out")
    ref = score_store(store, work["a"], ScoreConfig(scheduler="threads", precision="fp32"))
    expected, _ = read_scores(tile_store.open_store(store), ref.checkpoint_sha256)
    store2 = tiled_store(work["slide"], tmp_path / "out2")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster:
        seen = []
        r = score_store(store2, work["a"], ScoreConfig(scheduler=cluster.scheduler_address, precision="fp32"),
                        progress=lambda *call: seen.append(call))
    assert r.shards_scored == tile_store.read_meta(tile_store.open_store(store2))["n_shards"]
    assert seen[0] == ("scoring", 0, r.n_tiles) and seen[-1] == ("scoring", r.n_tiles, r.n_tiles)
    assert len(seen) == r.shards_scored + 1 and [c[1] for c in seen] == sorted(c[1] for c in seen)
    got, _ = read_scores(tile_store.open_store(store2), ref.checkpoint_sha256)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bf16_is_kept_only_within_tolerance(work, tmp_path):
    store = tiled_store(work["slide"], tmp_path / "out")
    strict = score_store(store, work["a"], ScoreConfig(precision="bf16", bf16_tolerance=0.0, scheduler="sync"))
    assert strict.precision == "fp32" and strict.bf16_max_abs_diff > 0
    fp32, attrs = read_scores(tile_store.open_store(store), strict.checkpoint_sha256)
    assert attrs.precision == "fp32" and attrs.bf16_max_abs_diff == strict.bf16_max_abs_diff

    store2 = tiled_store(work["slide"], tmp_path / "out2")
    loose = score_store(store2, work["a"], ScoreConfig(precision="bf16", bf16_tolerance=1.0, scheduler="sync"))
    assert loose.precision == "bf16"
    bf16, attrs = read_scores(tile_store.open_store(store2), loose.checkpoint_sha256)
    assert attrs.precision == "bf16"
    assert 0 < np.abs(bf16 - fp32).max() < 0.1


def test_unknown_scheduler_is_refused(work):
    with pytest.raises(OptionError, match="scheduler must be threads, processes, sync or a dask.distributed "
                                          "address .*, got 'gpu-farm'") as caught:
        score_store(work["store"], work["a"], ScoreConfig(scheduler="gpu-farm"))
    assert caught.value.param == "scheduler"


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size must be positive, got 0"),
    ("workers", 0, "workers must be at least 1, got 0"),
    ("precision", "fp8", "precision must be auto, fp32 or bf16, got 'fp8'"),
    ("precision_check_tiles", 0, "precision_check_tiles must be at least 1, got 0"),
    ("device", "banana", "device 'banana' is not a torch device"),
])
def test_parameter_errors_name_the_parameter(field, value, message):
    with pytest.raises(OptionError) as caught:
        ScoreConfig(**{field: value}).validated()
    assert str(caught.value).startswith(message) and caught.value.param == field
    assert not isinstance(caught.value, StoreError)  # a wrong parameter is no damaged store


@pytest.mark.parametrize("scheduler, workers", [("threads", 2), ("threads", None), ("sync", None)])
def test_scoring_leaves_torchs_thread_count_as_it_was(work, tmp_path, scheduler, workers):
    """score_store may narrow torch's intra-op threads while its own threads score (one each per
    core), but a library call must not leave the process-wide setting changed; nor may a failure."""
    store = tiled_store(work["slide"], tmp_path / "out")
    outer = torch.get_num_threads()
    torch.set_num_threads(3)  # not what scoring would choose on any machine
    before = torch.get_num_threads()
    try:
        _score_twice(work, tmp_path, store, scheduler, workers, before)
    finally:
        torch.set_num_threads(outer)


def _score_twice(work, tmp_path, store, scheduler, workers, before):
    calls = []
    result = score_store(store, work["a"], ScoreConfig(scheduler=scheduler, workers=workers, precision="fp32"),
                         progress=lambda *call: calls.append(call))
    assert not result.reused and result.shards_scored > 1 and torch.get_num_threads() == before
    assert calls[0] == ("scoring", 0, result.n_tiles) and calls[-1] == ("scoring", result.n_tiles, result.n_tiles)

    def stop(stage, done, total):
        if done:
            raise KeyboardInterrupt
    store2 = tiled_store(work["slide"], tmp_path / "out2")
    with pytest.raises(KeyboardInterrupt):
        score_store(store2, work["a"], ScoreConfig(scheduler=scheduler, workers=workers, precision="fp32"),
                    progress=stop)
    assert torch.get_num_threads() == before


def test_auto_precision_measures_bf16_against_fp32_on_a_native_bf16_cpu(work, tmp_path):
    """auto keeps fp32 unless bf16 is native here and its probabilities match fp32 within tolerance."""
    from wsi_pipeline.scoring import cpu_has_native_bf16

    store = tiled_store(work["slide"], tmp_path / "out")
    result = score_store(store, work["a"], ScoreConfig(scheduler="sync"))
    if cpu_has_native_bf16():
        assert result.bf16_max_abs_diff is not None
        assert result.precision == ("bf16" if result.bf16_max_abs_diff <= 0.02 else "fp32")
    else:
        assert result.precision == "fp32" and result.bf16_max_abs_diff is None


def test_folded_normalization_gives_the_same_probabilities(work, tmp_path):
    # the scorer folds (x / 255 - mean) / std into the patch embedding; with and without resizing
    from wsi_pipeline.scoring import fold_normalization, predict_probs

    tiles = tile_store.read_shard(tile_store.open_store(work["store"]), 0)
    for ckpt in (work["a"], random_checkpoint(tmp_path / "resize.safetensors", seed=3, img_size=48)):
        loaded = load_checkpoint(ckpt)
        folded = fold_normalization(loaded.model, loaded.info)
        assert folded is not None and folded is not loaded.model
        plain = predict_probs(loaded.model, loaded.info, tiles)
        np.testing.assert_allclose(predict_probs(folded, loaded.info, tiles, pixel_input=True), plain, atol=2e-6)
        assert np.abs(plain - plain.mean(axis=0)).max() > 0.05  # the tiles are told apart: a real check


def test_checking_the_weights_before_tiling_does_not_import_torch(tmp_path):
    """``run`` checks the weights before it tiles: through numpy for a float checkpoint, so torch's
    ~0.5 GB is not resident under the tiling's own peak; NaN weights are still refused there."""
    import subprocess
    import sys

    from wsi_contracts.checkpoint import read_header
    from wsi_pipeline.scoring import DEFAULT_CHECKPOINT, read_checkpoint_info

    code = ("import sys; from wsi_pipeline.scoring import check_weights, read_checkpoint_info; "
            "check_weights(read_checkpoint_info(sys.argv[1])); print('torch' in sys.modules)")
    demo = subprocess.run([sys.executable, "-c", code, str(DEFAULT_CHECKPOINT)], capture_output=True, text=True,
                          check=True)
    assert demo.stdout.strip() == "False"
    from safetensors.torch import load_file, save_file

    info = read_checkpoint_info(DEFAULT_CHECKPOINT)  # fp16 and fp32 tensors
    state = load_file(str(DEFAULT_CHECKPOINT))
    state["head.weight"][1, 2] = float("inf")
    bad = tmp_path / "inf.safetensors"
    save_file(state, str(bad), metadata=read_header(DEFAULT_CHECKPOINT)["__metadata__"])
    failed = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True)
    assert failed.returncode != 0 and "tensor head.weight holds NaN or infinite values" in failed.stderr
    assert info.sha256 != read_checkpoint_info(bad).sha256
