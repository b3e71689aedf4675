"""Test-time augmentation declared by the checkpoint (metadata ``tta``): each tile's probabilities are
the mean over its turned / mirrored views when its own view's suspicion reaches the floor."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from ckpt_util import random_checkpoint
from click.testing import CliRunner
from PIL import Image
from pipeline_util import blob_field, tiled_store

from distill.cli import main as distill_main
from wsi_contracts import checkpoint as contract
from wsi_contracts import tilestore as tile_store
from wsi_contracts.errors import CheckpointError
from wsi_pipeline.aggregation import tile_suspicion
from wsi_pipeline.scoring import DEFAULT_CHECKPOINT, load_checkpoint, predict_probs, read_checkpoint_info
from wsi_pipeline.scoring import ScoreConfig, read_scores, score_store
from wsi_pipeline.synth import SHIPPED_CELLS

# the views of each set as numpy maps of (n, H, W, 3) tiles
_TURNS = [lambda t, k=k: np.rot90(t, k, axes=(1, 2)) for k in range(4)]
_MIRROR = lambda t: np.swapaxes(t, 1, 2)  # noqa: E731
VIEWS = {
    "rot4": _TURNS,
    "flips": [lambda t: t, lambda t: t[:, :, ::-1], lambda t: t[:, ::-1], lambda t: t[:, ::-1, ::-1]],
    "d8": _TURNS + [lambda t, f=f: f(_MIRROR(t)) for f in _TURNS],
}


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    """Real blood cells shipped with the package (centre squares), as the demo student's tiles."""
    tiles = []
    for path in sorted(Path(SHIPPED_CELLS).rglob("*.jpg"))[:48]:
        im = np.asarray(Image.open(path).convert("RGB"))
        s = min(im.shape[:2])
        y, x = (im.shape[0] - s) // 2, (im.shape[1] - s) // 2
        tiles.append(np.asarray(Image.fromarray(im[y:y + s, x:x + s]).resize((128, 128), Image.BILINEAR)))
    assert len(tiles) >= 24, SHIPPED_CELLS
    return np.stack(tiles)


def _with_tta(tmp_path: Path, views: str, floor: float) -> Path:
    info = read_checkpoint_info(DEFAULT_CHECKPOINT)
    out = tmp_path / f"demo-{views}-{floor}.safetensors"
    contract.copy_with_metadata(info, out, {contract.TTA_KEY: {"views": views, "floor": floor}})
    return out


@pytest.mark.parametrize("views", ["rot4", "flips", "d8"])
def test_tiles_at_or_above_the_floor_get_the_mean_over_the_views(tmp_path, cells, views):
    plain = load_checkpoint(DEFAULT_CHECKPOINT)
    one = contract.TestTimeAugmentation()
    each = np.stack([predict_probs(plain.model, plain.info, np.ascontiguousarray(f(cells)), tta=one)
                     for f in VIEWS[views]])
    own = each[0]
    suspicion = tile_suspicion(own, plain.info.class_names, plain.info.suspicious_classes)
    floor = float(np.median(suspicion))  # half the tiles above, half below
    expected = np.where((suspicion >= floor)[:, None], each.mean(axis=0), own)

    ckpt = load_checkpoint(_with_tta(tmp_path, views, floor))
    assert ckpt.info.tta == contract.TestTimeAugmentation(views, floor) and ckpt.info.tta.n_views == len(VIEWS[views])
    got = predict_probs(ckpt.model, ckpt.info, cells)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    above = suspicion >= floor
    assert 0 < above.sum() < len(cells)
    assert np.abs(got[above] - own[above]).max() > 1e-3  # the views do differ: the test can fail
    np.testing.assert_array_equal(got[~above], own[~above])


