"""Where the demo student's accuracy goes between a centred PBC crop and the tile `run --tiling cells` scores.

Held-out PBC cells (configs/pbc_heldout.txt under ../shared/data/pbc, or the shipped held-out
cells) are scored by the checkpoint after each step the test bed and the pipeline apply, one
added at a time (each row = the row above plus one step):

  pbc         the original image, prepared as distill evaluated it (RGB, 128 px, bilinear if
              another size; ImageNet normalisation from the checkpoint)
  cutout      the central cell cut out of its image (wsi_pipeline.synth cut_out_cell, as the
              sprite bank cuts it) and composited, centred, on the synthetic glass of a smear
              (lit with the source images' white balance, synth.layout.slide_glass), at the
              image's own 0.27 um/px (no resampling)
  rescale     the sprite cut at the smear's pixel size (0.25 um/px, as `synth` does) and the tile
              read back at the checkpoint's 0.27 um/px / 128 px as `run` reads it (box filter)
  jpeg        + the smear's JPEG (q85, 4:2:0, as `synth` writes it) and the tile store's JPEG (q90)
  offset      + the tile centred where `--tiling cells` puts it (objects found on the ~2 um/px
              overview, as the tiler does) instead of on the cell
  neighbours  + red cells of the smear around the cell (its lattice, moderately filled field)
  smear       the tile `run --tiling cells` actually scored for the cell on synthetic smears
              (its own tile: the one nearest the cell's centre; cells outside the out-of-focus
              patch), paired with `pbc` and `neighbours` on the same source images; then the
              same on the negative smears only, and the cells inside the out-of-focus patch

Side rows isolate the colour: the cut-out cell's own transmittance (relative to its image's
background) lit with one white balance for cell and glass alike, ``cutout (PBC glass)`` with the
source images' (their median background, peach) and ``cutout (neutral glass)`` with the smear's
neutral glass. ``cutout`` is the cell as the smear renders it (sprite bank and slide glass; until
the renderer's fix it re-lit only the stained pixels peach on neutral glass: 69 % top-1).

Per class: top-1 (argmax among the checkpoint's classes = the cell's class) and the share called
suspicious (summed probability of the suspicious classes >= 0.5), i.e. detection for erythroblast
and ig, false suspicion for the normal classes.

    python benchmarks/diag_cell_tiles.py --n 25 --smears 2 [--json FILE|-]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_contracts.codecs import JpegTileCodec
from wsi_pipeline.aggregation import tile_suspicion, write_atomic
from wsi_pipeline.errors import UserError, WsiTriageError
from wsi_pipeline.foreground import WORKING_MPP, detect_foreground
from wsi_pipeline.scoring import load_checkpoint, predict_probs
from wsi_pipeline.synth import PBC_MPP, SHIPPED_CELLS, SynthConfig, glass_colour, list_cells, read_cell_list, synthesize, truth_paths
from wsi_pipeline.synth.layout import BLOOD_FREQ, slide_glass
from wsi_pipeline.synth.sprites import LUT, SpriteBank
from wsi_pipeline.tiling import plan_cells

__all__ = ["STEPS", "CellTiles", "cell_tiles", "smear_tiles", "tally", "slide_bound", "threshold_sweep", "main"]

ROOT = Path(__file__).resolve().parents[1]
SHARED_PBC = ROOT.parent / "shared" / "data" / "pbc"
HELDOUT_LIST = ROOT / "configs" / "pbc_heldout.txt"
STEPS = ("pbc", "cutout (PBC glass)", "cutout (neutral glass)", "cutout", "rescale", "jpeg", "offset", "neighbours")
SMEAR_MPP = 0.25
SLIDE_QUALITY = 85  # SynthConfig.quality
TILE_QUALITY = 90  # TilerConfig.jpeg_quality
CANVAS_UM = 128.0  # field composited around each cell (enough overview for the object finder)


def _jpeg(img: np.ndarray, quality: int, subsampling: str) -> np.ndarray:
    codec = JpegTileCodec(level=quality, subsampling=subsampling)
    return codec.decode_tile(codec.encode_tile(img))


def _slide_jpeg(img: np.ndarray) -> np.ndarray:
    """The smear's own JPEG (synth writes 4:2:0 at ``SynthConfig.quality``); coded in 256 px tiles there,
    here as one image (the 8 px blocks are the same wherever the tile grid falls on a multiple of 16)."""
    import imagecodecs

    data = imagecodecs.jpeg_encode(np.ascontiguousarray(img), level=SLIDE_QUALITY, colorspace="RGB",
                                   outcolorspace="YCBCR", subsampling=(2, 2))
    return imagecodecs.jpeg_decode(data)


def _composite(size: int, glass: np.ndarray, sprites: list[tuple[np.ndarray, float, float]]) -> np.ndarray:
    """Sprites (attenuation uint8 or transmittance float, centre x, y) on glass, as the smear renderer does
    (transmittances multiply; the sprite's top-left at int(c) - side // 2; truncation to uint8)."""
    T = np.ones((size, size, 3), np.float32)
    for k, cx, cy in sprites:
        t = LUT[k] if k.dtype == np.uint8 else k
        h, w = t.shape[:2]
        x0, y0 = int(cx) - w // 2, int(cy) - h // 2
        a0, b0 = max(y0, 0), max(x0, 0)
        a1, b1 = min(y0 + h, size), min(x0 + w, size)
        if a1 > a0 and b1 > b0:
            T[a0:a1, b0:b1] *= t[a0 - y0:a1 - y0, b0 - x0:b1 - x0]
    return np.minimum(T * glass, 255.0).astype(np.uint8)


def _read_tile(canvas: np.ndarray, x: float, y: float, side0: int, out: int) -> np.ndarray:
    """The level-0 box (x, y, side0) at the tile size ``out``, as Slide.read_region_mpp reads it (box filter
    when shrinking, bilinear when enlarging; white outside)."""
    from PIL import Image

    ix, iy = int(round(x)), int(round(y))
    pad = side0 + 2
    padded = np.pad(canvas, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    src = padded[iy + pad:iy + pad + side0, ix + pad:ix + pad + side0]
    if side0 == out:
        return np.ascontiguousarray(src)
    resample = Image.Resampling.BOX if out < side0 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(src).resize((out, out), resample))


def _overview(canvas: np.ndarray, mpp: float) -> tuple[np.ndarray, float, float]:
    """The tiler's overview of a field: box-downsampled to about WORKING_MPP (rgb, its mpp, downsample)."""
    from PIL import Image

    f = max(1, int(round(WORKING_MPP / mpp)))
    h, w = canvas.shape[:2]
    small = np.asarray(Image.fromarray(canvas).resize((w // f, h // f), Image.Resampling.BOX,
                                                      box=(0, 0, (w // f) * f, (h // f) * f)))
    return small, mpp * f, float(f)


@dataclass(frozen=True)
class CellTiles:
    """The tiles of one cell after each step (None: the step lost the cell) and the offset of its object tile."""

    relpath: str
    label: str
    tiles: dict[str, np.ndarray | None]
    offset_um: float | None  # object tile centre to the cell's centre


class _Field:
    """What the steps need from the test bed: sprite banks at 0.27 and at the smear's mpp, and the glass."""

    def __init__(self, pool, seed: int, mpp: float) -> None:
        self.mpp = mpp
        self.bank_native = SpriteBank(pool, 1.0, PBC_MPP, PBC_MPP, seed)
        self.bank = SpriteBank(pool, PBC_MPP / mpp, PBC_MPP, mpp, seed)
        self.glass = slide_glass(seed, self.bank)  # what the smear's sprites are lit with
        self.neutral = glass_colour(seed)
        self.pbc_glass = self.bank.background  # the source images' median background


def cell_tiles(pool, index: int, field: _Field, tile_size: int, tile_mpp: float, rng: np.random.Generator,
               raw_rgb: np.ndarray) -> CellTiles:
    """One cell's tile after each step of :data:`STEPS` (see the module docstring)."""
    from PIL import Image
    from wsi_pipeline.synth import cut_out_cell

    tiles: dict[str, np.ndarray | None] = {s: None for s in STEPS}
    rgb = raw_rgb
    if rgb.shape[:2] != (tile_size, tile_size):
        rgb = np.asarray(Image.fromarray(rgb).resize((tile_size, tile_size), Image.BILINEAR, reducing_gap=None))
    tiles["pbc"] = rgb
    native = field.bank_native.cell(index)
    sprite = field.bank.cell(index)
    offset_um = None
    if native is not None:
        c = tile_size / 2.0
        tiles["cutout"] = _composite(tile_size, field.glass, [(native[0], c, c)])
        raw = cut_out_cell(raw_rgb, 1.0)
        if raw is not None:
            tiles["cutout (PBC glass)"] = _composite(tile_size, field.pbc_glass, [(raw[0], c, c)])
            tiles["cutout (neutral glass)"] = _composite(tile_size, field.neutral, [(raw[0], c, c)])
    if sprite is not None:
        mpp = field.mpp
        tile0 = tile_size * tile_mpp / mpp
        side0 = int(round(tile0))
        size = int(math.ceil(CANVAS_UM / mpp / 16)) * 16
        cx = cy = size / 2.0
        plain = _composite(size, field.glass, [(sprite[0], cx, cy)])
        # the cell's centre: the middle of its sprite (as `synth` places it and as the truth box says)
        tiles["rescale"] = _read_tile(plain, cx - tile0 / 2.0, cy - tile0 / 2.0, side0, tile_size)
        coded = _slide_jpeg(plain)
        tiles["jpeg"] = _jpeg(_read_tile(coded, cx - tile0 / 2.0, cy - tile0 / 2.0, side0, tile_size), TILE_QUALITY, "444")
        found = _object_tile(coded, mpp, tile0, tile_size * tile_mpp, cx, cy)
        if found is not None:
            tx, ty = found
            offset_um = float(math.hypot(tx + tile0 / 2.0 - cx, ty + tile0 / 2.0 - cy) * mpp)
            tiles["offset"] = _jpeg(_read_tile(coded, tx, ty, side0, tile_size), TILE_QUALITY, "444")
        crowd = _composite(size, field.glass, [(sprite[0], cx, cy)] + _red_cells(field, sprite[1], size, cx, cy, rng))
        crowd = _slide_jpeg(crowd)
        found = _object_tile(crowd, mpp, tile0, tile_size * tile_mpp, cx, cy)
        if found is not None:
            tiles["neighbours"] = _jpeg(_read_tile(crowd, found[0], found[1], side0, tile_size), TILE_QUALITY, "444")
    label = pool.classes[pool.labels[index]]
    return CellTiles(pool.relpaths[index], label, tiles, offset_um)


def _object_tile(canvas: np.ndarray, mpp: float, tile0: float, tile_um: float, cx: float,
                 cy: float) -> tuple[float, float] | None:
    """Top-left (level-0 px) of the `cells` tile whose object is nearest (cx, cy), None when no object is
    found within half a tile of it; objects found as the tiler finds them (overview, foreground mask)."""
    small, small_mpp, ds = _overview(canvas, mpp)
    fg = detect_foreground(small, small_mpp, "romanowsky", 1)
    placement = plan_cells(small, fg.mask, small_mpp, ds, (canvas.shape[1], canvas.shape[0]), tile0, tile_um)
    if not len(placement.coords):
        return None
    centres = placement.coords[:, :2] + placement.coords[:, 2:] / 2.0
    d = np.hypot(centres[:, 0] - cx, centres[:, 1] - cy)
    j = int(np.argmin(d))
    if d[j] > tile0 / 2.0:
        return None
    return float(placement.coords[j, 0]), float(placement.coords[j, 1])


def _red_cells(field: _Field, cell_mask: np.ndarray, size: int, cx: float, cy: float,
               rng: np.random.Generator) -> list[tuple[np.ndarray, float, float]]:
    """Red cells on the smear's jittered hexagonal lattice (8.6 um), half of the sites filled (a
    moderately filled field), kept clear of the cell as the smear layout does."""
    from wsi_pipeline.synth.sprites import oriented

    if not field.bank.red:
        return []
    s = 8.6 / field.mpp
    dy = s * math.sqrt(3) / 2
    rbc_r = 7.5 / field.mpp / 2
    radius = max(cell_mask.shape) / 2.0  # the layout keeps red cells (nrad + 0.75 rbc_r) from a cell's centre
    out = []
    for j in range(int(size / dy) + 1):
        off = (s / 2) * (j % 2)
        for i in range(int(size / s) + 1):
            x = off + s * i + rng.uniform(-0.12, 0.12) * s
            y = j * dy + rng.uniform(-0.12, 0.12) * s
            if rng.random() >= 0.5 or math.hypot(x - cx, y - cy) < radius + 0.75 * rbc_r:
                continue
            w = int(rng.integers(len(field.bank.red_f)))
            out.append((oriented(field.bank.red_f[w], int(rng.integers(8))), x, y))
    return out


def smear_tiles(pool_root: Path | None, cell_list: tuple[str, ...] | None, list_name: str | None, seeds: list[int],
                size: int, checkpoint: str | None, work: Path, workers: int) -> list[dict[str, Any]]:
    """The tile `run --tiling cells` scored for each cell of synthetic smears (half of them with planted
    suspicious cells): class, source relpath, whether it lies in the out-of-focus patch, whether its smear
    is negative, the tile's pixels and the run's probabilities."""
    from wsi_contracts import tilestore as tile_store
    from wsi_pipeline.pipeline import RunOptions, run_slide
    from wsi_pipeline.scoring import ScoreConfig, read_checkpoint_info, read_scores

    info = read_checkpoint_info(checkpoint)
    out = []
    for k, seed in enumerate(seeds):
        slide = work / f"smear-{seed}.tiff"
        cfg = SynthConfig(width=size, height=size, mpp=SMEAR_MPP, seed=seed, cells=pool_root, cell_list=cell_list,
                          cell_list_name=list_name, fraction=0.3 if k % 2 == 0 else 0.0)
        synthesize(slide, cfg)
        truth = json.loads(truth_paths(slide)[0].read_text())
        options = RunOptions(checkpoint=checkpoint, tiling="cells", tile_workers=workers,
                             score=ScoreConfig(scheduler="threads", workers=workers))
        run = run_slide(slide, work / "out", options, info=info)
        group = tile_store.open_store(run.store)
        coords = np.asarray(group["coords"][:], np.int64)
        probs, _ = read_scores(group, info.sha256)
        tiles = group["tiles"]
        for cell in truth["cells"]:
            x, y, w, h = cell["bbox"]
            cx, cy = x + w / 2.0, y + h / 2.0
            inside = np.flatnonzero((coords[:, 0] <= cx) & (cx < coords[:, 0] + coords[:, 2])
                                    & (coords[:, 1] <= cy) & (cy < coords[:, 1] + coords[:, 3]))
            own = None
            if inside.size:
                c = coords[inside]
                own = int(inside[np.argmin(np.hypot(c[:, 0] + c[:, 2] / 2 - cx, c[:, 1] + c[:, 3] / 2 - cy))])
            out.append({"class": cell["class"], "source": cell["source"], "seed": seed, "blurred": bool(cell["blurred"]),
                        "negative": truth["label"] == "negative",
                        "tile": None if own is None else np.asarray(tiles[own]),
                        "probs": None if own is None else probs[own],
                        "offset_um": None if own is None else float(math.hypot(
                            coords[own, 0] + coords[own, 2] / 2 - cx, coords[own, 1] + coords[own, 3] / 2 - cy) * SMEAR_MPP)})
    return out


def tally(labels: list[str], probs: list[np.ndarray | None], class_names: list[str],
          suspicious: list[str]) -> dict[str, dict[str, Any]]:
    """Per class (and ``all``): n, cells lost (no tile), top-1 and the suspicious share (>= 0.5) over all n
    (a lost cell counts as wrong and not suspicious)."""
    rows: dict[str, dict[str, Any]] = {}
    for lab, p in zip(labels, probs):
        for key in (lab, "all"):
            r = rows.setdefault(key, {"n": 0, "lost": 0, "top1": 0, "suspicious": 0})
            r["n"] += 1
            if p is None:
                r["lost"] += 1
                continue
            r["top1"] += int(class_names[int(np.argmax(p))] == lab)
            r["suspicious"] += int(tile_suspicion(p[None], class_names, suspicious)[0] >= 0.5)
    for r in rows.values():
        r["top1_rate"] = r["top1"] / r["n"]
        r["suspicious_rate"] = r["suspicious"] / r["n"]
    return rows


def slide_bound(suspicion: dict[str, np.ndarray], normal_freq: dict[str, float], planted: tuple[str, ...],
                n_objects: int, n_planted: int, top_k: int = 3, n_slides: int = 2000, seed: int = 0) -> dict[str, float]:
    """What the slide score could reach if every object's tile scored as ``suspicion`` (per class, e.g. the
    original PBC crops): virtual smears of ``n_objects`` normal objects drawn by ``normal_freq`` (a
    positive adds ``n_planted`` cells of the ``planted`` classes), each object's suspicion drawn from
    its class's cells, slide score = top-k mean over objects as `run --tiling cells` computes it.
    Returns the slide ROC AUC, the share of negatives with a top-k mean >= 0.5 and of positives."""
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(seed)
    classes = [c for c in normal_freq if c in suspicion and len(suspicion[c])]
    p = np.array([normal_freq[c] for c in classes], float)
    p /= p.sum()
    planted = tuple(c for c in planted if c in suspicion and len(suspicion[c]))

    def slides(positive: bool) -> np.ndarray:
        which = rng.choice(len(classes), size=(n_slides, n_objects), p=p)
        vals = np.zeros(which.shape)
        for k, c in enumerate(classes):
            hit = which == k
            vals[hit] = suspicion[c][rng.integers(len(suspicion[c]), size=int(hit.sum()))]
        if positive and planted:
            extra = np.stack([suspicion[planted[i % len(planted)]][rng.integers(len(suspicion[planted[i % len(planted)]]),
                                                                                 size=n_slides)]
                              for i in range(n_planted)], axis=1)
            vals = np.concatenate([vals, extra], axis=1)
        return np.sort(vals, axis=1)[:, -top_k:].mean(axis=1)

    pos, neg = slides(True), slides(False)
    auc = float(mannwhitneyu(pos, neg, alternative="greater").statistic / (len(pos) * len(neg)))
    return {"auc": round(auc, 4), "positives_topk_ge_0.5": round(float((pos >= 0.5).mean()), 4),
            "negatives_topk_ge_0.5": round(float((neg >= 0.5).mean()), 4)}


def threshold_sweep(suspicion: dict[str, np.ndarray], planted: tuple[str, ...], normal: tuple[str, ...],
                    thresholds: np.ndarray | None = None, min_recall: float = 0.9,
                    max_false: float = 0.05) -> dict[str, Any]:
    """For each tile threshold, the share of each planted class's cells at or above it (detection)
    and of each normal class's cells (false suspicion), and the thresholds meeting both targets:
    every planted class >= ``min_recall`` and every normal class <= ``max_false`` (issue #11's
    figures). Empty when the model separates its own centred cells that well at no threshold."""
    ts = np.round(np.arange(0.05, 1.0, 0.05), 2) if thresholds is None else np.asarray(thresholds, float)
    planted = tuple(c for c in planted if c in suspicion and len(suspicion[c]))
    normal = tuple(c for c in normal if c in suspicion and len(suspicion[c]))
    rows = []
    for t in ts:
        recall = {c: float(np.mean(suspicion[c] >= t)) for c in planted}
        false = {c: float(np.mean(suspicion[c] >= t)) for c in normal}
        rows.append({"threshold": float(t), "detection": recall, "false": false,
                     "min_detection": min(recall.values()) if recall else None,
                     "max_false": max(false.values()) if false else None})
    ok = [r["threshold"] for r in rows
          if r["min_detection"] is not None and r["max_false"] is not None
          and r["min_detection"] >= min_recall and r["max_false"] <= max_false]
    return {"min_recall": min_recall, "max_false": max_false, "rows": rows, "thresholds_meeting_both": ok}


def _score(model, info, tiles: list[np.ndarray | None]) -> list[np.ndarray | None]:
    idx = [i for i, t in enumerate(tiles) if t is not None]
    out: list[np.ndarray | None] = [None] * len(tiles)
    if idx:
        probs = predict_probs(model, info, np.stack([tiles[i] for i in idx]))
        for i, p in zip(idx, probs):
            out[i] = p
    return out


def _sample(pool, n: int, seed: int) -> list[int]:
    """Up to ``n`` cells of every class, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in pool.classes:
        idx = pool.of_class(c)
        chosen.extend(sorted(rng.permutation(idx)[:n].tolist()))
    return chosen


def diagnose(args: argparse.Namespace) -> dict[str, Any]:
    """The per-step table (and the smear row) as a document."""
    import torch
    from wsi_pipeline.synth.cells import read_rgb

    if args.n < 1:
        raise WsiTriageError(f"--n {args.n}: must be >= 1")
    if args.bound_objects < 1 or args.bound_planted < 1:
        raise WsiTriageError("--bound-objects and --bound-planted must be >= 1")
    if args.smears < 0:
        raise WsiTriageError(f"--smears {args.smears}: must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.pool == "tuning":
        if args.cells is not None or not SHARED_PBC.is_dir():
            raise WsiTriageError("--pool tuning needs ../shared/data/pbc (and no --cells)")
        held = set(read_cell_list(HELDOUT_LIST))
        everything = list_cells(SHARED_PBC).relpaths
        root, listed, list_name = SHARED_PBC, tuple(r for r in everything if r not in held), "training pool"
    elif args.cells is None and SHARED_PBC.is_dir():
        root, listed, list_name = SHARED_PBC, read_cell_list(HELDOUT_LIST), str(HELDOUT_LIST.relative_to(ROOT))
    elif args.cells is None:
        root, listed, list_name = SHIPPED_CELLS, None, None
    else:
        root = Path(args.cells)
        listed = read_cell_list(args.cell_list) if args.cell_list else None
        list_name = args.cell_list
    pool = list_cells(root, listed)
    loaded = load_checkpoint(args.checkpoint)
    info = loaded.info
    names, susp = list(info.class_names), list(info.suspicious_classes)
    field = _Field(pool, args.seed, SMEAR_MPP)
    rng = np.random.default_rng(args.seed)
    chosen = _sample(pool, args.n, args.seed)
    cells = []
    for k, i in enumerate(chosen):
        cells.append(cell_tiles(pool, i, field, info.tile_size, info.tile_mpp, rng, read_rgb(pool.root / pool.relpaths[i])))
        if not args.quiet and (k + 1) % 50 == 0:
            print(f"cells {k + 1}/{len(chosen)}", file=sys.stderr, flush=True)
    labels = [c.label for c in cells]
    steps, steps_probs = {}, {}
    for s in STEPS:
        steps_probs[s] = _score(loaded.model, info, [c.tiles[s] for c in cells])
        steps[s] = tally(labels, steps_probs[s], names, susp)
    offsets = [c.offset_um for c in cells if c.offset_um is not None]
    doc: dict[str, Any] = {
        "checkpoint": str(info.path), "sha12": info.sha12, "cells": str(root), "cell_list": list_name,
        "n_per_class": args.n, "seed": args.seed, "smear_mpp": SMEAR_MPP, "steps": steps,
        "object_offset_um": {"median": float(np.median(offsets)) if offsets else None,
                             "p90": float(np.percentile(offsets, 90)) if offsets else None},
    }
    if args.smears:
        with tempfile.TemporaryDirectory(prefix="diag-cell-tiles-") as work:
            seeds = [args.seed + i for i in range(args.smears)]
            found = smear_tiles(root, listed, list_name, seeds, args.smear_size, args.checkpoint, Path(work),
                                args.workers)
        blurred = [f for f in found if f["blurred"]]
        found = [f for f in found if not f["blurred"]]
        labs = [f["class"] for f in found]
        by_src = {r: i for i, r in enumerate(pool.relpaths)}
        base = []
        for f in found:
            rgb = read_rgb(pool.root / f["source"]) if f["source"] in by_src else None
            base.append(cell_tiles(pool, by_src[f["source"]], field, info.tile_size, info.tile_mpp, rng, rgb).tiles
                        if rgb is not None else {s: None for s in STEPS})
        doc["smear"] = {
            "seeds": seeds, "size": args.smear_size,
            "pbc (same cells)": tally(labs, _score(loaded.model, info, [b["pbc"] for b in base]), names, susp),
            "neighbours (same cells)": tally(labs, _score(loaded.model, info, [b["neighbours"] for b in base]),
                                             names, susp),
            "smear": tally(labs, [f["probs"] for f in found], names, susp),
            "smear, negative smears": tally([f["class"] for f in found if f["negative"]],
                                            [f["probs"] for f in found if f["negative"]], names, susp),
            "smear, out of focus": tally([f["class"] for f in blurred], [f["probs"] for f in blurred], names, susp),
            "_labels": labs, "_probs": [f["probs"] for f in found],
            "rescored": tally(labs, _score(loaded.model, info, [f["tile"] for f in found]), names, susp),
            "offset_um": {"median": float(np.median([f["offset_um"] for f in found if f["offset_um"] is not None]))
                          if found else None},
        }
    doc["bound"] = _bounds(loaded, pool, cells, steps_probs, doc, args)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    return doc


def _bounds(loaded, pool, cells, steps_probs, doc, args) -> dict[str, Any]:
    """:func:`slide_bound` from the suspicions of every held-out crop and of each step's (and the smears') tiles."""
    from wsi_pipeline.synth.cells import read_rgb

    info = loaded.info
    names, susp = list(info.class_names), list(info.suspicious_classes)
    normal = {c: f for c, f in BLOOD_FREQ.items() if c != "platelet"}  # platelets are rarely objects (no nucleus)
    planted = tuple(c for c in susp if c in pool.classes)

    def by_class(labels, probs) -> dict[str, np.ndarray]:
        out: dict[str, list[float]] = {}
        for lab, p in zip(labels, probs):
            if p is not None:
                out.setdefault(lab, []).append(float(tile_suspicion(p[None], names, susp)[0]))
        return {k: np.asarray(v) for k, v in out.items()}

    sources: dict[str, dict[str, np.ndarray]] = {}
    every = [read_rgb(pool.root / r) for r in pool.relpaths]
    labels_all = [pool.classes[i] for i in pool.labels]
    sources[f"pbc, all {len(every)} crops"] = by_class(labels_all, _score(loaded.model, info, every))
    labels = [c.label for c in cells]
    for s in STEPS:
        sources[s] = by_class(labels, steps_probs[s])
    if "smear" in doc:
        sources["smears: run --tiling cells"] = by_class(doc["smear"].pop("_labels"), doc["smear"].pop("_probs"))
    crops = sources[f"pbc, all {len(every)} crops"]
    return {"objects_per_slide": args.bound_objects, "planted_per_positive": args.bound_planted, "top_k": 3,
            "normal_freq": normal,
            "threshold_sweep": {"source": f"pbc, all {len(every)} crops",
                                **threshold_sweep(crops, planted, tuple(c for c in crops if c not in planted))},
            "rows": {k: slide_bound(v, normal, planted, args.bound_objects, args.bound_planted, seed=args.seed)
                     for k, v in sources.items()}}


def _cell(r: dict | None, what: str) -> str:
    if r is None:
        return "-"
    return f"{100 * r[what + '_rate']:5.1f}"


def print_table(doc: dict[str, Any]) -> None:
    rows = dict(doc["steps"])
    if "smear" in doc:
        sm = doc["smear"]
        rows["-- smears: pbc (same cells)"] = sm["pbc (same cells)"]
        rows["-- smears: neighbours (same)"] = sm["neighbours (same cells)"]
        rows["-- smears: run --tiling cells"] = sm["smear"]
        rows["   of them on negative smears"] = sm["smear, negative smears"]
        if sm["smear, out of focus"]:
            rows["-- smears: out-of-focus cells"] = sm["smear, out of focus"]
    classes = sorted({c for r in rows.values() for c in r if c != "all"})
    for what, title in (("top1", "top-1 %"), ("suspicious", "called suspicious % (>= 0.5)")):
        print(f"\n{title} per class  (n per class: "
              + ", ".join(f"{c} {doc['steps']['pbc'].get(c, {}).get('n', 0)}" for c in classes) + ")")
        head = f"{'step':<31}" + "".join(f"{c[:11]:>12}" for c in classes) + f"{'all':>8}{'lost':>6}"
        print(head)
        for name, r in rows.items():
            if not r:
                continue
            line = f"{name:<31}" + "".join(f"{_cell(r.get(c), what):>12}" for c in classes)
            print(line + f"{_cell(r.get('all'), what):>8}{r['all']['lost']:>6}")
    off = doc["object_offset_um"]
    if off["median"] is not None:
        print(f"\nobject tile centre to the cell's centre: median {off['median']:.2f} um, 90th pct {off['p90']:.2f} um"
              + (f"; on the smears median {doc['smear']['offset_um']['median']:.2f} um" if "smear" in doc else ""))
    b = doc.get("bound")
    if b:
        print(f"\nslide-score bound: virtual smears of {b['objects_per_slide']} normal objects (+{b['planted_per_positive']} "
              f"planted in positives), each object scored as a tile of that row, top-{b['top_k']} mean")
        print(f"{'tiles as in row':<31}{'slide AUC':>10}{'pos >= 0.5':>12}{'neg >= 0.5':>12}")
        for name, r in b["rows"].items():
            print(f"{name:<31}{r['auc']:>10.3f}{100 * r['positives_topk_ge_0.5']:>11.1f}%"
                  f"{100 * r['negatives_topk_ge_0.5']:>11.1f}%")
        sw = b.get("threshold_sweep")
        if sw:
            print(f"\ntile threshold sweep on {sw['source']}: worst planted-class detection / worst normal-class "
                  f"false suspicion (targets >= {100 * sw['min_recall']:.0f} % / <= {100 * sw['max_false']:.0f} %)")
            print("  " + "  ".join(f"{r['threshold']:.2f}: {100 * r['min_detection']:.1f}/{100 * r['max_false']:.1f}"
                                   for r in sw["rows"] if r["min_detection"] is not None and r["max_false"] is not None))
            print("  thresholds meeting both: " + (", ".join(f"{t:.2f}" for t in sw["thresholds_meeting_both"])
                                                  or "none (the student's own centred-cell errors)"))
    print(f"{doc['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=25, help="held-out cells per class")
    ap.add_argument("--smears", type=int, default=2, help="synthetic smears run with --tiling cells (0: none)")
    ap.add_argument("--smear-size", type=int, default=2048, help="side of each smear (px at 0.25 um/px)")
    ap.add_argument("--seed", type=int, default=1000, help="cell sample, glass and smear seeds")
    ap.add_argument("--checkpoint", default=None, help="student checkpoint [default: the bundled demo student]")
    ap.add_argument("--cells", default=None, help="ImageFolder of cells [default: ../shared/data/pbc with "
                                                   "configs/pbc_heldout.txt, else the shipped held-out cells]")
    ap.add_argument("--cell-list", default=None, help="relpaths under --cells to use")
    ap.add_argument("--pool", choices=("heldout", "tuning"), default="heldout",
                    help="with ../shared/data/pbc: the held-out cells (measurement) or the training pool (for "
                         "checking a change of the test bed without looking at held-out cells)")
    ap.add_argument("--bound-objects", type=int, default=44,
                    help="normal objects per virtual smear for the slide-score bound (run --tiling cells: ~44)")
    ap.add_argument("--bound-planted", type=int, default=4, help="planted cells per virtual positive smear")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--workers", type=int, default=2, help="tiling and scoring workers for the smears")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON ('-' = stdout only)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    try:
        doc = diagnose(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(doc, indent=1))
        return 0
    print_table(doc)
    if args.json:
        try:
            write_atomic(Path(args.json), json.dumps(doc, indent=1).encode())
        except OSError as exc:
            print(f"error: {args.json}: cannot write ({exc.strerror or exc})", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
