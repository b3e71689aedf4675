"""Checkpoints on distill's side: its metadata, its models, and ``wsi-distill export``.

The file format (docs/contracts.md section 2) has one implementation,
:mod:`wsi_contracts.checkpoint`: its reader, validator, version rule, sha256 and atomic writer are
used here as they are (so a file distill writes is a file the pipeline accepts), only with
contract errors raised as :class:`~distill.errors.DistillError`, the error distill's tools report.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from wsi_contracts import checkpoint as contract
from wsi_contracts.errors import CheckpointError

from . import __version__
from .errors import DistillError
from .models import build_vit

__all__ = ["build_metadata", "contract_errors", "export", "load_model", "load_model_file", "read_metadata", "write_checkpoint"]


@contextmanager
def contract_errors() -> Iterator[None]:
    """A :class:`CheckpointError` of the contract, raised as the same one-line :class:`DistillError`."""
    try:
        yield
    except CheckpointError as exc:
        raise DistillError(str(exc)) from None


def build_metadata(
    architecture: dict[str, Any],
    class_names: list[str],
    suspicious_classes: list[str],
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
    input_size: int,
    tile_size: int,
    tile_mpp: float,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The contract's required metadata fields (encoded by the writer), with distill's provenance."""
    unknown = sorted(set(suspicious_classes) - set(class_names))
    if unknown:
        raise DistillError(f"suspicious classes {unknown} are not among the class names {class_names}")
    prov = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "distill_version": __version__}
    prov.update(provenance)
    return {
        "format": contract.FORMAT,
        "format_version": contract.FORMAT_VERSION,
        "architecture": architecture,
        "class_names": list(class_names),
        "suspicious_classes": list(suspicious_classes),
        "normalization": {"mean": list(map(float, mean)), "std": list(map(float, std))},
        "input_size": int(input_size),
        "tile_size": int(tile_size),
        "tile_mpp": float(tile_mpp),
        "provenance": provenance | prov,
    }


def write_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
                     fp16: bool = False) -> str:
    """:func:`wsi_contracts.checkpoint.write_checkpoint` (atomic, validated); returns the sha256."""
    with contract_errors():
        return contract.write_checkpoint(path, state_dict, metadata, fp16=fp16)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata field of a checked checkpoint, JSON-decoded (:func:`wsi_contracts.checkpoint.read_info`)."""
    with contract_errors():
        return contract.read_info(path).metadata


def load_model(path: str | Path) -> tuple[torch.nn.Module, contract.CheckpointInfo, dict[str, torch.Tensor]]:
    """The model (fp32, eval mode), its checkpoint's info, and the ``ood.*`` tensors (distill.ood_stats)."""
    with contract_errors():
        info = contract.read_info(path)
        model = build_vit(info.architecture)
        ood = contract.load_weights(model, info)  # every tensor checked against the architecture
    return model.eval(), info, ood


def load_model_file(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The ViT a checkpoint describes, with its weights (fp32, eval mode), and its metadata."""
    model, info, _ = load_model(path)
    return model, info.metadata


def export(src: str | Path, out: str | Path, fp16: bool = True, suspicious: list[str] | None = None,
           metrics: dict[str, Any] | None = None, stain: str | None = None, tile_size: int | None = None,
           tile_mpp: float | None = None, placement: str | None = None,
           tta: dict[str, Any] | None = None) -> str:
    """Re-write a trained model file (a run's ``model.safetensors`` or a run folder) for
    deployment, without retraining: optional fp16 weights and new export settings (suspicious
    classes, tile size / mpp, the ``stain`` preset and tile ``placement`` the pipeline uses, the
    test-time augmentation ``tta`` ({"views", "floor"}: wsi_contracts.checkpoint.TestTimeAugmentation),
    metrics). Settings
    not given, and any extra metadata key, are kept from the source. Returns sha256."""
    src = Path(src)
    if src.is_dir():
        src = src / "model.safetensors"
    model, info, ood = load_model(src)
    if tile_size is not None and tile_size < 16:
        raise DistillError(f"tile_size {tile_size}: too small (px of a slide tile at tile_mpp)")
    if tile_mpp is not None and not 0.01 <= tile_mpp <= 100:
        raise DistillError(f"tile_mpp {tile_mpp}: not a pixel size in um/px (0.01 - 100)")
    if stain is not None and stain not in ("pap", "romanowsky", "he"):
        raise DistillError(f"stain {stain!r}: choose one of pap, romanowsky, he")
    if placement is not None and placement not in ("grid", "cells"):
        raise DistillError(f"placement {placement!r}: choose grid or cells")
    if suspicious is not None and not suspicious:
        raise DistillError("no suspicious classes: wsi-triage needs at least one")
    prov = dict(info.provenance)
    if metrics is not None:
        prov["metrics"] = metrics
    prov["exported_from_sha256"] = info.sha256
    prov["weights_dtype"] = "float16" if fp16 else "float32"
    changed = {k: v for k, v in (("suspicious_classes", suspicious), ("tile_size", tile_size),
                                 ("tile_mpp", tile_mpp), ("stain", stain), ("placement", placement),
                                 ("tta", tta))
               if v is not None}
    if changed:
        prov["export_overrides"] = changed
    md = info.extra  # stain, placement, calibration, ood, ...: the weights are the same
    md.update(build_metadata(
        info.architecture, list(info.class_names),
        list(info.suspicious_classes) if suspicious is None else suspicious, info.mean, info.std,
        info.input_size, info.tile_size if tile_size is None else tile_size,
        info.tile_mpp if tile_mpp is None else tile_mpp, prov,
    ))
    if stain:
        md["stain"] = str(stain)
    if placement:
        md["placement"] = placement
    if tta is not None:
        md[contract.TTA_KEY] = tta  # checked by the writer's validation
    # the out-of-domain statistics travel unchanged (fp32) with the (maybe fp16) weights
    return write_checkpoint(out, model.state_dict() | ood, md, fp16=fp16)
