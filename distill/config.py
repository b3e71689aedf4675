"""Training configs: the :class:`TrainConfig` fields, read from YAML and checked.

Relative paths in a config file are resolved against the file's own folder (so a config works
from any working directory and travels with its data); values given on the command line are
relative to the working directory as usual. Every type or range problem is one
:class:`~distill.errors.DistillError` line naming the config file, raised before any data is read.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wsi_contracts.checkpoint import MAX_IMAGE_SIZE, MAX_TILE_MPP

from .data import AugConfig
from .errors import DistillError
from .losses import MDKDConfig

__all__ = ["EXPORT_FIELDS", "MODES", "PATH_FIELDS", "PLACEMENTS", "RUNTIME_FIELDS", "STAINS", "TrainConfig", "config_from_dict",
           "dataclass_from_dict", "load_config", "run_folder", "training_identity"]

MODES = ("none", "kd", "mdkd")
STAINS = ("pap", "romanowsky", "he")
PLACEMENTS = ("grid", "cells")


@dataclass(frozen=True)
class TrainConfig:
    # data
    data: str | None = None  # ImageFolder root
    exclude: str | None = None  # file of relpaths never to use (e.g. configs/pbc_heldout.txt)
    tile_store: str | None = None  # or a wsi_pipeline tile store ...
    labels_csv: str | None = None  # ... with a tile_index,label table
    cache_dir: str | None = None  # decoded-image cache (.npy); None: decode every run
    val_frac: float = 0.15
    split_seed: int = 0  # fixed across runs so every model is scored on the same split
    group_pattern: str | None = None  # regex on class/file: images with the same match stay on one side
    samples_per_epoch: int | None = None  # class-balanced subset per epoch; None = all
    aug: AugConfig = field(default_factory=AugConfig)
    # model
    preset: str = "tiny"
    img_size: int = 128
    patch_size: int = 16
    teacher_depth: int | None = None
    student_depth: int | None = None
    drop_path: float = 0.1
    teacher_init: str | None = None  # local timm ViT weights for the teacher
    student_init_blocks: list[int] | None = None  # e.g. [4, 8, 12]: copy teacher blocks
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool | Literal["auto"] = "auto"  # auto: bf16 only on a GPU or a CPU with native bf16
    device: str = "auto"
    threads: int | None = None
    # distillation
    mode: str = "none"
    teacher: str | None = None  # teacher model.safetensors
    kd_alpha: float = 0.5
    kd_tau: float = 4.0
    mdkd: MDKDConfig = field(default_factory=MDKDConfig)
    # checkpoint metadata (export settings: changing them never blocks a resume; see export)
    suspicious_classes: list[str] = field(default_factory=list)
    tile_size: int = 128  # px of one slide tile, at tile_mpp, that the model sees (resized to img_size)
    tile_mpp: float | None = None  # um/px of those tiles: the pixel size of the training images
    stain: str | None = None  # pap | romanowsky | he: the foreground preset wsi-triage tiles with
    placement: str | None = None  # grid | cells: how wsi-triage places tiles (None: the pipeline's default)
    out: str = "runs/{role}"  # run folder; "{role}" becomes teacher or student


PATH_FIELDS = ("data", "exclude", "tile_store", "labels_csv", "cache_dir", "teacher", "teacher_init", "out")
EXPORT_FIELDS = ("suspicious_classes", "tile_size", "tile_mpp", "stain", "placement")
RUNTIME_FIELDS = ("device", "threads", "bf16", "cache_dir", "out")


def _type_ok(v: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(v, a) for a in args)
    if origin is Literal:
        return v in args
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, str)
    if origin is list:
        return isinstance(v, (list, tuple)) and all(_type_ok(x, args[0]) for x in v)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return isinstance(v, (list, tuple)) and all(_type_ok(x, args[0]) for x in v)
        return isinstance(v, (list, tuple)) and len(v) == len(args) and all(map(_type_ok, v, args))
    if dataclasses.is_dataclass(tp):
        return isinstance(v, tp)
    return isinstance(v, tp) if isinstance(tp, type) else True


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def dataclass_from_dict(cls: type, d: dict[str, Any], what: str) -> Any:
    """``cls(**d)`` after checking every key is a field and every value has the field's type
    (lists become tuples where the field is a tuple). Nested dataclass fields take dicts."""
    if not isinstance(d, dict):
        raise DistillError(f"{what} must be a mapping of fields, not {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - names)
    if bad:
        raise DistillError(f"unknown {what} keys {bad}")
    hints = typing.get_type_hints(cls)
    kw: dict[str, Any] = {}
    for k, v in d.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = dataclass_from_dict(tp, v, f"{what}.{k}" if what != "config" else k)
        if not _type_ok(v, tp):
            raise DistillError(f"{what if what != 'config' else 'field'} {k}: {v!r} is not {_type_name(tp)}")
        if typing.get_origin(tp) is tuple or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                              and any(typing.get_origin(a) is tuple for a in typing.get_args(tp))):
            v = tuple(v) if v is not None else v
        kw[k] = v
    return cls(**kw)


def _check_ranges(cfg: TrainConfig) -> None:
    def bad(msg: str) -> None:
        raise DistillError(msg)

    if cfg.img_size < 16 or cfg.patch_size < 1:
        bad(f"img_size {cfg.img_size} / patch_size {cfg.patch_size}: too small")
    if cfg.img_size > MAX_IMAGE_SIZE:  # the checkpoint contract's limit: refused now, not after training
        bad(f"img_size {cfg.img_size}: at most {MAX_IMAGE_SIZE} px")
    if cfg.img_size % cfg.patch_size:
        bad(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
    if not 16 <= cfg.tile_size <= MAX_IMAGE_SIZE:
        bad(f"tile_size {cfg.tile_size}: expected 16 - {MAX_IMAGE_SIZE} px of a slide tile at tile_mpp")
    if cfg.tile_mpp is not None and not 0.01 <= cfg.tile_mpp <= MAX_TILE_MPP:
        bad(f"tile_mpp {cfg.tile_mpp}: not a pixel size in um/px (0.01 - {MAX_TILE_MPP:g})")
    if not 0 <= cfg.val_frac < 1:
        bad(f"val_frac {cfg.val_frac}: must be in [0, 1)")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            bad(f"{name} {getattr(cfg, name)}: must be at least 1")
    if cfg.samples_per_epoch is not None and cfg.samples_per_epoch < 1:
        bad(f"samples_per_epoch {cfg.samples_per_epoch}: must be at least 1 (or null for all)")
    if cfg.lr <= 0 or cfg.min_lr < 0:
        bad(f"lr {cfg.lr} / min_lr {cfg.min_lr}: must be positive")
    if cfg.mode not in MODES:
        bad(f"mode {cfg.mode!r}: choose one of {list(MODES)}")
    if cfg.stain is not None and cfg.stain not in STAINS:
        bad(f"stain {cfg.stain!r}: choose one of {list(STAINS)}")
    if cfg.placement is not None and cfg.placement not in PLACEMENTS:
        bad(f"placement {cfg.placement!r}: choose one of {list(PLACEMENTS)}")
    if cfg.group_pattern is not None:
        try:
            re.compile(cfg.group_pattern)
        except re.error as e:
            bad(f"group_pattern {cfg.group_pattern!r}: not a regular expression ({e})")
    from .models import PRESETS

    if cfg.preset not in PRESETS:
        bad(f"preset {cfg.preset!r}: choose one of {sorted(PRESETS)}")
    if len(set(cfg.suspicious_classes)) != len(cfg.suspicious_classes):
        bad(f"suspicious_classes {cfg.suspicious_classes}: a class is listed twice")


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """TrainConfig from a (YAML) dict; unknown keys, wrong types and out-of-range values are
    user errors."""
    d = dict(d)
    if isinstance(d.get("mdkd"), dict) and "block_map" in d["mdkd"]:
        bm = d["mdkd"]["block_map"]
        if not (isinstance(bm, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in bm)):
            raise DistillError(f"mdkd.block_map {bm!r}: expected pairs [student block, teacher block]")
        d["mdkd"] = dict(d["mdkd"], block_map=[tuple(p) for p in bm])
    cfg = dataclass_from_dict(TrainConfig, d, "config")
    _check_ranges(cfg)
    return cfg


def _resolve_paths(d: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(d)
    for k in PATH_FIELDS:
        v = out.get(k)
        if isinstance(v, str) and v:
            p = os.path.expanduser(v)
            if not os.path.isabs(p):
                p = os.path.normpath(os.path.join(base, p))
            out[k] = p
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, relative paths resolved against its folder."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DistillError(f"{p}: config file not found")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise DistillError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise DistillError(f"{p}: config must be a mapping of fields")
    return _resolve_paths(d, p.parent)


def apply_sets(d: dict[str, Any], sets: tuple[str, ...] | list[str]) -> None:
    """Apply ``key=value`` overrides (dotted keys for nested sections; values parsed as YAML)."""
    import yaml

    for s in sets:
        if "=" not in s:
            raise DistillError(f"--set {s!r}: expected key=value")
        key, val = s.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DistillError(f"--set {s!r}: {p} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(val)
        except yaml.YAMLError:
            raise DistillError(f"--set {s!r}: value is not valid YAML") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                sets: tuple[str, ...] | list[str] = ()) -> TrainConfig:
    """Config file (optional) + command-line overrides (``None`` values ignored) + ``--set``s.

    Errors name the config file: ``<file>: <problem>``.
    """
    d = read_yaml(path) if path else {}
    for k, v in (overrides or {}).items():
        if v is not None:
            d[k] = v
    try:
        apply_sets(d, sets)
        return config_from_dict(d)
    except DistillError as e:
        if path:
            raise DistillError(f"{path}: {e}") from None
        raise


def run_folder(cfg: TrainConfig, role: str) -> Path:
    """The run folder of ``role`` (``{role}`` in ``out`` replaced)."""
    return Path(cfg.out.replace("{role}", role))


STUDENT_ONLY_FIELDS = ("mode", "teacher", "kd_alpha", "kd_tau", "mdkd", "student_depth", "student_init_blocks")
TEACHER_ONLY_FIELDS = ("teacher_depth", "teacher_init")


def training_identity(cfg_json: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's config that defines the trained weights: a run resumes only when this
    is unchanged (export settings, where/how fast it runs, and the other role's fields may
    change; one config serves teacher and student)."""
    other = {"teacher": STUDENT_ONLY_FIELDS, "student": TEACHER_ONLY_FIELDS}.get(cfg_json.get("role"), ())
    return {k: v for k, v in cfg_json.items() if k not in EXPORT_FIELDS + RUNTIME_FIELDS + other}
