"""Patch sets for training: ImageFolder trees or a wsi-triage tile store plus a label table.

Everything is preloaded into one uint8 tensor (N, S, S, 3) at the model's input size, and
augmentation runs as batched tensor ops (one ``grid_sample`` for flips / 90-degree rotations /
scale, then colour jitter), which is what makes CPU training practical.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsi_contracts.errors import StoreError

from .errors import DistillError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "AugConfig", "PatchSet", "augment", "balanced_epoch_indices",
           "group_keys", "load_imagefolder", "load_tilestore", "read_exclude", "scan_imagefolder",
           "split_paths", "stratified_split", "to_input"]

log = logging.getLogger("distill")

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PatchSet:
    """Preloaded patches: ``images`` (N, S, S, 3) uint8, ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    fingerprint: str
    source: str
    paths: list[str] | None = None  # class/file of each image (ImageFolder only)


def read_exclude(path: str | Path | None) -> set[str]:
    """Relative paths (``class/file``) listed one per line; ``#`` starts a comment."""
    if not path:
        return set()
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"{p}: exclude list not found")
    out = set()
    for line in p.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(line.replace("\\", "/"))
    return out


def scan_imagefolder(root: str | Path, exclude: set[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """(relative paths, label indices, sorted class names) of ``root/<class>/*.{png,jpg,tif}``,
    minus the relative paths in ``exclude``."""
    root = Path(root)
    if not root.is_dir():
        raise DistillError(f"{root}: data folder not found")
    exclude = exclude or set()
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    rels: list[str] = []
    labels: list[int] = []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                rel = f"{c}/{f.name}"
                if rel not in exclude:
                    rels.append(rel)
                    labels.append(ci)
    if not rels:
        raise DistillError(f"{root}: no images found in <class>/ subfolders (png, jpg, tif)")
    return rels, labels, classes


def fingerprint(entries: list[str], extra: str = "") -> str:
    """sha256 over the sorted entry strings (relpath:size) and ``extra``."""
    h = hashlib.sha256()
    for e in sorted(entries):
        h.update(e.encode())
        h.update(b"\n")
    h.update(extra.encode())
    return h.hexdigest()


def _load_resized(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR, reducing_gap=None)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DistillError(f"{path}: cannot read image ({e})") from None


def load_imagefolder(
    root: str | Path, size: int, exclude: str | Path | None = None, cache_dir: str | Path | None = None,
    class_names: list[str] | None = None,
) -> PatchSet:
    """Decode an ImageFolder tree at ``size`` px. With ``cache_dir`` the decoded array is cached
    as ``.npy`` keyed by the data fingerprint and size.

    With ``class_names`` (e.g. a checkpoint's classes) the folder may hold any subset of them,
    matched by name and checked before any image is decoded; labels then index ``class_names``.
    """
    root = Path(root)
    rels, labels, classes = scan_imagefolder(root, read_exclude(exclude))
    if class_names is not None:
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise DistillError(f"{root}: class folders {unknown} are not among the model's classes {list(class_names)}")
        labels = [class_names.index(classes[i]) for i in labels]
        classes = list(class_names)
    entries = [f"{r}:{(root / r).stat().st_size}" for r in rels]
    fp = fingerprint(entries)
    cache = Path(cache_dir) / f"imgs-{fp[:16]}-{size}.npy" if cache_dir else None
    if cache is not None and cache.is_file():
        arr = np.load(cache)
    else:
        log.info("decoding %d images of %s at %d px%s", len(rels), root, size,
                 f" (cached in {cache_dir} for the next run)" if cache is not None else "")
        arr = np.stack([_load_resized(root / r, size) for r in rels])
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npy")
            np.save(tmp, arr)
            tmp.replace(cache)
    return PatchSet(torch.from_numpy(arr), torch.tensor(labels, dtype=torch.int64), classes, fp, str(root), rels)


def load_tilestore(
    store: str | Path, labels_csv: str | Path, size: int, class_names: list[str] | None = None
) -> PatchSet:
    """Patches from a complete wsi-triage tile store (docs/contracts.md section 1) and a CSV label
    table with columns ``tile_index,label`` (label = class name). Unlabelled tiles are skipped.

    The store is read through :mod:`wsi_contracts.tilestore`, so every shard is checked against its
    recorded digest before it is decoded: a missing or damaged shard is a one-line error naming it.
    """
    from wsi_contracts import tilestore as tile_store  # zarr takes ~0.8 s to import: only when a store is read

    store, labels_csv = Path(store), Path(labels_csv)
    if not labels_csv.is_file():
        raise DistillError(f"{labels_csv}: label table not found")
    try:
        group = tile_store.require_complete(store)
        meta = tile_store.read_store_meta(group)
    except StoreError as e:
        raise DistillError(str(e)) from None
    rows: list[tuple[int, str]] = []
    with open(labels_csv, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"tile_index", "label"} <= set(reader.fieldnames):
            raise DistillError(f"{labels_csv}: needs a header with columns tile_index,label")
        for r in reader:
            try:
                rows.append((int(r["tile_index"]), r["label"].strip()))
            except ValueError:
                raise DistillError(f"{labels_csv}: bad tile_index {r['tile_index']!r}") from None
    if not rows:
        raise DistillError(f"{labels_csv}: no labelled tiles")
    n = meta.n_tiles
    bad = [i for i, _ in rows if not 0 <= i < n]
    if bad:
        raise DistillError(f"{labels_csv}: tile_index {bad[0]} outside the store's {n} tiles")
    classes = class_names or sorted({lab for _, lab in rows})
    unknown = sorted({lab for _, lab in rows} - set(classes))
    if unknown:
        raise DistillError(f"{labels_csv}: labels {unknown} not in class names {classes}")
    try:
        data = tile_store.read_tiles(group, np.array([i for i, _ in rows], dtype=np.int64))
    except StoreError as e:  # a missing, damaged or replaced shard (never fill-value tiles)
        raise DistillError(str(e)) from None
    t = torch.from_numpy(data).permute(0, 3, 1, 2).float()
    if t.shape[-1] != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    images = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    labels = torch.tensor([classes.index(lab) for _, lab in rows], dtype=torch.int64)
    attrs = json.dumps(meta.slide_fingerprint or "")
    fp = fingerprint([f"{i}:{lab}" for i, lab in rows], extra=attrs)
    return PatchSet(images, labels, list(classes), fp, str(store))


def group_keys(paths: list[str], pattern: str | None) -> list[str] | None:
    """One group key per ``class/file`` path: the regex's first capture group (or whole match)
    searched in the path; a path it does not match is its own group. ``None`` without a pattern.

    E.g. ``(.+?)_rot\\d+`` puts ``a/cell7_rot90.png`` and ``a/cell7_rot180.png`` in group ``a/cell7``.
    """
    if not pattern:
        return None
    rx = re.compile(pattern)
    out = []
    for p in paths:
        m = rx.search(p)
        out.append(("g:" + (m.group(1) if rx.groups else m.group(0))) if m else "p:" + p)
    return out


def stratified_split(labels: torch.Tensor, val_frac: float, seed: int,
                     groups: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stratified (train, val) index split: per class, a seeded permutation and
    the first ``round(val_frac * n_c)`` (at least 1 when the class has 2+) go to val.

    With ``groups`` (one key per image, :func:`group_keys`) whole groups are split instead, so
    copies of one cell (rotations, augmentations) never sit on both sides: per class (of a
    group's first image) a seeded permutation of its groups, and groups go to val until it holds
    ``round(val_frac * n_c)`` images (at least one group when the class has 2+ groups).
    """
    if groups is not None:
        return _grouped_split(labels, val_frac, seed, groups)
    g = torch.Generator().manual_seed(int(seed))
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(val_frac * len(idx)))
        if val_frac > 0 and len(idx) >= 2:
            k = max(1, min(k, len(idx) - 1))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(val)).values


def split_paths(root: str | Path, val_frac: float, seed: int, exclude: str | Path | None = None,
                group_pattern: str | None = None) -> tuple[list[str], list[str]]:
    """(train, validation) relative paths of an ImageFolder under distill's split, without decoding
    an image: the validation side is the set a model trained with these settings never learned from
    (for choosing pipeline settings on cells the model did not see)."""
    rels, labels, _ = scan_imagefolder(root, read_exclude(exclude))
    train, val = stratified_split(torch.tensor(labels, dtype=torch.int64), val_frac, seed,
                                  group_keys(rels, group_pattern))
    return [rels[i] for i in train.tolist()], [rels[i] for i in val.tolist()]


def _grouped_split(labels: torch.Tensor, val_frac: float, seed: int,
                   groups: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(groups) != len(labels):
        raise DistillError(f"{len(groups)} group keys for {len(labels)} images")
    members: dict[str, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    by_class: dict[int, list[str]] = {}
    for key in sorted(members):
        by_class.setdefault(int(labels[members[key][0]]), []).append(key)
    g = torch.Generator().manual_seed(int(seed))
    train, val = [], []
    for c in sorted(by_class):
        keys = by_class[c]
        keys = [keys[i] for i in torch.randperm(len(keys), generator=g).tolist()]
        n_c = sum(len(members[k]) for k in keys)
        want = int(round(val_frac * n_c))
        if val_frac > 0 and len(keys) >= 2:
            want = max(want, 1)
        taken = 0
        for j, k in enumerate(keys):
            if taken < want and j < len(keys) - 1:
                val.extend(members[k])
                taken += len(members[k])
            else:
                train.extend(members[k])
    return torch.sort(torch.tensor(train, dtype=torch.int64)).values, torch.sort(torch.tensor(val, dtype=torch.int64)).values


@dataclass
class AugConfig:
    flips: bool = True
    rot90: bool = True
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    stain: float = 0.05  # per-channel gain jitter (mild stain variation)


def to_input(batch_u8: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> normalised (B, 3, S, S) float32."""
    x = batch_u8.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def augment(
    batch_u8: torch.Tensor, cfg: AugConfig, g: torch.Generator, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> torch.Tensor:
    """Batched cytology augmentation -> normalised (B, 3, S, S) float32.

    Geometry: one affine per sample (random 90-degree rotation, flips, isotropic scale) applied
    by ``grid_sample`` with reflection padding. Colour: brightness, contrast, saturation and
    per-channel gain, each a uniform factor around 1.
    """
    b = batch_u8.shape[0]
    x = batch_u8.permute(0, 3, 1, 2).float().div_(255.0)

    def u(lo, hi, *shape):
        return torch.rand(b, *shape, generator=g) * (hi - lo) + lo

    k = torch.randint(0, 4, (b,), generator=g) if cfg.rot90 else torch.zeros(b, dtype=torch.long)
    ang = k.float() * (torch.pi / 2)
    cos, sin = torch.cos(ang).round(), torch.sin(ang).round()
    sx = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0) if cfg.flips else torch.ones(b)
    sc = u(cfg.scale[0], cfg.scale[1]) if cfg.scale else torch.ones(b)
    inv = 1.0 / sc  # sampling grid is in output->input coordinates
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * sx * inv
    theta[:, 0, 1] = -sin * inv
    theta[:, 1, 0] = sin * sx * inv
    theta[:, 1, 1] = cos * inv
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    if cfg.brightness:
        x = x * u(1 - cfg.brightness, 1 + cfg.brightness, 1, 1, 1)
    if cfg.contrast:
        mu = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mu) * u(1 - cfg.contrast, 1 + cfg.contrast, 1, 1, 1) + mu
    if cfg.saturation:
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - grey) * u(1 - cfg.saturation, 1 + cfg.saturation, 1, 1, 1) + grey
    if cfg.stain:
        x = x * u(1 - cfg.stain, 1 + cfg.stain, 3, 1, 1)
    x = x.clamp_(0, 1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def balanced_epoch_indices(labels: torch.Tensor, n: int | None, g: torch.Generator) -> torch.Tensor:
    """Shuffled indices for one epoch: all of them when ``n`` is None, else ``n`` samples drawn
    class-balanced (equal count per class, with replacement only when a class is too small)."""
    if not n:
        return torch.randperm(len(labels), generator=g)
    classes = torch.unique(labels)
    per = n // len(classes)
    out = []
    for c in classes.tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) >= per:
            out.append(idx[torch.randperm(len(idx), generator=g)[:per]])
        else:
            out.append(idx[torch.randint(0, len(idx), (per,), generator=g)])
    allidx = torch.cat(out)
    return allidx[torch.randperm(len(allidx), generator=g)]
