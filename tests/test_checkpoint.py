"""Student checkpoint loading: safetensors only, never unpickled, one-line errors on bad metadata."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from ckpt_util import PBC_CLASSES, architecture, metadata, random_checkpoint
from timm.models.vision_transformer import VisionTransformer

from wsi_contracts.checkpoint import write_checkpoint
from wsi_contracts.errors import CheckpointError
from wsi_pipeline.scoring import DEFAULT_CHECKPOINT, check_weights, load_checkpoint, read_checkpoint_info


def _rewrite_metadata(src: Path, dst: Path, **changes) -> Path:
    """Copy a checkpoint with some metadata fields replaced (None removes the field)."""
    from safetensors.torch import load_file, save_file

    with open(src, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))["__metadata__"]
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v if isinstance(v, str) else json.dumps(v)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def test_load_roundtrip_gives_the_same_model_outputs(tmp_path):
    arch = architecture(img_size=32, depth=2)
    torch.manual_seed(3)
    model = VisionTransformer(**{k: v for k, v in arch.items() if k != "family"}).eval()
    path = tmp_path / "s.safetensors"
    sha = write_checkpoint(path, model.state_dict(), metadata(arch))
    loaded = load_checkpoint(path)
    info = loaded.info
    assert info.sha256 == sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.class_names == tuple(PBC_CLASSES)
    assert info.suspicious_classes == ("erythroblast", "ig")
    assert (info.input_size, info.tile_size, info.tile_mpp) == (32, 32, 0.5)
    assert info.mean == (0.5, 0.5, 0.5) and info.std == (0.25, 0.25, 0.25)
    assert info.metadata["provenance"] == {"note": "random weights for tests"}
    assert not loaded.model.training
    assert next(loaded.model.parameters()).device.type == "cpu"
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x), atol=1e-6)


def test_fp16_weights_load_as_fp32(tmp_path):
    from safetensors.torch import load_file, save_file

    src = random_checkpoint(tmp_path / "a.safetensors")
    with open(src, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))["__metadata__"]
    half = {k: v.half() for k, v in load_file(str(src)).items()}
    save_file(half, str(tmp_path / "h.safetensors"), metadata=meta)
    loaded = load_checkpoint(tmp_path / "h.safetensors")
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_info_reads_no_weights_and_differs_per_file(tmp_path):
    a = read_checkpoint_info(random_checkpoint(tmp_path / "a.safetensors", seed=0))
    b = read_checkpoint_info(random_checkpoint(tmp_path / "b.safetensors", seed=1))
    assert a.sha256 != b.sha256 and a.sha12 == a.sha256[:12]
    assert a.architecture["depth"] == 1 and a.num_classes == 8


def test_torch_pickle_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled.txt"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.pt"
    torch.save({"trap": Trap()}, path)
    for name in ("model.pt", "model.safetensors"):
        target = tmp_path / name
        if name != "model.pt":
            target.write_bytes(path.read_bytes())
        with pytest.raises(CheckpointError, match="PyTorch pickle") as err:
            load_checkpoint(target)
        assert "\n" not in str(err.value) and str(target) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    (b"abc", "too short"),
    (struct.pack("<Q", 10**12) + b"{}", "not a safetensors"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "bad safetensors header"),
])
def test_missing_or_garbage_files_are_refused(tmp_path, content, match):
    path = tmp_path / "x.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as err:
        read_checkpoint_info(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("changes, match", [
    ({"class_names": None}, "lacks class_names"),
    ({"format": "something-else"}, "format is 'something-else'"),
    ({"suspicious_classes": ["ig", "blast"]}, "'blast', not in class_names"),
    ({"class_names": PBC_CLASSES[:7]}, "num_classes 8 != 7"),
    ({"normalization": {"mean": [0.5], "std": [0.2]}}, "normalization"),
    ({"tile_mpp": "fast"}, "tile_mpp is not a number"),
    ({"input_size": 64}, "differs from architecture img_size 32"),
    ({"format_version": "7"}, "newer than this wsi-triage"),
])
def test_inconsistent_metadata_is_named(tmp_path, changes, match):
    src = random_checkpoint(tmp_path / "a.safetensors")
    bad = _rewrite_metadata(src, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_weights_not_matching_the_architecture_are_refused(tmp_path):
    src = random_checkpoint(tmp_path / "a.safetensors", embed_dim=48)
    wider = dict(architecture(img_size=32, depth=1, embed_dim=96))
    bad = _rewrite_metadata(src, tmp_path / "bad.safetensors", architecture=wider)
    with pytest.raises(CheckpointError, match="weights do not match the architecture .tensor .* has shape"):
        load_checkpoint(bad)
    deeper = dict(architecture(img_size=32, depth=2, embed_dim=48))
    bad2 = _rewrite_metadata(src, tmp_path / "bad2.safetensors", architecture=deeper)
    with pytest.raises(CheckpointError, match="lacks tensor blocks.1"):
        load_checkpoint(bad2)


def test_bundled_demo_student_follows_the_contract():
    assert DEFAULT_CHECKPOINT.is_file(), "the demo student ships with the package"
    assert DEFAULT_CHECKPOINT.stat().st_size <= 15 * 2**20
    loaded = load_checkpoint()
    info = loaded.info
    assert info.path == DEFAULT_CHECKPOINT
    assert set(PBC_CLASSES) <= set(info.class_names) and set(info.suspicious_classes) == {"ig", "erythroblast"}
    assert info.tile_size == 128 and abs(info.tile_mpp - 0.27) < 1e-6
    assert info.metadata.get("stain") == "romanowsky"
    with torch.no_grad():
        out = loaded.model(torch.zeros(1, 3, info.input_size, info.input_size))
    assert out.shape == (1, len(info.class_names))


def test_safetensors_whose_header_length_starts_with_0x80_loads(tmp_path):
    """A header length whose low byte is 0x80 looks like a pickle's first byte; it must still load."""
    arch = architecture(img_size=32, depth=1)
    model = VisionTransformer(**{k: v for k, v in arch.items() if k != "family"}).eval()
    for pad in range(256):
        meta = metadata(arch)
        meta["padding"] = "x" * pad
        path = tmp_path / f"s{pad}.safetensors"
        write_checkpoint(path, model.state_dict(), meta)
        if path.read_bytes()[0] == 0x80:
            break
        path.unlink()
    else:
        pytest.fail("could not build a header of the wanted length")
    loaded = load_checkpoint(path)
    assert loaded.info.class_names == tuple(PBC_CLASSES)


