"""Fault injection (fast): damaged stores, concurrent writers, hostile inputs. Never silently wrong.

Each test damages a real store, slide, checkpoint or option the way a user or a crash would and
checks that the outcome is either the correct result or a one-line error naming the file and
the fix. ``benchmarks/faults.py`` runs the same kinds of faults many more times.
"""

from __future__ import annotations

import json
import re
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from ckpt_util import architecture, random_checkpoint
from click.testing import CliRunner
from pipeline_util import blob_field

from wsi_contracts import tilestore as tile_store
from wsi_pipeline.cli import main
from wsi_contracts.checkpoint import file_sha256
from wsi_pipeline.errors import CheckpointError, ShardError
from wsi_pipeline.pipeline import RunOptions, run_slide
from wsi_pipeline.scoring import ScoreConfig, list_scores, read_scores, score_store


def _cli(*args, code: int):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One slide run end to end with checkpoint A (kept pristine; tests copy it)."""
    root = tmp_path_factory.mktemp("faults")
    slide = blob_field(root / "field.png", seed=3, size=(448, 320), n=30)
    ckpt_a = random_checkpoint(root / "a.safetensors", seed=0)
    ckpt_b = random_checkpoint(root / "b.safetensors", seed=1)
    out = root / "out"
    run = run_slide(slide, out, _options(ckpt_a))
    assert run.status == "ok"
    meta = tile_store.read_meta(tile_store.open_store(run.store))
    assert meta["n_shards"] >= 3
    return {"root": root, "slide": slide, "a": ckpt_a, "b": ckpt_b, "out": out, "run": run}


def _options(ckpt, **score) -> RunOptions:
    return RunOptions(checkpoint=ckpt, mpp=0.5, score=ScoreConfig(scheduler="sync", **score))


def _copy(scored, tmp_path) -> Path:
    """A private copy of the scored output folder (slide stays where the store says it is)."""
    out = tmp_path / "out"
    shutil.copytree(scored["out"], out)
    return out


def _shard(store: Path, index: int) -> Path:
    tiles = tile_store.open_store(store)["tiles"]
    return store / "tiles" / tiles.metadata.encode_chunk_key((index, 0, 0, 0))  # zarr v3's chunk key


# --------------------------------------------------------------------------- damaged stores (issue 12 #1)


@pytest.mark.parametrize("damage", ["delete", "replace", "flip-jpeg", "truncate"])
def test_damaged_shard_is_never_scored_and_run_repairs_it(scored, tmp_path, damage):
    out = _copy(scored, tmp_path)
    store = out / "field.zarr"
    shard = _shard(store, 1)
    if damage == "delete":
        shard.unlink()
    elif damage == "replace":
        shutil.copyfile(_shard(store, 0), shard)
    elif damage == "flip-jpeg":
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x5A  # inside some tile's JPEG data
        shard.write_bytes(bytes(data))
    else:
        shard.write_bytes(shard.read_bytes()[:-100])
    # scoring with another checkpoint must read the damaged shard: a one-line error naming it
    with pytest.raises(ShardError, match=r"tile shard 1 \(.*\).*wsi-triage verify --repair"):
        score_store(store, scored["b"], ScoreConfig(scheduler="sync"))
    res = _cli("score", store, "--checkpoint", scored["b"], "--scheduler", "sync", "--quiet", code=2)
    assert_one_line_error(res, "tile shard 1")
    res = _cli("verify", store, code=1)
    assert "shard 1" in res.output
    # `run` re-tiles only that shard from the slide, and the score is the original one
    again = run_slide(scored["slide"], out, _options(scored["b"]))
    assert again.steps["tile"]["shards_written"] == 1
    ref = run_slide(scored["slide"], out, _options(scored["a"]))
    assert ref.score == scored["run"].score
    group = tile_store.open_store(store)
    assert tile_store.damaged_shards(group) == {}


def test_verify_repair_rewrites_the_damaged_shard(scored, tmp_path):
    out = _copy(scored, tmp_path)
    store = out / "field.zarr"
    original = _shard(store, 2).read_bytes()
    _shard(store, 2).unlink()
    res = _cli("verify", store, "--repair", "--json", code=0)
    doc = json.loads(res.stdout)
    assert doc[0]["repaired"] == [2] and doc[0]["problems"] == []
    assert _shard(store, 2).read_bytes() == original  # the same bytes as first written
    _cli("verify", store, code=0)


def test_gallery_never_shows_fill_tiles(scored, tmp_path):
    out = _copy(scored, tmp_path)
    store = out / "field.zarr"
    group = tile_store.open_store(store)
    probs, _ = read_scores(group)
    for i in range(int(tile_store.read_meta(group)["n_shards"])):
        _shard(store, i).unlink()
    with pytest.raises(ShardError, match="is missing"):
        from wsi_pipeline.aggregation import aggregate_store
        aggregate_store(store, out / "again", checkpoint_sha256=read_scores(group)[1].checkpoint_sha256)
    assert probs.shape[0] > 0


@pytest.mark.parametrize("node", ["tiles/zarr.json", "thumbnail", "coords/c/0/0"])
def test_missing_node_is_a_one_line_error_and_run_retiles(scored, tmp_path, node):
    out = _copy(scored, tmp_path)
    store = out / "field.zarr"
    target = store / node
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    res = _cli("aggregate", store, "--out", tmp_path / "agg", code=2)
    assert_one_line_error(res, str(store), node.split("/")[0])
    res = _cli("score", store, "--checkpoint", scored["b"], "--quiet", code=2)
    assert_one_line_error(res, node.split("/")[0])
    again = run_slide(scored["slide"], out, _options(scored["a"]))
    assert again.score == scored["run"].score and not again.steps["tile"]["reused"]


# --------------------------------------------------------------------------- concurrent writers (issue 12 #2)


def test_lock_is_reentrant_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from wsi_pipeline.errors import StoreBusyError
    from wsi_pipeline.lock import lock_path, store_lock

    store = tmp_path / "x.zarr"
    with store_lock(store):
        with store_lock(store):  # re-entrant in one thread
            assert lock_path(store).is_file()
    assert not lock_path(store).exists()  # released and removed
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from wsi_pipeline.lock import store_lock\n"
        f"with store_lock({str(store)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusyError, match=rf"in use by pid {holder.pid} on .* since "):
            with store_lock(store, wait=0.3):
                pass
    finally:
        holder.kill()  # kill -9: the kernel drops its flock; its lock file stays behind, stale
        holder.wait()
    assert lock_path(store).is_file()
    with store_lock(store, wait=0):  # a stale lock is taken over at once
        pass


def test_two_runs_on_one_slide_at_once_both_succeed_with_the_same_result(scored, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_pipeline", "run", str(scored["slide"]), "--out", str(out),
           "--checkpoint", str(scored["a"]), "--mpp", "0.5", "--json", "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    docs = [json.loads(r[0]) for r in results]
    assert docs[0]["score"] == docs[1]["score"] == scored["run"].score
    assert tile_store.damaged_shards(tile_store.open_store(out / "field.zarr")) == {}


# --------------------------------------------------------------------------- CLI mistakes (issue 12 #4)


@pytest.mark.parametrize("args, fragment", [
    (["batch", "{slide}", "--out", "{file}"], "exists and is not a directory"),
    (["batch", "{slide}", "--out", "/proc/wsi-triage-x"], "/proc/wsi-triage-x: cannot create output directory"),
    (["run", "{slide}", "--device", "banana"], "'banana' is not a torch device"),
    (["run", "{slide}", "--top-k", "0"], "top-k must be >= 1"),
    (["run", "{slide}", "--quantile", "2"], "--quantile must be in [0, 1], got 2.0"),
    (["batch", "{slide}", "--score-workers", "0"], "--score-workers must be at least 1"),
    (["run", "{slide}", "--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["batch", "{slide}", "--slide-memory", "lots"], "--slide-memory must be a size such as 8G"),
    (["batch", "{slide}", "--slide-memory", "-1G"], "--slide-memory must be a size such as 8G"),
], ids=["out-is-file", "out-in-proc", "device-banana", "top-k-0", "quantile-2", "score-workers-0", "batch-size-0",
        "slide-memory-lots", "slide-memory-negative"])
def test_ordinary_mistakes_are_one_line_before_any_work(scored, tmp_path, args, fragment):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "o"
    args = [a.format(slide=scored["slide"], file=tmp_path / "file") for a in args]
    if "--out" not in args:
        args += ["--out", str(out)]
    res = _cli(*args, "--checkpoint", scored["a"], "--mpp", "0.5", "--quiet", code=2)
    assert_one_line_error(res, fragment)
    assert not out.exists()  # refused before any tiling


def test_cuda_without_a_gpu_is_one_line(scored, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    res = _cli("run", scored["slide"], "--device", "cuda", "--checkpoint", scored["a"], "--mpp", "0.5",
               "--out", tmp_path / "o", code=2)
    assert_one_line_error(res, "no CUDA GPU is available")


@pytest.mark.parametrize("command", [[], ["run"], ["batch"], ["verify"], ["score"], ["aggregate"], ["tile"]])
def test_dash_h_is_help(command):
    res = _cli(*command, "-h", code=0)
    assert "Usage:" in res.output and "--help" in res.output


# --------------------------------------------------------------------------- hostile checkpoints (issue 12 #3, #8)


def _hostile_checkpoint(src: Path, dst: Path, *, nan: bool = False, **meta_changes) -> Path:
    import struct

    from safetensors.torch import load_file, save_file

    with open(src, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))["__metadata__"]
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta_changes.items()})
    state = load_file(str(src))
    if nan:
        state["blocks.0.attn.qkv.weight"][:] = float("nan")
    save_file(state, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("kind", ["nan-weights", "tile_mpp-infinity", "num_classes-nine", "embed-dim-huge"])
def test_hostile_checkpoint_stops_a_batch_in_one_line_before_any_slide(scored, tmp_path, kind):
    arch = architecture(img_size=32, depth=1, embed_dim=48)
    changes = {"nan-weights": {"nan": True}, "tile_mpp-infinity": {"tile_mpp": "Infinity"},
               "num_classes-nine": {"architecture": {**arch, "num_classes": "nine"}},
               "embed-dim-huge": {"architecture": {**arch, "embed_dim": 1_000_000, "num_heads": 1}}}[kind]
    bad = _hostile_checkpoint(scored["a"], tmp_path / "bad.safetensors", **changes)
    out = tmp_path / "o"
    res = _cli("batch", scored["slide"], "--out", out, "--checkpoint", bad, "--mpp", "0.5", "--quiet", code=2)
    assert_one_line_error(res, str(bad))
    assert not out.exists()
    # scoring an existing store with it never stores NaN scores marked complete
    store = _copy(scored, tmp_path) / "field.zarr"
    with pytest.raises(CheckpointError):
        score_store(store, bad, ScoreConfig(scheduler="sync"))
    sha = file_sha256(bad)
    assert not any(a.checkpoint_sha256 == sha and a.complete
                   for a in list_scores(tile_store.open_store(store)).values())


# --------------------------------------------------------------------------- full disk, leftovers (issue 12 #6, #8)


@pytest.fixture()
def small_disk(tmp_path):
    """A 300 KiB tmpfs (needs mount rights: root in CI containers; skipped elsewhere)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill: {proc.stderr.decode().strip()[:80]}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_one_line_and_a_rerun_after_freeing_space_finishes(scored, small_disk):
    import subprocess

    out = small_disk / "o"
    args = ("run", scored["slide"], "--out", out, "--checkpoint", scored["a"], "--mpp", "0.5", "--quiet")
    res = _cli(*args, code=2)
    assert_one_line_error(res, "No space left on device", "rerun the same command")
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    _cli(*args, code=0)
    assert json.loads((out / "field" / "summary.json").read_text())["score"]["value"] == pytest.approx(
        scored["run"].score, abs=1e-6)


