"""Load a student checkpoint (one ``.safetensors`` file, contract in ``docs/contracts.md`` §2).

Only the safetensors format is accepted: the header is parsed by hand first, so a PyTorch
pickle/zip file is recognised and refused without any unpickling. Every problem becomes a
one-line :class:`~wsi_pipeline.errors.CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from wsi_contracts.errors import CheckpointError
from wsi_contracts.ood import OOD_KEY, OOD_PREFIX, OodStats, parse_ood_metadata

__all__ = ['CHECKPOINT_FORMAT', 'CHECKPOINT_FORMAT_VERSION', 'MAX_HEADER_BYTES', 'REQUIRED_FIELDS', 'DEFAULT_CHECKPOINT', 'CheckpointInfo', 'LoadedCheckpoint', 'file_sha256', 'MAX_IMAGE_SIZE', 'MAX_TILE_MPP', 'ARCH_INT_FIELDS', 'ARCH_REQUIRED', 'ARCH_BOOL_FIELDS', 'ARCH_RATE_FIELDS', 'GLOBAL_POOLS', 'FLOAT_DTYPES', 'read_checkpoint_info', 'build_model', 'load_checkpoint', 'check_weights', 'write_checkpoint']

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
    ood: dict[str, Any] | None = None  # the optional out-of-domain entry (wsi_pipeline.scoring.ood); None: no OOD score

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
    ood: OodStats | None = None  # out-of-domain statistics, when the checkpoint carries them


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
        newer = int(version) > CHECKPOINT_FORMAT_VERSION
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: metadata field format_version is not an integer: {version!r}") from None
    if newer:
        raise CheckpointError(f"{path}: checkpoint format_version {version} is newer than this wsi-triage")

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
    ints = {name: _int_field(path, name, meta[name], 8, MAX_IMAGE_SIZE) for name in ("input_size", "tile_size")}
    tile_mpp = meta["tile_mpp"]
    if isinstance(tile_mpp, str):
        try:
            tile_mpp = float(tile_mpp)
        except ValueError:
            raise bad("tile_mpp", f"is not a number: {meta['tile_mpp']!r}") from None
    if isinstance(tile_mpp, bool) or not isinstance(tile_mpp, (int, float)):
        raise bad("tile_mpp", f"is not a number: {meta['tile_mpp']!r}")
    tile_mpp = float(tile_mpp)
    if not (math.isfinite(tile_mpp) and 0 < tile_mpp <= MAX_TILE_MPP):
        raise bad("tile_mpp", f"must be a finite pixel size in (0, {MAX_TILE_MPP:g}] um/px, got {meta['tile_mpp']!r}")
    arch = _check_architecture(path, meta["architecture"], len(classes), ints["input_size"], header)
    ood = _check_ood(path, meta, header, arch)
    return CheckpointInfo(
        path=path, sha256=sha256, class_names=tuple(classes), suspicious_classes=tuple(suspicious),
        mean=mean, std=std, input_size=ints["input_size"], tile_size=ints["tile_size"], tile_mpp=tile_mpp,
        architecture=dict(arch), metadata=meta, ood=ood,
    )


def _check_ood(path: Path, meta: dict[str, Any], header: dict[str, Any], arch: dict[str, Any]) -> dict[str, Any] | None:
    """The optional out-of-domain statistics: metadata and tensor shapes checked from the header."""
    names = sorted(k for k in header if k.startswith(OOD_PREFIX))
    if OOD_KEY not in meta:
        if names:
            raise CheckpointError(f"{path}: tensor {names[0]} without the metadata field {OOD_KEY}")
        return None
    try:
        entry = parse_ood_metadata(meta[OOD_KEY])
    except ValueError as exc:
        raise CheckpointError(f"{path}: metadata field {OOD_KEY} {exc}") from None
    shapes = _tensor_shapes(path, {k: header[k] for k in names})
    dim = arch["embed_dim"]
    means, prec = shapes.get("ood.class_means"), shapes.get("ood.precision")
    if means is None or prec is None:
        raise CheckpointError(f"{path}: metadata field {OOD_KEY} needs tensors ood.class_means and ood.precision")
    if len(means) != 2 or not 1 <= means[0] <= arch["num_classes"] or means[1] != dim:
        raise CheckpointError(f"{path}: tensor ood.class_means has shape {means}, needs (1..{arch['num_classes']}, {dim})")
    if prec != (dim, dim):
        raise CheckpointError(f"{path}: tensor ood.precision has shape {prec}, needs ({dim}, {dim})")
    extra = sorted(set(names) - {"ood.class_means", "ood.precision"})
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]}")
    return entry


#: bounds that no student of this project comes near; they stop a hostile header before any allocation
MAX_IMAGE_SIZE = 4096
MAX_TILE_MPP = 100.0
ARCH_INT_FIELDS = {"img_size": (8, MAX_IMAGE_SIZE), "patch_size": (1, MAX_IMAGE_SIZE), "embed_dim": (1, 8192),
                   "depth": (1, 64), "num_heads": (1, 256), "num_classes": (1, 100_000), "in_chans": (3, 3),
                   "reg_tokens": (0, 64)}
ARCH_REQUIRED = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes")
ARCH_BOOL_FIELDS = ("class_token", "qkv_bias", "qk_norm", "no_embed_class", "pre_norm", "dynamic_img_size")
ARCH_RATE_FIELDS = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                    "drop_path_rate")
GLOBAL_POOLS = ("token", "avg", "avgmax", "max", "map", "")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _int_field(path: Path, name: str, value: Any, low: int, high: int, where: str = "metadata field") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise CheckpointError(f"{path}: {where} {name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise CheckpointError(f"{path}: {where} {name} must be in [{low}, {high}], got {value}")
    return value


def _tensor_shapes(path: Path, header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if (not isinstance(entry, dict) or not isinstance(entry.get("shape"), list)
                or not all(isinstance(v, int) and v >= 0 for v in entry["shape"])):
            raise CheckpointError(f"{path}: unknown checkpoint format (bad safetensors entry for {name!r})")
        if entry.get("dtype") not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} is {entry.get('dtype')}, expected floating point")
        shapes[name] = tuple(entry["shape"])
    return shapes


def _check_architecture(path: Path, arch: Any, n_classes: int, input_size: int,
                        header: dict[str, Any]) -> dict[str, Any]:
    """Type- and range-check every architecture field, then against the tensors' shapes in the header.

    Everything is decided from the JSON header, before a model is built or a weight is read, so
    a hostile field cannot make the loader allocate (a 13 TB embedding was once tried)."""
    where = "architecture field"
    if not isinstance(arch, dict):
        raise CheckpointError(f"{path}: metadata field architecture must be a JSON object of VisionTransformer arguments")
    if arch.get("family", "timm-vit") != "timm-vit":
        raise CheckpointError(f"{path}: metadata field architecture family {arch.get('family')!r} is not supported (only timm-vit)")
    known = {"family", "mlp_ratio", "global_pool", "init_values", "fc_norm", *ARCH_INT_FIELDS, *ARCH_BOOL_FIELDS,
             *ARCH_RATE_FIELDS}
    unknown = sorted(set(arch) - known)
    if unknown:
        raise CheckpointError(f"{path}: {where} {unknown[0]} is not supported (known: {', '.join(sorted(known))})")
    missing = [k for k in ARCH_REQUIRED if k not in arch]
    if missing:
        raise CheckpointError(f"{path}: metadata field architecture lacks {', '.join(missing)}")
    a = dict(arch)
    for name, (low, high) in ARCH_INT_FIELDS.items():
        if name in a:
            a[name] = _int_field(path, name, a[name], low, high, where)
    for name in ARCH_BOOL_FIELDS:
        if name in a and not isinstance(a[name], bool):
            raise CheckpointError(f"{path}: {where} {name} must be true or false, got {a[name]!r}")
    if "fc_norm" in a and a["fc_norm"] is not None and not isinstance(a["fc_norm"], bool):
        raise CheckpointError(f"{path}: {where} fc_norm must be true, false or null, got {a['fc_norm']!r}")
    for name in ARCH_RATE_FIELDS:
        v = a.get(name, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise CheckpointError(f"{path}: {where} {name} must be a number in [0, 1), got {v!r}")
    ratio = a.get("mlp_ratio", 4.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (math.isfinite(ratio) and 0 < ratio <= 16):
        raise CheckpointError(f"{path}: {where} mlp_ratio must be a number in (0, 16], got {ratio!r}")
    init = a.get("init_values")
    if init is not None and (isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init)):
        raise CheckpointError(f"{path}: {where} init_values must be a number or null, got {init!r}")
    if a.get("global_pool", "token") not in GLOBAL_POOLS:
        raise CheckpointError(f"{path}: {where} global_pool must be one of {GLOBAL_POOLS}, got {a.get('global_pool')!r}")
    if a["num_classes"] != n_classes:
        raise CheckpointError(f"{path}: metadata field architecture num_classes {a['num_classes']} != {n_classes} class_names")
    if a["img_size"] != input_size:
        raise CheckpointError(f"{path}: metadata field input_size {input_size} differs from architecture img_size {a['img_size']}")
    if a["img_size"] % a["patch_size"]:
        raise CheckpointError(f"{path}: {where} img_size {a['img_size']} is not a multiple of patch_size {a['patch_size']}")
    if a["embed_dim"] % a["num_heads"]:
        raise CheckpointError(f"{path}: {where} embed_dim {a['embed_dim']} is not divisible by num_heads {a['num_heads']}")

    shapes = _tensor_shapes(path, header)
    dim, patch = a["embed_dim"], a["patch_size"]
    prefix = int(a.get("class_token", True)) + a.get("reg_tokens", 0)
    n_pos = (a["img_size"] // patch) ** 2 + (0 if a.get("no_embed_class", False) else prefix)
    expected = {
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "pos_embed": (1, n_pos, dim),
        "head.weight": (a["num_classes"], dim),
        "blocks.0.mlp.fc1.weight": (int(dim * ratio), dim),
        f"blocks.{a['depth'] - 1}.attn.qkv.weight": (3 * dim, dim),
    }
    for name, shape in expected.items():
        if name not in shapes:
            raise CheckpointError(f"{path}: weights do not match the architecture (lacks tensor {name})")
        if shapes[name] != shape:
            raise CheckpointError(f"{path}: weights do not match the architecture (tensor {name} has shape "
                                  f"{shapes[name]}, architecture needs {shape})")
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if blocks != set(range(a["depth"])):
        extra = sorted(blocks - set(range(a["depth"])))
        raise CheckpointError(f"{path}: weights do not match the architecture (has unexpected tensor blocks.{extra[0]}.*; "
                              f"architecture depth is {a['depth']})")
    return a


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
    ood_state = {k: state.pop(k) for k in [k for k in state if k.startswith(OOD_PREFIX)]}
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
    _check_finite(info.path, state | ood_state)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    model.eval()
    ood = None
    if info.ood is not None:
        ood = OodStats(class_means=ood_state["ood.class_means"].to(torch.float32).numpy(),
                       precision=ood_state["ood.precision"].to(torch.float32).numpy(),
                       threshold=float(info.ood["threshold"]), info=info.ood)
    return LoadedCheckpoint(model=model, info=info, ood=ood)


def _check_finite(path: Path, state: dict) -> None:
    import torch

    for k, v in state.items():
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: tensor {k} holds NaN or infinite values (damaged checkpoint); "
                                  "export it again")


_FINITE_OK: set[str] = set()


def check_weights(info: CheckpointInfo) -> None:
    """Refuse weights with NaN/inf before any slide is tiled (once per checkpoint sha256 per process)."""
    if info.sha256 in _FINITE_OK:
        return
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(info.path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{info.path}: unreadable safetensors tensors ({str(exc).splitlines()[0]})") from None
    _check_finite(info.path, state)
    _FINITE_OK.add(info.sha256)


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
