"""Load a student checkpoint (one ``.safetensors`` file, contract in ``docs/contracts.md`` §2).

Only the safetensors format is accepted: the header is parsed by hand first, so a PyTorch
pickle/zip file is recognised and refused without any unpickling. Every problem becomes a
one-line :class:`~wsi_pipeline.errors.CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import CheckpointError

CHECKPOINT_FORMAT = "wsi-triage-student"
CHECKPOINT_FORMAT_VERSION = 1
#: a safetensors JSON header larger than this is not a checkpoint we wrote
MAX_HEADER_BYTES = 100 * 1024 * 1024
REQUIRED_FIELDS = ("format", "architecture", "class_names", "suspicious_classes", "normalization",
                   "input_size", "tile_size", "tile_mpp")


def _default_checkpoint() -> Path:
    return Path(str(resources.files("wsi_pipeline") / "data" / "demo_student.safetensors"))


#: the bundled demo student (8 PBC blood-cell classes), used when no checkpoint is given
DEFAULT_CHECKPOINT: Path = _default_checkpoint()


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint declares; everything needed to score without building the model."""

    path: Path
    sha256: str
    class_names: tuple[str, ...]
    suspicious_classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    tile_size: int
    tile_mpp: float
    architecture: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)  # every metadata field, JSON-decoded

    @property
    def sha12(self) -> str:
        return self.sha256[:12]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class LoadedCheckpoint:
    model: Any  # timm VisionTransformer in eval mode, on CPU, fp32
    info: CheckpointInfo


_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached on (path, size, mtime) so repeated calls are free."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _SHA_LOCK:
        _SHA_CACHE[key] = value
    return value


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header, refusing anything else before it is parsed as a model."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint is not a file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
        # safetensors: 8-byte little-endian header length, then the JSON header ("{"). Test that
        # first: a valid header length may well start with byte 0x80, like a pickle does.
        is_safetensors = len(head) == 9 and head[8:9] == b"{"
        if not is_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
            raise CheckpointError(
                f"{path}: unknown checkpoint format (a PyTorch pickle/zip file); only .safetensors "
                "student checkpoints are accepted (export one with `wsi-distill export`)")
        if len(head) < 9:
            raise CheckpointError(f"{path}: unknown checkpoint format (file too short for safetensors)")
        (n,) = struct.unpack("<Q", head[:8])
        fh.seek(8)
        if n < 2 or n > MAX_HEADER_BYTES or n + 8 > size:
            raise CheckpointError(f"{path}: unknown checkpoint format (not a safetensors file)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: unknown checkpoint format (bad safetensors header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unknown checkpoint format (bad safetensors header)")
    return header


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError):
        return value


def _info_from_header(path: Path, header: dict[str, Any], sha256: str) -> CheckpointInfo:
    raw = header.get("__metadata__") or {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: safetensors metadata is not a string map")
    meta = {k: _decode(v) for k, v in raw.items()}
    missing = [k for k in REQUIRED_FIELDS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: not a wsi-triage student checkpoint (metadata lacks {', '.join(missing)})")
    if meta["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: metadata format is {meta['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    version = meta.get("format_version", 1)
    try:
        if int(version) > CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format_version {version} is newer than this wsi-triage")
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: metadata field format_version is not an integer: {version!r}") from None

    def bad(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: metadata field {name} {why}")

    classes = meta["class_names"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise bad("class_names", "must be a non-empty JSON list of names")
    if len(set(classes)) != len(classes):
        raise bad("class_names", "has duplicate names")
    suspicious = meta["suspicious_classes"]
    if not isinstance(suspicious, list) or not suspicious or not all(isinstance(c, str) for c in suspicious):
        raise bad("suspicious_classes", "must be a non-empty JSON list of class names")
    unknown = [c for c in suspicious if c not in classes]
    if unknown:
        raise bad("suspicious_classes", f"names {', '.join(map(repr, unknown))}, not in class_names")
    norm = meta["normalization"]
    try:
        mean = tuple(float(v) for v in norm["mean"])
        std = tuple(float(v) for v in norm["std"])
    except (TypeError, KeyError, ValueError):
        raise bad("normalization", "must be {\"mean\": [3 numbers], \"std\": [3 numbers]}") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise bad("normalization", "needs 3 means and 3 positive stds")
    ints = {}
    for name in ("input_size", "tile_size"):
        try:
            ints[name] = int(meta[name])
        except (TypeError, ValueError):
            raise bad(name, f"is not an integer: {meta[name]!r}") from None
        if ints[name] < 8:
            raise bad(name, f"must be at least 8 px, got {ints[name]}")
    try:
        tile_mpp = float(meta["tile_mpp"])
    except (TypeError, ValueError):
        raise bad("tile_mpp", f"is not a number: {meta['tile_mpp']!r}") from None
    if not tile_mpp > 0:
        raise bad("tile_mpp", f"must be positive, got {tile_mpp}")
    arch = meta["architecture"]
    if not isinstance(arch, dict):
        raise bad("architecture", "must be a JSON object of VisionTransformer arguments")
    if arch.get("family", "timm-vit") != "timm-vit":
        raise bad("architecture", f"family {arch.get('family')!r} is not supported (only timm-vit)")
    if int(arch.get("num_classes", -1)) != len(classes):
        raise bad("architecture", f"num_classes {arch.get('num_classes')} != {len(classes)} class_names")
    if "img_size" in arch and int(arch["img_size"]) != ints["input_size"]:
        raise bad("input_size", f"{ints['input_size']} differs from architecture img_size {arch['img_size']}")
    return CheckpointInfo(
        path=path, sha256=sha256, class_names=tuple(classes), suspicious_classes=tuple(suspicious),
        mean=mean, std=std, input_size=ints["input_size"], tile_size=ints["tile_size"], tile_mpp=tile_mpp,
        architecture=dict(arch), metadata=meta,
    )


def read_checkpoint_info(path: str | Path | None = None) -> CheckpointInfo:
    """Validate a checkpoint's header and metadata (no weights are read). ``None``: the demo."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if path == DEFAULT_CHECKPOINT and not path.exists():
        raise CheckpointError(f"{path}: the bundled demo checkpoint is missing; pass --checkpoint FILE")
    header = _read_header(path)
    return _info_from_header(path, header, file_sha256(path))


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
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_checkpoint_info(path)
    model = build_model(info)
    try:
        state = load_file(str(info.path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{info.path}: unreadable safetensors tensors ({str(exc).splitlines()[0]})") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        what = f"lacks tensor {missing[0]}" if missing else f"has unexpected tensor {extra[0]}"
        more = len(missing) + len(extra) - 1
        raise CheckpointError(f"{info.path}: weights do not match the architecture ({what}"
                              + (f" and {more} more" if more else "") + ")")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{info.path}: weights do not match the architecture (tensor {k} has shape "
                                  f"{tuple(state[k].shape)}, architecture needs {tuple(v.shape)})")
        if not state[k].is_floating_point():
            raise CheckpointError(f"{info.path}: tensor {k} is {state[k].dtype}, expected floating point")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    model.eval()
    return LoadedCheckpoint(model=model, info=info)


def write_checkpoint(path: str | Path, model, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s state dict with contract metadata (values JSON-encoded unless strings).

    The exporter in ``distill`` writes the real files; this exists for tests and benchmarks that
    need a checkpoint of a given architecture.
    """
    from safetensors.torch import save_file

    path = Path(path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path
