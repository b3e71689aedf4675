"""The student checkpoint (docs/contracts.md section 2): one reader, one validator, one writer.

One ``.safetensors`` file: the state dict of a timm ``VisionTransformer`` plus string metadata.
``distill`` writes it, ``wsi_pipeline`` reads it; both go through this module, so a file one side
writes is a file the other side accepts. The header is parsed by hand (no torch needed to read the
metadata), so a PyTorch pickle/zip file is recognised and refused without any unpickling, and every
field is type- and range-checked against the tensors' own shapes before anything is allocated.
Every problem is a one-line :class:`~wsi_contracts.errors.CheckpointError` naming the file and the
field. Building a model from the file is not the format: each side does that itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .ood import OOD_KEY, OOD_PREFIX, TENSORS, OodStats, parse_ood_metadata

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_HEADER_BYTES", "REQUIRED_FIELDS", "MAX_IMAGE_SIZE", "MAX_TILE_MPP",
           "ARCH_INT_FIELDS", "ARCH_REQUIRED", "ARCH_BOOL_FIELDS", "ARCH_RATE_FIELDS", "GLOBAL_POOLS", "FLOAT_DTYPES",
           "CheckpointInfo", "file_sha256", "read_header", "check_format_version", "read_info", "encode_metadata",
           "write_checkpoint", "read_weights", "check_weights_finite", "load_weights", "ood_stats", "TTA_KEY", "TTA_VIEWS", "TestTimeAugmentation",
           "copy_with_metadata"]

FORMAT = "wsi-triage-student"
#: the version this code writes; a reader accepts every version from 1 up to it, nothing newer
FORMAT_VERSION = 1
#: a safetensors JSON header larger than this is not a checkpoint we wrote
MAX_HEADER_BYTES = 100 * 1024 * 1024
REQUIRED_FIELDS = ("format", "format_version", "architecture", "class_names", "suspicious_classes",
                   "normalization", "input_size", "tile_size", "tile_mpp", "provenance")

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
#: optional metadata field: how the checkpoint's scores are meant to be computed (test-time augmentation)
TTA_KEY = "tta"
#: the view sets a checkpoint may declare: each is a set of the square tile's symmetries, the
#: identity first (``rot4``: the four quarter turns; ``flips``: identity, mirror left-right,
#: mirror top-bottom, half turn; ``d8``: the eight symmetries of the square)
TTA_VIEWS = {"none": 1, "rot4": 4, "flips": 4, "d8": 8}


@dataclass(frozen=True)
class TestTimeAugmentation:
    """A tile's class probabilities are the mean over ``views`` of the tile, turned and mirrored.

    Cells have no orientation on the glass, so the views are equally valid pictures of the same
    cell, and their mean is steadier than one. Tiles whose first (unturned) view gives a summed
    suspicious-class probability below ``floor`` keep that view's probabilities: clearly normal
    tiles are the many, and re-scoring them costs time without changing what is flagged."""

    __test__ = False  # not a pytest class, despite the name

    views: str = "none"
    floor: float = 0.0

    @property
    def n_views(self) -> int:
        return TTA_VIEWS[self.views]

    def as_dict(self) -> dict[str, Any]:
        return {"views": self.views, "floor": self.floor}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint declares, checked; everything needed to score without building the model."""

    path: Path
    sha256: str  # of the whole file: the model's identity
    class_names: tuple[str, ...]
    suspicious_classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    tile_size: int
    tile_mpp: float
    architecture: dict[str, Any]  # VisionTransformer keyword arguments plus "family", checked
    format_version: int = FORMAT_VERSION
    metadata: dict[str, Any] = field(default_factory=dict)  # every metadata field, JSON-decoded
    ood: dict[str, Any] | None = None  # the optional out-of-domain entry; None: no OOD score
    tta: TestTimeAugmentation = TestTimeAugmentation()  # metadata field ``tta``; default: one view

    @property
    def sha12(self) -> str:
        return self.sha256[:12]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def provenance(self) -> dict[str, Any]:
        return self.metadata["provenance"]

    @property
    def extra(self) -> dict[str, Any]:
        """The metadata fields beyond the required ones (``stain``, ``placement``, ``ood``, ...)."""
        return {k: v for k, v in self.metadata.items() if k not in REQUIRED_FIELDS}