def test_a_rerun_removes_temporaries_a_killed_writer_left(scored, tmp_path):
    out = _copy(scored, tmp_path)
    stale = out / "field" / ".summary.json.tmp99999"
    stale.write_bytes(b"half")
    run_slide(scored["slide"], out, _options(scored["a"]))
    assert not stale.exists()


@pytest.mark.parametrize("node", ["coords", "mask", "scores"])
def test_flipped_byte_in_a_small_array_is_caught_never_a_changed_result(scored, tmp_path, node):
    out = _copy(scored, tmp_path)
    store = out / "field.zarr"
    chunk = sorted(p for p in (store / node).rglob("*") if p.is_file() and p.name != "zarr.json"
                   and (node != "scores" or "probs" in str(p)))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    res = _cli("aggregate", store, "--out", tmp_path / "agg", code=2)
    assert_one_line_error(res, "fails its checksum")
    again = run_slide(scored["slide"], out, _options(scored["a"]))  # re-tiles, or rescores the damaged shard
    assert again.score == scored["run"].score


# --------------------------------------------------------------------------- kill -9 (issue 12: keep what holds)


@pytest.mark.parametrize("delay", [3.5, 6.0])
def test_kill_9_mid_run_then_rerun_gives_the_same_result(scored, tmp_path, delay):
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_pipeline", "run", str(scored["slide"]), "--out", str(out), "--checkpoint",
           str(scored["a"]), "--mpp", "0.5", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    again = run_slide(scored["slide"], out, _options(scored["a"]))
    assert again.score == scored["run"].score
    assert tile_store.damaged_shards(tile_store.open_store(again.store)) == {}
    assert not list(out.rglob("*.tmp*"))