def _arch(**changes) -> dict:
    arch = architecture(img_size=32, depth=1, embed_dim=48)
    arch.update(changes)
    return arch


@pytest.mark.parametrize("changes, match", [
    ({"architecture": _arch(embed_dim="48")}, "embed_dim must be an integer, got '48'"),
    ({"architecture": _arch(img_size=[32, 32])}, "img_size must be an integer"),
    ({"architecture": _arch(embed_dim=2**40)}, r"embed_dim must be in \[1, 8192\]"),
    ({"architecture": _arch(embed_dim=3000, num_heads=3)}, "tensor patch_embed.proj.weight has shape"),
    ({"architecture": _arch(num_classes="nine")}, "num_classes must be an integer, got 'nine'"),
    ({"architecture": _arch(depth=0)}, r"depth must be in \[1, 64\]"),
    ({"architecture": _arch(mlp_ratio="4")}, "mlp_ratio must be a number"),
    ({"architecture": _arch(mlp_ratio=float("nan"))}, "mlp_ratio must be a number"),
    ({"architecture": _arch(class_token="yes")}, "class_token must be true or false"),
    ({"architecture": _arch(global_pool=7)}, "global_pool must be one of"),
    ({"architecture": _arch(patch_size=5)}, "not a multiple of patch_size"),
    ({"architecture": _arch(num_heads=5)}, "not divisible by num_heads"),
    ({"architecture": _arch(act_layer="os.system")}, "act_layer is not supported"),
    ({"architecture": {k: v for k, v in _arch().items() if k != "depth"}}, "architecture lacks depth"),
    ({"architecture": [1, 2]}, "architecture must be a JSON object"),
    ({"tile_mpp": "Infinity"}, r"tile_mpp must be a finite pixel size"),
    ({"tile_mpp": -0.5}, r"tile_mpp must be a finite pixel size"),
    ({"tile_mpp": [0.5]}, "tile_mpp is not a number"),
    ({"tile_size": 32.5}, "tile_size must be an integer"),
    ({"tile_size": 10**9}, r"tile_size must be in \[8, 4096\]"),
    ({"input_size": "big"}, "input_size must be an integer"),
])
def test_hostile_architecture_is_refused_from_the_header_before_any_allocation(tmp_path, changes, match):
    src = random_checkpoint(tmp_path / "a.safetensors")
    bad = _rewrite_metadata(src, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(CheckpointError, match=match) as err:
        read_checkpoint_info(bad)  # header only: refused before a model is built or a weight read
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(bad)


def test_nan_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    src = random_checkpoint(tmp_path / "a.safetensors")
    with open(src, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))["__metadata__"]
    state = load_file(str(src))
    state["head.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="tensor head.weight holds NaN"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="tensor head.weight holds NaN"):
        check_weights(read_checkpoint_info(bad))


# --------------------------------------------------------------------------- one contract, both sides


def test_a_checkpoint_exported_by_distill_reads_field_for_field_in_the_pipeline(tmp_path):
    """distill's export (new settings, fp16) of the demo student; the pipeline's reader sees exactly
    what was written, the extra fields (stain, placement, calibration, OOD statistics) included."""
    from distill.export import export, load_model_file, read_metadata

    src = read_checkpoint_info(DEFAULT_CHECKPOINT)
    out = tmp_path / "exported.safetensors"
    sha = export(DEFAULT_CHECKPOINT, out, fp16=True, suspicious=["ig"], tile_size=96, tile_mpp=0.3,
                 stain="pap", placement="cells", metrics={"note": "test"})
    info = read_checkpoint_info(out)
    assert info.sha256 == sha == hashlib.sha256(out.read_bytes()).hexdigest()
    assert info.format_version == 1
    assert info.class_names == src.class_names and info.suspicious_classes == ("ig",)
    assert (info.mean, info.std, info.input_size) == (src.mean, src.std, src.input_size)
    assert (info.tile_size, info.tile_mpp) == (96, 0.3)
    assert info.architecture == src.architecture
    assert info.metadata["stain"] == "pap" and info.metadata["placement"] == "cells"
    assert info.metadata["calibration"] == src.metadata["calibration"]
    assert info.ood == src.ood
    prov = info.provenance
    assert prov["exported_from_sha256"] == src.sha256 and prov["weights_dtype"] == "float16"
    assert prov["metrics"] == {"note": "test"} and prov["export_overrides"]["tile_mpp"] == 0.3
    # distill's own view of the file is the pipeline's, field for field
    assert read_metadata(out) == info.metadata
    # the same weights on both sides: the demo's fp16 tensors bit for bit, the OOD tensors unchanged
    from safetensors.torch import load_file

    before, after = load_file(str(DEFAULT_CHECKPOINT)), load_file(str(out))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    pipeline_model = load_checkpoint(out).model
    distill_model, _ = load_model_file(out)
    x = torch.rand(2, 3, info.input_size, info.input_size)
    with torch.no_grad():
        assert torch.equal(pipeline_model(x), distill_model(x))


@pytest.mark.parametrize("version, accepted, match", [
    ("1", True, None),
    (1, True, None),
    ("2", False, "format_version 2 is newer than this wsi-triage"),
    ("0", False, "format_version 0 is not supported"),
    ("-1", False, "format_version -1 is not supported"),
    ("1.5", False, "format_version is not an integer"),
    ("one", False, "format_version is not an integer"),
    (None, False, "'format_version' is missing"),
])
def test_the_version_rule_is_the_same_for_distill_and_the_pipeline(tmp_path, version, accepted, match):
    from distill.errors import DistillError
    from distill.export import export, load_model_file, read_metadata

    src = random_checkpoint(tmp_path / "a.safetensors")
    path = _rewrite_metadata(src, tmp_path / "v.safetensors", format_version=version)
    if accepted:
        assert read_checkpoint_info(path).format_version == 1
        assert read_metadata(path)["format_version"] == 1
        load_model_file(path)
        return
    with pytest.raises(CheckpointError, match=match) as pipeline_err:
        read_checkpoint_info(path)
    for distill_reader in (read_metadata, load_model_file, lambda p: export(p, tmp_path / "out.safetensors")):
        with pytest.raises(DistillError, match=match) as distill_err:
            distill_reader(path)
        assert str(distill_err.value) == str(pipeline_err.value)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("changes, match", [
    ({"format_version": 2}, "newer than this wsi-triage"),
    ({"suspicious_classes": ["blast"]}, "'blast', not in class_names"),
    ({"ood": {"method": "mahalanobis_tied", "layer": "pre_logits", "threshold": 3.0}},
     "ood needs tensors ood.class_means and ood.precision"),
    ({"provenance": None}, "lacks provenance"),
])
def test_the_writer_never_publishes_a_checkpoint_the_reader_refuses(tmp_path, changes, match):
    arch = architecture(img_size=32, depth=1)
    model = VisionTransformer(**{k: v for k, v in arch.items() if k != "family"})
    meta = metadata(arch)
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    target = random_checkpoint(tmp_path / "model.safetensors")  # a good file already there stays
    before = target.read_bytes()
    with pytest.raises(CheckpointError, match=match) as err:
        write_checkpoint(target, model.state_dict(), meta)
    assert str(target) in str(err.value) and "\n" not in str(err.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary file left


def test_fp16_writes_the_model_in_half_precision_and_the_ood_statistics_as_given(tmp_path):
    arch = architecture(img_size=32, depth=1)
    model = VisionTransformer(**{k: v for k, v in arch.items() if k != "family"})
    ood = {"ood.class_means": torch.randn(8, 48), "ood.precision": torch.eye(48)}
    meta = metadata(arch, ood={"method": "mahalanobis_tied", "layer": "pre_logits", "threshold": 3.0})
    path = tmp_path / "half.safetensors"
    write_checkpoint(path, model.state_dict() | ood, meta, fp16=True)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    assert tensors["head.weight"].dtype == torch.float16
    assert tensors["ood.precision"].dtype == torch.float32 and torch.equal(tensors["ood.precision"], torch.eye(48))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not safetensors' private 0600
    assert load_checkpoint(path).ood.threshold == 3.0
