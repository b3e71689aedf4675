"""The scoring model: a timm ``VisionTransformer`` built from a checkpoint, and the bundled demo.

The file format (reading, validating, writing) is :mod:`wsi_contracts.checkpoint`; this module
only turns a checked checkpoint into a model in eval mode, fp32, on CPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from wsi_contracts.checkpoint import CheckpointInfo, check_weights_finite, load_weights, ood_stats, read_info
from wsi_contracts.errors import CheckpointError
from wsi_contracts.ood import OodStats

__all__ = ["DEFAULT_CHECKPOINT", "LoadedCheckpoint", "read_checkpoint_info", "build_model", "load_checkpoint",
           "cached_model", "check_weights"]


def _default_checkpoint() -> Path:
    return Path(str(resources.files("wsi_pipeline") / "data" / "demo_student.safetensors"))


#: the bundled demo student (PBC blood-cell classes), used when no checkpoint is given
DEFAULT_CHECKPOINT: Path = _default_checkpoint()


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: Any  # timm VisionTransformer in eval mode, on CPU, fp32
    info: CheckpointInfo
    ood: OodStats | None = None  # out-of-domain statistics, when the checkpoint carries them


def read_checkpoint_info(path: str | Path | None = None) -> CheckpointInfo:
    """:func:`wsi_contracts.checkpoint.read_info` of ``path``; ``None``: the bundled demo."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if path == DEFAULT_CHECKPOINT and not path.exists():
        raise CheckpointError(f"{path}: the bundled demo checkpoint is missing; give a checkpoint file (checkpoint, --checkpoint on the command line)")
    return read_info(path)


def build_model(info: CheckpointInfo):
    """A randomly initialised ``VisionTransformer`` with the checkpoint's architecture (never pretrained)."""
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {k: v for k, v in info.architecture.items() if k != "family"}
    try:
        return VisionTransformer(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{info.path}: architecture cannot build a VisionTransformer ({msg})") from None


def load_checkpoint(path: str | Path | None = None) -> LoadedCheckpoint:
    """Validate and load a checkpoint: the model in eval mode, fp32, on CPU. ``None``: the demo."""
    info = read_checkpoint_info(path)
    model = build_model(info)
    ood = load_weights(model, info)
    model.eval()
    return LoadedCheckpoint(model=model, info=info, ood=ood_stats(info, ood))


_MODELS: dict[tuple[str, str], LoadedCheckpoint] = {}
_MODELS_LOCK = threading.Lock()


def cached_model(checkpoint_path: str | Path, sha256: str, device: str) -> LoadedCheckpoint:
    """The checkpoint's model on ``device``, loaded once per process and reused by every task."""
    key = (sha256, device)
    with _MODELS_LOCK:
        loaded = _MODELS.get(key)
        if loaded is None:
            loaded = load_checkpoint(checkpoint_path)
            if loaded.info.sha256 != sha256:
                raise CheckpointError(f"{checkpoint_path}: checkpoint changed while scoring (sha256 differs)")
            loaded.model.to(device)
            _MODELS[key] = loaded
    return loaded


_FINITE_OK: set[str] = set()


def check_weights(info: CheckpointInfo) -> None:
    """Refuse weights with NaN/inf before any slide is tiled (once per checkpoint sha256 per process;
    :func:`wsi_contracts.checkpoint.check_weights_finite`: without importing torch for float tensors)."""
    if info.sha256 in _FINITE_OK:
        return
    check_weights_finite(info)
    _FINITE_OK.add(info.sha256)