# --------------------------------------------------------------------------- per-slide budgets (issue 12 #7)


def _stop_tiling_children(sig: int) -> None:
    """Send ``sig`` to the tiling child once it exists (a child of the fork server, our own child)."""
    import time

    import psutil

    for _ in range(200):
        children = [g for c in psutil.Process().children() for g in c.children()]
        if children:
            for child in children:
                os.kill(child.pid, sig)
            return
        time.sleep(0.05)


@pytest.mark.parametrize("sig, fragment", [("SIGKILL", "ended abnormally (SIGKILL)"),
                                           ("SIGSTOP", "longer than the per-slide budget of 1 s")])
def test_a_tiling_child_that_dies_or_hangs_is_one_line_and_never_blocks(tmp_path, monkeypatch, sig, fragment):
    """The child reading a slide is killed by the OS (a decoder's abort, the OOM killer) or stops
    responding (a hang in C code, where no Python check runs): one SlideError, within the budget."""
    import signal
    import threading
    import time

    from PIL import Image

    from wsi_pipeline import budget
    from wsi_pipeline.errors import SlideError
    from wsi_pipeline.tiling import TilerConfig

    monkeypatch.setattr(budget, "KILL_GRACE_SECONDS", 0.5)
    slide = tmp_path / "big.png"
    Image.fromarray(np.full((6000, 6000, 3), 240, np.uint8)).save(slide)
    config = TilerConfig(target_mpp=0.5, tile_size=32).resolved()
    stopper = threading.Thread(target=_stop_tiling_children, args=(getattr(signal, sig),))
    stopper.start()
    t0 = time.monotonic()
    with pytest.raises(SlideError, match=re.escape(fragment)) as caught:
        budget.tile_within_budget(slide, tmp_path / "out", config, budget.SlideBudget(2**31, 1.0), mpp=0.5)
    stopper.join()
    assert time.monotonic() - t0 < 30 and "\n" not in str(caught.value) and "big.png" in str(caught.value)
