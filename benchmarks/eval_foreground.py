"""Foreground detection figures on the real smear fields (the numbers in docs/foreground.md).

Prints, for all 364 BCCD fields at 0.07 um/px with the ``romanowsky`` preset and 64-px tiles
marked at the preset's minimum foreground fraction: the share of WBC and RBC boxes that overlap a
marked tile, the share of box-free tiles marked, and on the blind audit
(``tests/data/bccd_box_free_tiles.json``) the share of glass-only and of cell tiles marked. Also
the mask's area over the truth on pale synthetic discs on noisy glass (edge precision).

    python benchmarks/eval_foreground.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from skimage import io

from wsi_pipeline.foreground import foreground_mask, get_preset, tile_fractions

ROOT = Path(__file__).resolve().parents[1]
SMEAR_MPP, TILE = 0.07, 64


def boxes(path: Path) -> list[tuple[str, list[float]]]:
    out = []
    for obj in ET.parse(path).getroot().iter("object"):
        b = obj.find("bndbox")
        out.append((obj.findtext("name"), [float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]))
    return out


def smear_fields(folder: Path) -> None:
    preset = get_preset("romanowsky")
    hits = {"WBC": [0, 0], "RBC": [0, 0]}
    empty = [0, 0]
    masks = {}
    for path in sorted(folder.glob("*.jpg")):
        mask = masks[path.name] = foreground_mask(io.imread(path)[..., :3], SMEAR_MPP, preset)
        ys, xs = np.mgrid[0:mask.shape[0]:TILE, 0:mask.shape[1]:TILE]
        tiles = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, TILE), np.full(xs.size, TILE)], 1)
        marked = tile_fractions(mask, 1.0, tiles) >= preset.min_foreground
        any_box = np.zeros(len(tiles), bool)
        for name, (x0, y0, x1, y1) in boxes(folder / "annotations" / f"{path.stem}.xml"):
            ov = (tiles[:, 0] < x1) & (tiles[:, 0] + TILE > x0) & (tiles[:, 1] < y1) & (tiles[:, 1] + TILE > y0)
            any_box |= ov
            if name in hits:
                hits[name][0] += bool((ov & marked).any())
                hits[name][1] += 1
        empty[0] += int((marked & ~any_box).sum())
        empty[1] += int((~any_box).sum())
    for name, (k, n) in hits.items():
        print(f"{name} boxes overlapping a marked tile: {k}/{n} = {100 * k / n:.1f} %")
    print(f"box-free tiles marked: {empty[0]}/{empty[1]} = {100 * empty[0] / empty[1]:.1f} %")
    audit = json.loads((ROOT / "tests" / "data" / "bccd_box_free_tiles.json").read_text())
    marked = {"glass": [], "cells": []}
    for t in audit["tiles"]:
        frac = tile_fractions(masks[t["field"]], 1.0, np.array([[t["x"], t["y"], TILE, TILE]]))[0]
        marked[t["label"]].append(bool(frac >= preset.min_foreground))
    for label, values in marked.items():
        print(f"blind audit, {label} tiles marked: {sum(values)}/{len(values)} = {100 * np.mean(values):.1f} %")


def disc_overshoot() -> None:
    """Pale pink discs (red-cell-like) on glass with sensor noise, as in the test."""
    rng = np.random.default_rng(0)
    h, w = 480, 640
    img = np.full((h, w, 3), (228, 226, 230), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    truth = np.zeros((h, w), bool)
    for cy, cx in ((120, 150), (300, 400), (200, 520), (380, 120)):
        truth |= np.hypot(yy - cy, xx - cx) <= 55
    img[truth] = (205, 165, 180)
    img = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    mask = foreground_mask(img, SMEAR_MPP, "romanowsky")
    print(f"synthetic discs at {SMEAR_MPP} um/px: mask area / true area {mask.sum() / truth.sum():.3f}, "
          f"missed {(truth & ~mask).sum()} of {truth.sum()} px")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    smear_fields(args.shared / "smear_fields")
    disc_overshoot()


if __name__ == "__main__":
    main()
