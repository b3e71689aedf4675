"""Every check a training run can make before it decodes an image or builds a model: the data
is there, its classes are those the config and the teacher expect, the suspicious classes exist,
the group pattern matches, the teacher fits. A problem is one DistillError line."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .data import fingerprint, read_exclude, scan_imagefolder
from .errors import DistillError

__all__ = ["DataPlan", "check_data", "check_training"]


@dataclass(frozen=True)
class DataPlan:
    """What a scan of the data found (no image decoded)."""

    class_names: list[str]
    counts: dict[str, int]
    fingerprint: str | None  # None for a tile store (known after loading)
    n_groups: int | None = None



def class_counts(root: Path, labels, classes: list[str]) -> dict[str, int]:
    """Images per class of an ImageFolder scan; refuses empty class folders and a single class."""
    counts = {c: 0 for c in classes}
    for i in labels:
        counts[classes[i]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DistillError(f"{root}: class folders {empty} hold no images (png, jpg, tif)")
    if len(classes) < 2:
        raise DistillError(f"{root}: only one class folder ({classes}); a classifier needs two or more")
    return counts

def check_data(cfg: TrainConfig) -> DataPlan:
    """Scan the ImageFolder (or the tile store's label table) named by ``cfg``."""
    if cfg.tile_store:
        if not cfg.labels_csv:
            raise DistillError("a tile_store needs labels_csv (CSV of tile_index,label)")
        if cfg.group_pattern:
            raise DistillError("group_pattern applies to ImageFolder data (class/file paths), not to a tile_store")
        if not Path(cfg.tile_store).exists():
            raise DistillError(f"{cfg.tile_store}: tile store not found")
        p = Path(cfg.labels_csv)
        if not p.is_file():
            raise DistillError(f"{p}: label table not found")
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "label" not in reader.fieldnames:
                raise DistillError(f"{p}: needs a header with columns tile_index,label")
            labs = [r["label"].strip() for r in reader]
        counts = {c: labs.count(c) for c in sorted(set(labs))}
        return DataPlan(sorted(counts), counts, None)
    if not cfg.data:
        raise DistillError("no training data: set data (ImageFolder root) or tile_store + labels_csv")
    root = Path(cfg.data)
    rels, labels, classes = scan_imagefolder(root, read_exclude(cfg.exclude))
    counts = class_counts(root, labels, classes)
    fp = fingerprint([f"{r}:{(root / r).stat().st_size}" for r in rels])
    n_groups = None
    if cfg.group_pattern:
        rx = re.compile(cfg.group_pattern)
        hits = [m for m in map(rx.search, rels) if m]
        if not hits:
            raise DistillError(f"group_pattern {cfg.group_pattern!r} matches none of the {len(rels)} image paths "
                               f"(it is searched in class/file, e.g. {rels[0]!r})")
        from .data import group_keys

        n_groups = len(set(group_keys(rels, cfg.group_pattern)))
    return DataPlan(classes, counts, fp, n_groups)


def check_training(cfg: TrainConfig, role: str, teacher_meta: dict[str, Any] | None = None) -> DataPlan:
    """All checks for ``train-teacher`` / ``distill`` (``role`` teacher | student).

    ``teacher_meta``: the teacher checkpoint's metadata when a teacher is used.
    """
    for name in ("teacher_init",):
        v = getattr(cfg, name)
        if v and not Path(v).is_file():
            raise DistillError(f"{v}: {name} weight file not found")
    if cfg.exclude and not Path(cfg.exclude).is_file():
        raise DistillError(f"{cfg.exclude}: exclude list not found")
    plan = check_data(cfg)
    if cfg.tile_mpp is None:
        raise DistillError("tile_mpp is not set: give the pixel size (um/px) of the training images, "
                           "which is what wsi-triage tiles slides at")
    if not cfg.suspicious_classes:
        raise DistillError(f"suspicious_classes is empty: name the classes wsi-triage should flag, from {plan.class_names}")
    unknown = [c for c in cfg.suspicious_classes if c not in plan.class_names]
    if unknown:
        raise DistillError(f"suspicious classes {unknown} are not among the data's classes {plan.class_names}")
    from .models import PRESETS

    depth_s = cfg.student_depth or PRESETS[cfg.preset]["student_depth"]
    if teacher_meta is not None:
        if teacher_meta["class_names"] != plan.class_names:
            raise DistillError(f"teacher classes {teacher_meta['class_names']} != data classes {plan.class_names}")
        if teacher_meta["input_size"] != cfg.img_size:
            raise DistillError(f"teacher input_size {teacher_meta['input_size']} != img_size {cfg.img_size}")
        prov = teacher_meta["provenance"]
        if plan.fingerprint is not None and prov.get("data_fingerprint") not in (None, plan.fingerprint) or \
                prov.get("split") not in (None, split_record(cfg)):
            raise DistillError("the teacher was trained on other data or another train/val split "
                               "(data_fingerprint / split differ); its validation images could leak")
        depth_t = teacher_meta["architecture"]["depth"]
        if role == "student" and cfg.mode == "mdkd":
            for si, ti in cfg.mdkd.block_map:
                if not (1 <= si <= depth_s and 1 <= ti <= depth_t):
                    raise DistillError(f"mdkd.block_map pair ({si}, {ti}) is outside student blocks 1..{depth_s} / "
                                       f"teacher blocks 1..{depth_t}")
    if role == "student" and cfg.student_init_blocks and len(cfg.student_init_blocks) != depth_s:
        raise DistillError(f"student_init_blocks {cfg.student_init_blocks} must name one teacher block per "
                           f"student block ({depth_s})")
    return plan


def split_record(cfg: Any) -> dict[str, Any]:
    """The split a run records in its provenance (group_pattern only when one is set, so older
    checkpoints keep matching)."""
    rec: dict[str, Any] = {"seed": cfg.split_seed, "val_frac": cfg.val_frac}
    if getattr(cfg, "group_pattern", None):
        rec["group_pattern"] = cfg.group_pattern
    return rec