_SHA_CACHE: dict[tuple[str, int, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached on (path, inode, size, mtime) so repeated calls are free."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
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


def read_header(path: str | Path) -> dict[str, Any]:
    """The safetensors JSON header, refusing anything else before it is parsed as a model."""
    path = Path(path)
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
                "student checkpoints are accepted, pickles are never opened (export one with `wsi-distill export`)")
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


def check_format_version(path: str | Path, value: Any) -> int:
    """The one version rule: an integer from 1 up to :data:`FORMAT_VERSION` (older files stay readable)."""
    if isinstance(value, str):
        value = _decode(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{path}: metadata field format_version is not an integer: {value!r}")
    if value > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {value} is newer than this wsi-triage "
                              f"(reads up to {FORMAT_VERSION})")
    if value < 1:
        raise CheckpointError(f"{path}: checkpoint format_version {value} is not supported (versions start at 1)")
    return value


def _validate(path: Path, header: dict[str, Any], sha256: str) -> CheckpointInfo:
    """Every check of the contract on the JSON header, before a model is built or a weight read."""
    raw = header.get("__metadata__") or {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: safetensors metadata is not a string map")
    meta = {k: _decode(v) for k, v in raw.items()}
    if "format" not in meta:
        raise CheckpointError(f"{path}: not a wsi-triage student checkpoint (metadata lacks format)")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{path}: metadata format is {meta['format']!r}, expected {FORMAT!r}")
    # the version before the fields: a newer version may have other fields
    if "format_version" not in meta:
        raise CheckpointError(f"{path}: not a wsi-triage student checkpoint (metadata field 'format_version' is missing)")
    version = check_format_version(path, meta["format_version"])
    missing = [k for k in REQUIRED_FIELDS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: not a wsi-triage student checkpoint (metadata lacks {', '.join(missing)})")

    classes, suspicious = _check_classes(path, meta)
    mean, std = _check_normalization(path, meta["normalization"])
    ints = {name: _int_field(path, name, meta[name], 8, MAX_IMAGE_SIZE) for name in ("input_size", "tile_size")}
    tile_mpp = _check_tile_mpp(path, meta["tile_mpp"])
    if not isinstance(meta["provenance"], dict):
        raise CheckpointError(f"{path}: metadata field provenance must be a JSON object")
    arch = _check_architecture(path, meta["architecture"], len(classes), ints["input_size"], header)
    ood = _check_ood(path, meta, header, arch)
    tta = _check_tta(path, meta.get(TTA_KEY))
    return CheckpointInfo(
        path=path, sha256=sha256, class_names=tuple(classes), suspicious_classes=tuple(suspicious),
        mean=mean, std=std, input_size=ints["input_size"], tile_size=ints["tile_size"], tile_mpp=tile_mpp,
        architecture=dict(arch), format_version=version, metadata=meta, ood=ood, tta=tta,
    )


def _check_classes(path: Path, meta: dict[str, Any]) -> tuple[list[str], list[str]]:
    """class_names (unique, non-empty names) and suspicious_classes (a non-empty subset of them)."""
    classes = meta["class_names"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise CheckpointError(f"{path}: metadata field class_names must be a non-empty JSON list of names")
    if len(set(classes)) != len(classes):
        raise CheckpointError(f"{path}: metadata field class_names has duplicate names")
    suspicious = meta["suspicious_classes"]
    if not isinstance(suspicious, list) or not suspicious or not all(isinstance(c, str) for c in suspicious):
        raise CheckpointError(f"{path}: metadata field suspicious_classes must be a non-empty JSON list of class names")
    unknown = [c for c in suspicious if c not in classes]
    if unknown:
        raise CheckpointError(f"{path}: metadata field suspicious_classes names {', '.join(map(repr, unknown))}, "
                              "not in class_names")
    return classes, suspicious


def _check_normalization(path: Path, norm: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std): three numbers each, every std positive."""
    try:
        mean = tuple(float(v) for v in norm["mean"])
        std = tuple(float(v) for v in norm["std"])
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path}: metadata field normalization must be "
                              "{\"mean\": [3 numbers], \"std\": [3 numbers]}") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError(f"{path}: metadata field normalization needs 3 means and 3 positive stds")
    return mean, std


def _check_tile_mpp(path: Path, value: Any) -> float:
    """The tile pixel size: a finite number (or its string) in (0, MAX_TILE_MPP] um/px."""
    mpp = value
    if isinstance(mpp, str):
        try:
            mpp = float(mpp)
        except ValueError:
            raise CheckpointError(f"{path}: metadata field tile_mpp is not a number: {value!r}") from None
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)):
        raise CheckpointError(f"{path}: metadata field tile_mpp is not a number: {value!r}")
    mpp = float(mpp)
    if not (math.isfinite(mpp) and 0 < mpp <= MAX_TILE_MPP):
        raise CheckpointError(f"{path}: metadata field tile_mpp must be a finite pixel size in (0, {MAX_TILE_MPP:g}] "
                              f"um/px, got {value!r}")
    return mpp


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
    extra = sorted(set(names) - set(TENSORS))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]}")
    return entry


def _check_tta(path: Path, value: Any) -> TestTimeAugmentation:
    """The optional ``tta`` field: ``{"views": one of TTA_VIEWS, "floor": a number in [0, 1]}``."""
    if value is None:
        return TestTimeAugmentation()
    if not isinstance(value, dict) or set(value) - {"views", "floor"}:
        raise CheckpointError(f"{path}: metadata field {TTA_KEY} must be a JSON object "
                              f"{{\"views\": one of {', '.join(TTA_VIEWS)}, \"floor\": a number in [0, 1]}}")
    views, floor = value.get("views", "none"), value.get("floor", 0.0)
    if views not in TTA_VIEWS:
        raise CheckpointError(f"{path}: metadata field {TTA_KEY} views {views!r}: choose one of {', '.join(TTA_VIEWS)}")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
        raise CheckpointError(f"{path}: metadata field {TTA_KEY} floor must be a number in [0, 1], got {floor!r}")
    return TestTimeAugmentation(views, float(floor))


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


def read_info(path: str | Path) -> CheckpointInfo:
    """Read and validate a checkpoint's header and metadata (no weight is read, torch is not needed)."""
    path = Path(path)
    header = read_header(path)
    return _validate(path, header, file_sha256(path))


# --------------------------------------------------------------------------- writing


def encode_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """safetensors metadata is a string map: strings are stored as they are, everything else as JSON."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask  # a normal file, not the 0600 that safetensors creates


def write_checkpoint(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, Any], *,
                     fp16: bool = False) -> str:
    """Write a checkpoint atomically and return its sha256 (the model's identity).

    ``tensors``: the model's state dict (torch tensors), plus the ``ood.*`` statistics if any;
    ``metadata``: the contract fields (and any extra ones), encoded by :func:`encode_metadata`.
    ``fp16`` stores the model's floating-point tensors as float16 (``ood.*`` stay as given); otherwise
    every tensor is stored as given, bit for bit. The file is validated with the reader's own checks
    before it replaces ``path``, so a checkpoint the pipeline would refuse is never published.
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    state = {}
    for name, value in tensors.items():
        value = value.detach().to("cpu")
        if fp16 and value.is_floating_point() and not name.startswith(OOD_PREFIX):
            value = value.to(torch.float16)
        state[name] = value.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata=encode_metadata(metadata))
        _validate(path, read_header(tmp), sha256="")
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return file_sha256(path)


def copy_with_metadata(info: CheckpointInfo, path: str | Path, updates: Mapping[str, Any],
                       tensors: Mapping[str, Any] | None = None) -> str:
    """Write a copy of the checkpoint ``info`` describes with metadata fields replaced by ``updates``
    (calibration, OOD statistics, test-time augmentation, ...): every tensor as stored, bit for bit,
    except those given in ``tensors`` (e.g. new ``ood.*`` statistics). Refused when the file
    changed since ``info`` was read, so the copy is of the model that was measured. Returns sha256."""
    if file_sha256(info.path) != info.sha256:
        raise CheckpointError(f"{info.path}: the checkpoint changed since it was read; run again")
    state, ood = read_weights(info)
    return write_checkpoint(path, {**state, **ood, **(tensors or {})}, {**info.metadata, **updates})


# --------------------------------------------------------------------------- reading the weights


def read_weights(info: CheckpointInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's tensors and the ``ood.*`` tensors (torch, on CPU, as stored), every one finite."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(info.path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{info.path}: unreadable safetensors tensors ({str(exc).splitlines()[0]})") from None
    for name, value in state.items():
        if not value.is_floating_point():
            raise CheckpointError(f"{info.path}: tensor {name} is {value.dtype}, expected floating point")
        if not bool(torch.isfinite(value).all()):
            raise _not_finite(info, name)
    ood = {k: state.pop(k) for k in [k for k in state if k.startswith(OOD_PREFIX)]}
    return state, ood


def _not_finite(info: CheckpointInfo, name: str) -> CheckpointError:
    return CheckpointError(f"{info.path}: tensor {name} holds NaN or infinite values (damaged checkpoint); "
                           "export it again")


#: safetensors dtypes numpy reads as stored (bf16 has no numpy dtype)
_NUMPY_FLOATS = frozenset({"F16", "F32", "F64"})


def check_weights_finite(info: CheckpointInfo) -> None:
    """Refuse a checkpoint with a non-float, NaN or infinite tensor (the checks of :func:`read_weights`).

    A checkpoint of fp16/fp32/fp64 tensors is read one tensor at a time through numpy, without
    importing torch (a slide run checks before it tiles, and torch with its imports, ~0.5 GB
    resident, would sit under the tiling's peak); other dtypes go through :func:`read_weights`."""
    dtypes = {entry.get("dtype") for name, entry in read_header(info.path).items()
              if name != "__metadata__" and isinstance(entry, dict)}
    if not dtypes or not dtypes <= _NUMPY_FLOATS:
        read_weights(info)
        return
    import numpy as np
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(info.path), framework="numpy") as fh:
            for name in fh.keys():
                if not np.isfinite(fh.get_tensor(name)).all():
                    raise _not_finite(info, name)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{info.path}: unreadable safetensors tensors ({str(exc).splitlines()[0]})") from None


def load_weights(model: Any, info: CheckpointInfo) -> dict[str, Any]:
    """Load the checkpoint's weights into ``model`` (a torch module of its architecture, converted to
    the model's dtype), refusing any missing, extra or misshapen tensor. Returns the ``ood.*`` tensors."""
    state, ood = read_weights(info)
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
    model.load_state_dict(state, strict=True)
    return ood


def ood_stats(info: CheckpointInfo, ood: Mapping[str, Any]) -> OodStats | None:
    """The out-of-domain statistics from the ``ood.*`` tensors (:func:`read_weights`); None without them."""
    if info.ood is None:
        return None
    return OodStats(class_means=ood["ood.class_means"].float().numpy(), precision=ood["ood.precision"].float().numpy(),
                    threshold=float(info.ood["threshold"]), info=info.ood)