def test_the_scorer_stores_the_checkpoints_tta_probabilities(tmp_path):
    ckpt = random_checkpoint(tmp_path / "r.safetensors", seed=3, tta={"views": "d8", "floor": 0.0})
    store = tiled_store(blob_field(tmp_path / "field.png", seed=4), tmp_path / "out")
    score_store(store, ckpt, ScoreConfig(scheduler="threads", workers=1, precision="fp32"))
    group = tile_store.open_store(store)
    tiles = tile_store.read_tiles(group, np.arange(tile_store.read_store_meta(group).n_tiles))
    loaded = load_checkpoint(ckpt)
    probs, _ = read_scores(group, loaded.info.sha256)
    np.testing.assert_allclose(probs, predict_probs(loaded.model, loaded.info, tiles), atol=2e-5)
    single = predict_probs(loaded.model, loaded.info, tiles, tta=contract.TestTimeAugmentation())
    assert np.abs(probs - single).max() > 1e-3


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    """A copy of a checkpoint with metadata fields replaced by hand (bypassing the validating writer)."""
    from safetensors.torch import load_file, save_file

    with open(src, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))["__metadata__"]
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in changes.items()})
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("value, match", [
    ({"views": "r7"}, "tta views 'r7': choose one of none, rot4, flips, d8"),
    ({"views": "rot4", "floor": 2}, "tta floor must be a number in \\[0, 1\\], got 2"),
    ({"views": "rot4", "every": 1}, "tta must be a JSON object"),
    ("sometimes", "tta must be a JSON object"),
])
def test_a_bad_tta_field_is_one_line_naming_the_file(tmp_path, value, match):
    src = random_checkpoint(tmp_path / "a.safetensors")
    bad = _rewrite(src, tmp_path / "bad.safetensors", tta=value)
    with pytest.raises(CheckpointError, match=match) as err:
        read_checkpoint_info(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(CheckpointError, match=match):  # and the writer never publishes one
        random_checkpoint(tmp_path / "never.safetensors", tta=value)
    assert not (tmp_path / "never.safetensors").exists()


def test_export_sets_and_keeps_the_tta(tmp_path):
    src = random_checkpoint(tmp_path / "a.safetensors")
    runner = CliRunner()
    r = runner.invoke(distill_main, ["export", str(src), "--out", str(tmp_path / "b.safetensors"), "--fp32",
                                     "--tta", "rot4", "--tta-floor", "0.25"])
    assert r.exit_code == 0, r.output
    assert read_checkpoint_info(tmp_path / "b.safetensors").tta == contract.TestTimeAugmentation("rot4", 0.25)
    r = runner.invoke(distill_main, ["export", str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "c.safetensors"),
                                     "--fp32"])
    assert r.exit_code == 0, r.output
    assert read_checkpoint_info(tmp_path / "c.safetensors").tta == contract.TestTimeAugmentation("rot4", 0.25)
    r = runner.invoke(distill_main, ["export", str(src), "--out", str(tmp_path / "d.safetensors"), "--fp32",
                                     "--tta-floor", "0.25"])  # a floor without views would be ignored: refused
    assert r.exit_code == 2 and "--tta-floor needs --tta" in r.output and not (tmp_path / "d.safetensors").exists()
    assert len(r.output.strip().splitlines()) == 1


def test_copy_with_metadata_refuses_a_file_changed_since_it_was_read(tmp_path):
    src = random_checkpoint(tmp_path / "a.safetensors", seed=0)
    info = read_checkpoint_info(src)
    random_checkpoint(src, seed=1)  # replaced by another model after it was read
    with pytest.raises(CheckpointError, match="changed since it was read"):
        contract.copy_with_metadata(info, tmp_path / "b.safetensors", {"stain": "pap"})
    assert not (tmp_path / "b.safetensors").exists()


def test_the_ood_distance_is_the_tiles_own_view(tmp_path, cells):
    from wsi_pipeline.scoring import predict_probs_ood

    plain = load_checkpoint(DEFAULT_CHECKPOINT)
    assert plain.ood is not None
    ckpt = load_checkpoint(_with_tta(tmp_path, "d8", 0.0))
    one, d_one = predict_probs_ood(plain.model, plain.info, cells, ood=plain.ood, tta=contract.TestTimeAugmentation())
    views, d_views = predict_probs_ood(ckpt.model, ckpt.info, cells, ood=ckpt.ood)
    np.testing.assert_array_equal(d_views, d_one)
    assert np.abs(views - one).max() > 1e-3
