"""Synthetic smears -> an ImageFolder of labelled 128 px tiles (what ``wsi-triage run`` shows the model).

A model trained only on PBC (one centred white cell per image) has never seen the tiles a slide
grid produces: red cells only, cut-off or off-centre white cells, platelets, blur, debris. This
script builds smears with ``wsi_pipeline.synth`` from a chosen cell pool, cuts tiles at random
offsets and labels each from the ground truth: the class of the nucleated cell with the largest
area of its box inside the tile if at least half of that cell's box is inside, else
``background``. Deterministic for a given set of arguments.

Cell pools (never mix them):
  --pool train    PBC minus configs/pbc_heldout.txt, minus the distill validation split
                  (stratified, split_seed 0, val_frac 0.15), so PBC validation stays unseen.
  --pool heldout  only the images of configs/pbc_heldout.txt (evaluation slides).

    python examples/build_tile_set.py --pool train --out runs/tiles/train --slides 6 --seed 100
    python examples/build_tile_set.py --pool heldout --out runs/tiles/heldout --slides 1 --seed 900

Slides alternate between 0.27 um/px (read at level 0, no resampling) and 0.25 um/px (a 138 px
box resampled to 128 px, as ``run`` does on the CLI's default synthetic slides). Prints a line per
slide on stderr and the tiles per class as JSON on stdout (also in ``OUT/tileset.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_pipeline.aggregation import write_atomic
from wsi_pipeline.errors import OptionError, WsiTriageError
from wsi_pipeline.script import at_least, run_script
from wsi_pipeline.slides import open_slide
from wsi_pipeline.synth import SynthConfig, synthesize, truth_paths

ROOT = Path(__file__).resolve().parents[1]
#: ../shared/data beside the checkout, or $WSI_TRIAGE_SHARED_DATA (as the tests find it)
SHARED = Path(os.environ.get("WSI_TRIAGE_SHARED_DATA", ROOT.parent / "shared" / "data"))
TILE = 128
TILE_MPP = 0.27
BACKGROUND = "background"


def cell_pool(cells: Path, pool: str, heldout: Path, val_frac: float = 0.15, split_seed: int = 0) -> tuple[str, ...]:
    """Relpaths of the cells a smear may use (see the module docstring)."""
    from distill.data import read_exclude, split_paths  # torch: only when building

    if pool == "heldout":
        return tuple(sorted(read_exclude(heldout)))
    train, _ = split_paths(cells, val_frac, split_seed, heldout)
    return tuple(sorted(train))


def label_tiles(boxes: np.ndarray, classes: list[str], x: np.ndarray, y: np.ndarray, size: float) -> list[str]:
    """Label tiles (x, y, size) from cell boxes (N, 4) [x, y, w, h], all level-0 px."""
    out = []
    area = np.maximum(boxes[:, 2] * boxes[:, 3], 1)
    for tx, ty in zip(x.tolist(), y.tolist()):
        iw = np.clip(np.minimum(boxes[:, 0] + boxes[:, 2], tx + size) - np.maximum(boxes[:, 0], tx), 0, None)
        ih = np.clip(np.minimum(boxes[:, 1] + boxes[:, 3], ty + size) - np.maximum(boxes[:, 1], ty), 0, None)
        inter = iw * ih
        if not inter.size or inter.max() <= 0:
            out.append(BACKGROUND)
            continue
        j = int(np.argmax(inter))
        out.append(classes[j] if inter[j] >= 0.5 * area[j] else BACKGROUND)
    return out


def sample_origins(truth: dict, rng: np.random.Generator, box: int, n_random: int, n_artifact: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Tile origins: around every cell (jittered, often off-centre), uniformly over the slide, and
    inside the empty fields, the blurred patch and around debris."""
    W, H = truth["width"], truth["height"]
    xs, ys = [], []
    for c in truth["cells"]:
        bx, by, bw, bh = c["bbox"]
        for _ in range(2):
            j = rng.uniform(-0.45, 0.45, 2) * box
            xs.append(bx + bw / 2 - box / 2 + j[0])
            ys.append(by + bh / 2 - box / 2 + j[1])
    xs.extend(rng.uniform(0, W - box, n_random))
    ys.extend(rng.uniform(0, H - box, n_random))
    rects = [truth["artifacts"]["blur"]["bbox"]] * 3 + truth.get("empty_fields", [])[:20]
    debris = truth.get("debris", [])
    for _ in range(n_artifact):
        if debris and rng.uniform() < 0.4:
            bx, by, bw, bh = debris[int(rng.integers(len(debris)))]
            xs.append(bx + bw / 2 - box / 2 + rng.uniform(-0.3, 0.3) * box)
            ys.append(by + bh / 2 - box / 2 + rng.uniform(-0.3, 0.3) * box)
        elif rects:
            rx, ry, rw, rh = rects[int(rng.integers(len(rects)))]
            xs.append(rx + rng.uniform(0, max(rw - box, 1)))
            ys.append(ry + rng.uniform(0, max(rh - box, 1)))
    x = np.clip(np.round(xs), 0, W - box).astype(int)
    y = np.clip(np.round(ys), 0, H - box).astype(int)
    return x, y


