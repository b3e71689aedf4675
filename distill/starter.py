"""``wsi-distill init``: a starter config for a folder of class subfolders (ImageFolder).

The config it writes is meant to be right the first time: it names the data relative to the
config file, lists the classes it found, refuses suspicious classes that are not among them,
and explains in comments the two numbers a slide pipeline depends on: ``tile_mpp`` (the pixel
size of the training images) and ``tile_size`` (how many of those pixels one tile spans).
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from .config import STAINS
from .data import scan_imagefolder
from .errors import DistillError
from .preflight import class_counts

__all__ = ["starter_config", "write_starter_config"]


def _image_sides(root: Path, rels: list[str], n: int = 64) -> list[tuple[int, int]]:
    """(width, height) of up to ``n`` images spread over the list (headers only)."""
    from PIL import Image

    step = max(1, len(rels) // n)
    out = []
    for r in rels[::step][:n]:
        try:
            with Image.open(root / r) as im:
                out.append(im.size)
        except OSError as e:
            raise DistillError(f"{root / r}: cannot read image ({e})") from None
    return out


def _suggest_img_size(side: int) -> int:
    """Model input: the images' side rounded to a multiple of 16, within 32..224."""
    return max(32, min(224, int(round(side / 16)) * 16))


def starter_config(data: str | Path, suspicious: list[str], config_path: str | Path, mpp: float | None = None,
                   stain: str | None = None, name: str | None = None) -> str:
    """The YAML text of a starter config for ``data`` to be written at ``config_path``."""
    data, config_path = Path(data), Path(config_path)
    rels, labels, classes = scan_imagefolder(data)
    counts = class_counts(data, labels, classes)
    if not suspicious:
        raise DistillError("suspicious names no class: name at least one suspicious class")
    unknown = [s for s in suspicious if s not in classes]
    if unknown:
        raise DistillError(f"{data}: suspicious classes {unknown} are not among its class folders {classes}")
    if stain is not None and stain not in STAINS:
        raise DistillError(f"stain {stain!r}: choose one of {list(STAINS)}")
    if mpp is not None and not 0.01 <= mpp <= 100:
        raise DistillError(f"mpp {mpp}: not a pixel size in um/px (0.01 - 100)")
    sizes = _image_sides(data, rels)
    side = int(statistics.median(max(w, h) for w, h in sizes))
    lo, hi = min(min(s) for s in sizes), max(max(s) for s in sizes)
    non_square = sum(1 for w, h in sizes if abs(w - h) > 0.1 * max(w, h))
    img = _suggest_img_size(side)
    base = config_path.resolve().parent
    try:
        data_rel = os.path.relpath(data.resolve(), base)
    except ValueError:  # another drive (Windows)
        data_rel = str(data.resolve())
    name = name or config_path.stem
    field_um = f"{side * mpp:.1f} um" if mpp else "side x tile_mpp um"
    lines = [
        f"# Starter config written by `wsi-distill init` for {data_rel} (paths relative to this file).",
        f"# {len(rels)} images in {len(classes)} classes: " + ", ".join(f"{c} {n}" for c, n in counts.items()),
        f"# Image sides: median {side} px (sampled {len(sizes)}: smallest side {lo}, largest {hi} px"
        + (f"; {non_square} not square, they are squeezed to square" if non_square else "") + ").",
        "#",
        "#   wsi-distill train-teacher --config THIS    # 12-block teacher -> runs/<name>/teacher",
        "#   wsi-distill distill --config THIS          # 3-block student (mode below) -> runs/<name>/student",
        "#   wsi-distill export runs/<name>/student --out <name>.safetensors",
        "#   wsi-triage run SLIDE --checkpoint <name>.safetensors",
        "",
        f"data: {data_rel}",
        "exclude: null           # optional file of class/file paths never to train or validate on",
        "cache_dir: runs/cache   # decoded images, reused by the next run",
        "val_frac: 0.15          # validation share per class (every run of this config uses the same split)",
        "split_seed: 0",
        "group_pattern: null     # regex on 'class/file' whose match (or first group) names one cell: images",
        "                        # with the same match stay on one side of the split. Set it when the folder",
        "                        # holds rotated/augmented copies of a cell, e.g. '(.+)_rot[0-9]+' for",
        "                        # cellA_rot90.png, cellA_rot180.png",
        f"suspicious_classes: [{', '.join(suspicious)}]",
        "",
        "# --- What a slide pipeline needs to cut tiles that look like these images ------------------",
        "# tile_mpp: the pixel size (um per pixel) of the training images as they are on disk. 40x scans",
        "#   are about 0.25, 20x about 0.5; if unsure, measure a known object (a red blood cell is about",
        "#   7.5 um across: mpp = 7.5 / its diameter in px). wsi-triage reads slides at this pixel size,",
        "#   so a wrong value shows the model cells at the wrong magnification.",
        "# tile_size: how many of those pixels one slide tile spans; the median image side, so a tile",
        f"#   covers the same field of view as one training image ({field_um}).",
        "# stain: the foreground preset wsi-triage tiles with (pap | romanowsky | he).",
        "# All three can be corrected after training, without retraining:",
        "#   wsi-distill export RUN --out F --tile-mpp X --tile-size N --stain S --suspicious A,B",
        f"tile_mpp: {mpp if mpp is not None else 'null   # REQUIRED: fill in before training (see above)'}",
        f"tile_size: {side}",
        f"stain: {stain or 'null'}",
        "",
        "# --- Model and training ----------------------------------------------------------------------",
        "# img_size: the model's input (images and tiles are resized to it); a multiple of patch_size.",
        f"#   {img}: the images' side rounded to a multiple of 16. On a CPU, 64 trains about 4x faster",
        "#   than 128 at some cost in accuracy; cells should stay at least ~20 px across.",
        "preset: tiny            # tiny (192 wide) for a CPU, small (384) or paper (768) for a GPU",
        f"img_size: {img}",
        "patch_size: 16",
        "epochs: 30",
        "batch_size: 64",
        "samples_per_epoch: null # null: every training image each epoch; a number: class-balanced draw",
        "lr: 0.001",
        "warmup_epochs: 1",
        "bf16: auto              # bf16 only on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), else fp32",
        "device: auto",
        "threads: null           # CPU threads (null: PyTorch's default)",
        "mode: mdkd              # student: none | kd | mdkd",
        f"teacher: runs/{name}/teacher/model.safetensors",
        f"out: runs/{name}/{{role}}     # {{role}} becomes teacher or student",
        "",
    ]
    return "\n".join(lines)


def write_starter_config(data: str | Path, suspicious: list[str], out: str | Path, mpp: float | None = None,
                         stain: str | None = None, overwrite: bool = False) -> Path:
    """Write :func:`starter_config` to ``out`` (refusing to replace an existing file)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DistillError(f"{out}: already exists (choose another out folder, or force to replace it)")
    text = starter_config(data, suspicious, out, mpp, stain)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out
