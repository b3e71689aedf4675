"""The checkpoint file (docs/contracts.md section 2): write, read, export.

One safetensors file: the timm ``VisionTransformer`` state dict plus string metadata. No pickle
is ever opened: a file whose header is not safetensors is refused before anything is parsed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import DistillError
from .models import build_vit

__all__ = ["FORMAT", "FORMAT_VERSION", "REQUIRED", "build_metadata", "export", "extra_metadata", "load_model_file",
           "read_metadata", "sha256_file", "write_checkpoint"]

FORMAT = "wsi-triage-student"
FORMAT_VERSION = 1
JSON_KEYS = ("architecture", "class_names", "suspicious_classes", "normalization", "provenance")
REQUIRED = ("format", "format_version", *JSON_KEYS, "input_size", "tile_size", "tile_mpp")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
) -> dict[str, str]:
    """Metadata dict (all strings) exactly as the contract lists it."""
    unknown = sorted(set(suspicious_classes) - set(class_names))
    if unknown:
        raise DistillError(f"suspicious classes {unknown} are not among the class names {class_names}")
    prov = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "distill_version": __version__}
    prov.update(provenance)
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "architecture": json.dumps(architecture),
        "class_names": json.dumps(list(class_names)),
        "suspicious_classes": json.dumps(list(suspicious_classes)),
        "normalization": json.dumps({"mean": list(map(float, mean)), "std": list(map(float, std))}),
        "input_size": str(int(input_size)),
        "tile_size": str(int(tile_size)),
        "tile_mpp": repr(float(tile_mpp)),
        "provenance": json.dumps(provenance | prov),
    }


def write_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], fp16: bool = False,
                     extra_tensors: dict[str, torch.Tensor] | None = None) -> str:
    """Write atomically; returns the file's sha256 (the model's identity). ``extra_tensors`` (e.g. the
    ``ood.*`` statistics) are written as they are, never cast to fp16."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().to("cpu")
        if fp16 and v.is_floating_point():
            v = v.to(torch.float16)
        elif v.is_floating_point():
            v = v.to(torch.float32)
        tensors[k] = v.contiguous()
    tensors.update({k: v.detach().to("cpu").contiguous() for k, v in (extra_tensors or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # a normal file, not the 0600 safetensors creates
    os.replace(tmp, path)
    return sha256_file(path)


def _check_safetensors_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise DistillError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head[:8])
    if head[8:9] != b"{" or n + 8 > size:
        kind = "a zip/pickle torch checkpoint" if head[:2] in (b"PK", b"\x80\x02") or head[:1] == b"\x80" else "not safetensors"
        raise DistillError(f"{path}: {kind}; only .safetensors checkpoints are accepted (pickles are never opened)")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Parsed metadata; raises DistillError naming the first missing or inconsistent field."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: checkpoint not found")
    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise DistillError(f"{path}: unreadable safetensors file ({e})") from None
    for k in REQUIRED:
        if k not in raw:
            raise DistillError(f"{path}: metadata field {k!r} is missing")
    if raw["format"] != FORMAT:
        raise DistillError(f"{path}: metadata format is {raw['format']!r}, expected {FORMAT!r}")
    meta: dict[str, Any] = dict(raw)
    for k in JSON_KEYS:
        try:
            meta[k] = json.loads(raw[k])
        except json.JSONDecodeError:
            raise DistillError(f"{path}: metadata field {k!r} is not valid JSON") from None
    try:
        meta["format_version"] = int(raw["format_version"])
        meta["input_size"] = int(raw["input_size"])
        meta["tile_size"] = int(raw["tile_size"])
        meta["tile_mpp"] = float(raw["tile_mpp"])
    except ValueError as e:
        raise DistillError(f"{path}: bad numeric metadata field ({e})") from None
    if meta["format_version"] != FORMAT_VERSION:
        raise DistillError(f"{path}: format_version {meta['format_version']} is not supported (expected {FORMAT_VERSION})")
    arch = meta["architecture"]
    if not isinstance(arch, dict) or arch.get("num_classes") != len(meta["class_names"]):
        raise DistillError(f"{path}: architecture num_classes does not match the {len(meta['class_names'])} class names")
    if arch.get("img_size") != meta["input_size"]:
        raise DistillError(f"{path}: architecture img_size {arch.get('img_size')} != input_size {meta['input_size']}")
    bad = sorted(set(meta["suspicious_classes"]) - set(meta["class_names"]))
    if bad:
        raise DistillError(f"{path}: suspicious classes {bad} are not among class_names")
    norm = meta["normalization"]
    if not (isinstance(norm, dict) and len(norm.get("mean", [])) == 3 and len(norm.get("std", [])) == 3):
        raise DistillError(f"{path}: normalization needs 3 mean and 3 std values")
    return meta


def load_model_file(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the ViT described by the metadata and load its weights (cast to ``dtype``)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    model = build_vit(meta["architecture"])
    # ``ood.*``: out-of-domain statistics (distill.ood_stats), not model weights
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()
          if not k.startswith("ood.")}
    res = model.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        key = (res.missing_keys or res.unexpected_keys)[0]
        what = "missing" if res.missing_keys else "unexpected"
        raise DistillError(f"{path}: tensor {key!r} {what} for the declared architecture")
    model.eval()
    return model, meta


def extra_metadata(path: str | Path) -> dict[str, str]:
    """Metadata keys beyond the contract's required ones (e.g. ``stain``), as stored."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    return {k: v for k, v in raw.items() if k not in REQUIRED}


def export(src: str | Path, out: str | Path, fp16: bool = True, suspicious: list[str] | None = None,
           metrics: dict[str, Any] | None = None, stain: str | None = None, tile_size: int | None = None,
           tile_mpp: float | None = None, placement: str | None = None) -> str:
    """Re-write a trained model file (a run's ``model.safetensors`` or a run folder) for
    deployment, without retraining: optional fp16 weights and new export settings (suspicious
    classes, tile size / mpp, the ``stain`` preset and tile ``placement`` the pipeline uses,
    metrics). Settings
    not given, and any extra metadata key, are kept from the source. Returns sha256."""
    src = Path(src)
    if src.is_dir():
        src = src / "model.safetensors"
    model, meta = load_model_file(src)
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
    prov = dict(meta["provenance"])
    if metrics is not None:
        prov["metrics"] = metrics
    prov["exported_from_sha256"] = sha256_file(src)
    prov["weights_dtype"] = "float16" if fp16 else "float32"
    changed = {k: v for k, v in (("suspicious_classes", suspicious), ("tile_size", tile_size),
                                 ("tile_mpp", tile_mpp), ("stain", stain), ("placement", placement))
               if v is not None}
    if changed:
        prov["export_overrides"] = changed
    md = extra_metadata(src)
    md.update(build_metadata(
        meta["architecture"], meta["class_names"],
        meta["suspicious_classes"] if suspicious is None else suspicious,
        meta["normalization"]["mean"], meta["normalization"]["std"],
        meta["input_size"], meta["tile_size"] if tile_size is None else tile_size,
        meta["tile_mpp"] if tile_mpp is None else tile_mpp, prov,
    ))
    if stain:
        md["stain"] = str(stain)
    if placement:
        md["placement"] = placement
    ood = {}
    if "ood" in md:  # carry the out-of-domain statistics (distill.ood_stats) over unchanged (fp32)
        from safetensors.torch import load_file

        ood = {k: v for k, v in load_file(str(src)).items() if k.startswith("ood.")}
    return write_checkpoint(out, model.state_dict(), md, fp16=fp16, extra_tensors=ood)