def build(out: Path, cells: Path, pool: str, heldout: Path, slides: int, seed: int, size: int,
          fraction: float, regions: int, per_class_cap: int, background_share: float) -> dict[str, int]:
    relpaths = cell_pool(cells, pool, heldout)
    counts: dict[str, int] = {}
    log = []
    with tempfile.TemporaryDirectory(prefix="tileset-", dir=out.parent) as tmp:
        for k in range(slides):
            s = seed + k
            mpp = TILE_MPP if k % 2 == 0 else 0.25
            slide_path = Path(tmp) / f"s{s}.tiff"
            cfg = SynthConfig(width=size, height=size, mpp=mpp, seed=s, cells=cells, cell_list=relpaths,
                              cell_list_name=pool, fraction=fraction, regions=regions, workers=1)
            synthesize(slide_path, cfg)
            truth = json.loads(truth_paths(slide_path)[0].read_text())
            box = int(round(TILE * TILE_MPP / mpp))  # level-0 px covering a 128 px tile at 0.27 um/px
            rng = np.random.default_rng(s)
            x, y = sample_origins(truth, rng, box, n_random=1500, n_artifact=300)
            boxes = np.array([c["bbox"] for c in truth["cells"]], dtype=np.int64).reshape(-1, 4)
            labels = label_tiles(boxes, [c["class"] for c in truth["cells"]], x, y, box)
            # Balance: per class at most per_class_cap tiles from this slide; background a share.
            order = rng.permutation(len(labels))
            keep: dict[str, list[int]] = {}
            for i in order.tolist():
                keep.setdefault(labels[i], []).append(i)
            n_cells_kept = sum(min(len(v), per_class_cap) for c, v in keep.items() if c != BACKGROUND)
            bg_cap = int(background_share / (1 - background_share) * n_cells_kept)
            slide = open_slide(slide_path)
            n_slide = 0
            for cls, idx in sorted(keep.items()):
                cap = bg_cap if cls == BACKGROUND else per_class_cap
                d = out / cls
                d.mkdir(parents=True, exist_ok=True)
                for i in sorted(idx[:cap]):
                    if mpp == TILE_MPP:
                        tile = slide.read_region(0, int(x[i]), int(y[i]), TILE, TILE)
                    else:
                        tile = slide.read_region_mpp(int(x[i]), int(y[i]), box, box, TILE_MPP, out_size=(TILE, TILE))
                    Image.fromarray(np.ascontiguousarray(tile[..., :3])).save(d / f"s{s}_{x[i]}_{y[i]}.png")
                    counts[cls] = counts.get(cls, 0) + 1
                    n_slide += 1
            slide.close()
            log.append({"seed": s, "mpp": mpp, "cells": len(truth["cells"]), "tiles": n_slide})
            print(f"slide seed {s} mpp {mpp}: {len(truth['cells'])} cells, {n_slide} tiles", flush=True)
            # Written after every slide, so an interrupted build says which slides it holds.
            write_atomic(out / "tileset.json", json.dumps({
                "pool": pool, "cells": str(cells), "n_pool_images": len(relpaths), "slides": log, "size": size,
                "fraction": fraction, "regions": regions, "per_class_cap": per_class_cap,
                "background_share": background_share, "counts": dict(sorted(counts.items())),
                "rule": "class of the nucleated cell with the largest box area inside the tile if >= 50% of "
                        "its box is inside, else background",
            }, indent=1).encode())
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="a new (or empty) folder for the ImageFolder")
    p.add_argument("--pool", choices=("train", "heldout"), required=True)
    p.add_argument("--cells", type=Path, default=SHARED / "pbc", help="PBC ImageFolder [default: %(default)s]")
    p.add_argument("--heldout", type=Path, default=ROOT / "configs" / "pbc_heldout.txt")
    p.add_argument("--slides", type=int, default=6)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--size", type=int, default=8192, help="slide side, level-0 px")
    p.add_argument("--fraction", type=float, default=0.5, help="suspicious share in planted regions")
    p.add_argument("--regions", type=int, default=12, help="planted regions per slide")
    p.add_argument("--per-class-cap", type=int, default=150, help="tiles per class per slide")
    p.add_argument("--background-share", type=float, default=0.35)
    a = p.parse_args(argv)
    return run_script(lambda: build_new(a), "-")


def build_new(a: argparse.Namespace) -> dict[str, int]:
    """Check the options, then :func:`build` into a new (or empty) ``--out``; the tile counts per class."""
    at_least("--slides", a.slides)
    at_least("--per-class-cap", a.per_class_cap)
    if not 0 <= a.background_share < 1:
        raise OptionError("--background-share", f"must be in [0, 1), got {a.background_share}")
    if a.out.exists() and (not a.out.is_dir() or any(a.out.iterdir())):
        raise WsiTriageError(f"{a.out}: exists and is not an empty folder; choose a new folder "
                             "(the set must be rebuilt whole)")
    try:
        a.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsiTriageError(f"{a.out}: cannot create the folder ({exc.strerror or exc})") from None
    return build(a.out, a.cells, a.pool, a.heldout, a.slides, a.seed, a.size, a.fraction, a.regions,
                 a.per_class_cap, a.background_share)


if __name__ == "__main__":
    sys.exit(main())
