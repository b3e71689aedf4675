"""Foreground detection figures on real and synthetic fields (the numbers in docs/foreground.md).

Prints:

- **Blood (Romanowsky)**: for all 364 BCCD fields at 0.07 um/px with the ``romanowsky`` preset
  and 64-px tiles marked at the preset's minimum foreground fraction: the share of WBC and RBC
  boxes that overlap a marked tile, the share of box-free tiles marked, and on the blind audit
  (``tests/data/bccd_box_free_tiles.json``) the share of glass-only and of cell tiles marked;
  the mask's area over the truth on pale synthetic discs on noisy glass (edge precision).
- **Pap**: the labelled nuclei of ``tests/data/pap_nuclei.json`` (six Pap LBC fields) that lie in
  a tile the tiler keeps (``wsi-triage tile FIELD --mpp 0.5 --tile-size 64``, every stain
  setting); the pixels removed as ink on all 80 Pap fields; the ``--stain auto`` decision on
  tuning and held-out material (tuning: even-numbered Pap fields, every 8th BCCD field and the
  synthetic smears of ``SYNTH_TUNING``; held-out: the other fields and ``SYNTH_HELD_OUT``, both
  stains each, judged on the tiler's overview).
- **Ink strokes** on synthetic smears of both stains, four ink colours: the share of the stroke
  found as ink on the tiler's overview, over all of the stroke and over the stroke away from
  cells (15 um beyond the truth's cell boxes; a cell group's box adds nothing to them), stroke
  tiles kept, glass tiles kept, nucleated cells (in groups and single) whose nucleus lies in a
  kept tile, the tiles the tiler dropped for lying mostly on ink without a nucleus
  (``foreground.ink_tiles_dropped``), and the nuclei found on the stroke outside every cell box
  (red cells or debris seen through the ink). Then the nuclei that hold kept stroke tiles against
  the real nuclei on the strokes (area, own density: the measures a rule could separate them on).

    python benchmarks/eval_foreground.py [--shared ../shared/data] [--only blood|pap|ink] [--json FILE|-]

``--json -`` prints the figures as JSON on stdout and the text on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage import io

from wsi_pipeline.errors import WsiTriageError
from wsi_pipeline.foreground import (decide_stain, detect_foreground, foreground_mask, get_preset, label_nuclei,
    nucleus_pixels, tile_fractions)
from wsi_pipeline.foreground.nuclei import own_density
from wsi_pipeline.slides import open_slide
from wsi_pipeline.script import run_script
from wsi_pipeline.synth import SynthConfig, cell_box_mask, pen_stroke_mask, synthesize
from wsi_pipeline.tiling import TilerConfig, mask_mpp_for, plan_tiles, tile_slide

ROOT = Path(__file__).resolve().parents[1]
#: ../shared/data beside the checkout, or $WSI_TRIAGE_SHARED_DATA (as the tests find it)
SHARED = Path(os.environ.get("WSI_TRIAGE_SHARED_DATA", ROOT.parent / "shared" / "data"))
SMEAR_MPP, TILE = 0.07, 64


def boxes(path: Path) -> list[tuple[str, list[float]]]:
    out = []
    for obj in ET.parse(path).getroot().iter("object"):
        b = obj.find("bndbox")
        out.append((obj.findtext("name"), [float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]))
    return out


def smear_fields(folder: Path) -> dict:
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
    doc = {"fields": len(masks), "boxes_overlapping_a_marked_tile": {k: {"hit": h, "n": n} for k, (h, n) in hits.items()},
           "box_free_tiles_marked": {"hit": empty[0], "n": empty[1]}}
    audit = json.loads((ROOT / "tests" / "data" / "bccd_box_free_tiles.json").read_text())
    marked = {"glass": [], "cells": []}
    for t in audit["tiles"]:
        frac = tile_fractions(masks[t["field"]], 1.0, np.array([[t["x"], t["y"], TILE, TILE]]))[0]
        marked[t["label"]].append(bool(frac >= preset.min_foreground))
    for label, values in marked.items():
        print(f"blind audit, {label} tiles marked: {sum(values)}/{len(values)} = {100 * np.mean(values):.1f} %")
    doc["blind_audit_tiles_marked"] = {label: {"hit": int(sum(v)), "n": len(v)} for label, v in marked.items()}
    return doc


def disc_overshoot() -> dict:
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
    return {"mask_over_true_area": float(mask.sum() / truth.sum()), "missed_px": int((truth & ~mask).sum()),
            "true_px": int(truth.sum())}


PAP_MPP = 0.5  # the Pap LBC fields' scale is unknown and anisotropic (see their README); 0.5 as the issue's trial


def _in_kept_tiles(points_xy: np.ndarray, coords: np.ndarray) -> np.ndarray:
    x, y = points_xy[:, 0:1], points_xy[:, 1:2]
    inside = (x >= coords[None, :, 0]) & (x < coords[None, :, 0] + coords[None, :, 2]) & \
             (y >= coords[None, :, 1]) & (y < coords[None, :, 1] + coords[None, :, 3])
    return inside.any(axis=1)


def pap_fields(folder: Path) -> dict:
    labels = json.loads((ROOT / "tests" / "data" / "pap_nuclei.json").read_text())
    doc: dict = {"nuclei_in_kept_tiles": {}}
    for stain in ("auto", "pap", "romanowsky", "he"):
        hit = total = 0
        per_field = []
        with tempfile.TemporaryDirectory() as tmp:
            for name, pts in labels["fields"].items():
                res = tile_slide(folder / f"{name}.jpg", tmp, TilerConfig(target_mpp=PAP_MPP, tile_size=64, stain=stain),
                                 mpp=PAP_MPP, workers=2)
                import zarr
                coords = np.asarray(zarr.open_group(str(res.path), mode="r")["coords"][:])
                ok = _in_kept_tiles(np.asarray(pts, float), coords) if len(coords) else np.zeros(len(pts), bool)
                hit += int(ok.sum())
                total += len(pts)
                per_field.append(f"{name} {int(ok.sum())}/{len(pts)}")
        print(f"Pap nuclei in kept 64-px tiles, --stain {stain}: {hit}/{total} = {100 * hit / total:.1f} % "
              f"({', '.join(per_field)})")
        doc["nuclei_in_kept_tiles"][stain] = {"hit": hit, "n": total, "per_field": per_field}
    fields = sorted(folder.glob("*.jpg"))
    ink = [float(detect_foreground(io.imread(p)[..., :3], PAP_MPP, "pap").ink.mean()) for p in fields]
    print(f"Pap fields with any pixel removed as ink: {sum(v > 0 for v in ink)}/{len(fields)} "
          f"(largest share {100 * max(ink):.2f} %)")
    doc["fields_with_ink"] = {"hit": sum(v > 0 for v in ink), "n": len(fields), "largest_share": max(ink)}
    return doc


#: synthetic smears for the stain decision: (size px, seed, um/px, pen ink, fraction, cells), each drawn in both
#: stains; "pbc" = ../shared/data/pbc, "shipped" = the shipped held-out cells. The thresholds were chosen on
#: the tuning seeds (11-19) with the real tuning fields; the held-out seeds (21-36) were not looked at then.
SYNTH_TUNING = ((2048, 11, 0.25, "random", 0.25, "shipped"), (4096, 12, 0.25, "random", 0.0, "pbc"),
                (8192, 13, 0.25, "random", 0.25, "shipped"), (2048, 14, 0.25, "random", 0.2, "shipped"),
                (2048, 15, 0.25, "random", 0.0, "pbc"), (2048, 16, 0.25, "random", 0.1, "shipped"),
                (2048, 17, 0.25, "random", 0.2, "pbc"), (4096, 18, 1.0, "blue", 0.25, "shipped"),
                (4096, 19, 0.5, "green", 0.0, "pbc"))
SYNTH_HELD_OUT = ((2048, 21, 0.25, "random", 0.0, "shipped"), (2048, 22, 0.25, "random", 0.25, "pbc"),
                  (3072, 23, 0.25, "random", 0.5, "shipped"), (4096, 24, 0.25, "random", 0.0, "shipped"),
                  (6000, 25, 0.25, "random", 0.25, "pbc"), (8192, 26, 0.25, "random", 0.0, "pbc"),
                  (8192, 31, 1.0, "blue", 0.0, "shipped"), (8192, 32, 1.0, "green", 0.0, "shipped"),
                  (8192, 33, 1.0, "black", 0.25, "shipped"), (8192, 34, 1.0, "red", 0.0, "shipped"),
                  (4096, 35, 0.5, "blue", 0.25, "pbc"), (4096, 36, 0.5, "red", 0.0, "shipped"))


def stain_decisions(shared: Path) -> dict:
    """--stain auto on tuning and held-out material: real fields (tuning: even-numbered Pap LBC
    fields, every 8th BCCD field), the H&E slide, and synthetic smears of both stains
    (``SYNTH_TUNING`` / ``SYNTH_HELD_OUT``), each judged on the overview the tiler reads."""
    doc: dict = {}
    for label, pattern, mpp, want, every in (("Pap LBC", "pap_fields/mendeley_lbc_512/*.jpg", PAP_MPP, "pap", 2),
                                             ("BCCD", "smear_fields/*.jpg", SMEAR_MPP, "romanowsky", 8)):
        paths = sorted(shared.glob(pattern))
        for name, part in (("tuning", paths[::every]), ("held-out", [p for i, p in enumerate(paths) if i % every])):
            got = [decide_stain(io.imread(p)[..., :3], mpp)[0].stain for p in part]
            _print_decisions(f"{name} {label} fields", want, got)
            doc[f"{label} {name}"] = {"expected": want, "decided": {s: got.count(s) for s in sorted(set(got))}}
    with open_slide(shared / "slides" / "CMU-1-Small-Region.svs") as slide:
        thumb, ds = slide.thumbnail(2.0)
        doc["H&E Aperio slide"] = decide_stain(thumb, 0.499 * ds)[0].stain
        print(f"--stain auto on the H&E Aperio slide: {doc['H&E Aperio slide']}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows in (("tuning", SYNTH_TUNING), ("held-out", SYNTH_HELD_OUT)):
            for stain in ("romanowsky", "pap"):
                got, reasons = [], []
                for size, seed, mpp, ink, fraction, cells in rows:
                    path = Path(tmp) / f"{stain}-{seed}.tiff"
                    synthesize(path, SynthConfig(width=size, height=size, mpp=mpp, seed=seed, stain=stain, pen_ink=ink,
                                                 fraction=fraction, cells=shared / "pbc" if cells == "pbc" else None))
                    decision = _overview_decision(path)
                    got.append(decision.stain)
                    if decision.stain != stain:
                        reasons.append(f"seed {seed} ({size} px at {mpp:g} um/px, {ink} ink): {decision.reason}")
                    path.unlink()
                _print_decisions(f"{name} synthetic {stain} smears (seeds {rows[0][1]}-{rows[-1][1]})", stain, got)
                for r in reasons:
                    print(f"    {r}")
                doc[f"synthetic {stain} {name}"] = {"expected": stain, "decided": {s: got.count(s) for s in sorted(set(got))},
                                                    "wrong": reasons}
    return doc


def _print_decisions(what: str, want: str, got: list[str]) -> None:
    print(f"--stain auto on {what}: {sum(g == want for g in got)}/{len(got)} {want} "
          f"({', '.join(f'{s} {got.count(s)}' for s in sorted(set(got)))})")


def _overview_decision(path: Path):
    """decide_stain on the overview the tiler reads for ``path`` (tiler defaults)."""
    with open_slide(path) as slide:
        mpp = slide.require_mpp().x
        thumb, ds = slide.thumbnail(mask_mpp_for(slide, TilerConfig(), mpp), workers=2)
    return decide_stain(thumb, mpp * ds, 2)[0]


INKS = ("green", "blue", "black", "red")


def ink_strokes(size: int = 4096, mpp: float = 0.5, seeds: tuple[int, ...] = (1, 2)) -> dict:
    """Synthetic smears (both stains, four inks): stroke found, stroke tiles dropped, cells kept."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stain in ("romanowsky", "pap"):
            for ink in INKS:
                for seed in seeds:
                    path = Path(tmp) / f"{stain}-{ink}-{seed}.tiff"
                    synthesize(path, SynthConfig(width=size, height=size, mpp=mpp, seed=seed, stain=stain, pen_ink=ink,
                                                 fraction=0.0, regions=0))
                    rows.append((stain, ink, seed, *_stroke_figures(path, size, mpp)))
    print("synthetic smears (%d px at %.2f um/px), tiler defaults (224-px tiles at 0.5 um/px, --stain auto):" % (size, mpp))
    print("  stain       ink    seed  auto-stain  stroke-found (all / off cells)  stroke-tiles-kept  glass-tiles-kept  "
          "nuclei-in-kept-tiles (groups)  ink-tiles-dropped  nuclei-on-stroke-off-cells")
    for stain, ink, seed, decided, found, found_all, kept, n_stroke, nuc, grp, g_kept, n_glass, dropped, fake, _ in rows:
        print(f"  {stain:<11} {ink:<6} {seed:>4}  {decided:<10}  {100 * found_all:13.1f} / {100 * found:5.1f} %      "
              f"{kept:>7}/{n_stroke:<9}  {g_kept:>7}/{n_glass:<8}  {100 * nuc:6.1f} % ({100 * grp:.1f} %)  {dropped:>10}  {fake:>12}")
    found, found_all = np.array([r[4] for r in rows]), np.array([r[5] for r in rows])
    print(f"  stroke found: all of it min {100 * found_all.min():.1f} %, off cells min {100 * found.min():.1f} %, mean "
          f"{100 * found.mean():.1f} %; stroke tiles kept: {sum(r[6] for r in rows)}/{sum(r[7] for r in rows)}; glass tiles "
          f"kept: {sum(r[10] for r in rows)}/{sum(r[11] for r in rows)}; nuclei in kept tiles: min "
          f"{100 * min(r[8] for r in rows):.1f} %; ink tiles dropped: {sum(r[12] for r in rows)}")
    overlap = _nucleus_overlap([(r[1], r[14]) for r in rows])
    keys = ("stain", "ink", "seed", "auto_stain", "stroke_found", "stroke_found_all", "stroke_tiles_kept", "stroke_tiles",
            "nuclei_in_kept_tiles", "group_nuclei_in_kept_tiles", "glass_tiles_kept", "glass_tiles", "ink_tiles_dropped",
            "nuclei_on_stroke_off_cells")
    return {"size": size, "mpp": mpp, "rows": [dict(zip(keys, r[:14])) for r in rows], "nucleus_overlap": overlap}


def _nucleus_overlap(measures: list[tuple[str, dict]]) -> dict:
    """Nuclei holding kept stroke tiles (no cell there: red cells or debris seen through the ink)
    against the real nuclei on the strokes: could a rule on size or own density drop the first
    without the second? The box spanned by the first (largest area, largest own density) and the
    real nuclei inside it."""
    out: dict = {}
    for ink in INKS + ("all",):
        sel = [m for k, m in measures if ink in ("all", k)]
        fa, fo = (np.concatenate([m["fake_" + k] for m in sel]) for k in ("area", "own"))
        ra, ro = (np.concatenate([m["real_" + k] for m in sel]) for k in ("area", "own"))
        if not len(fa) or not len(ra):
            print(f"  {ink}: {len(fa)} nuclei hold kept stroke tiles, {len(ra)} real nuclei on the strokes")
            out[ink] = {"fake": int(len(fa)), "real": int(len(ra))}
            continue
        inside = int(((ra <= fa.max()) & (ro <= fo.max())).sum())
        print(f"  {ink}: {len(fa)} nuclei hold kept stroke tiles: area {fa.min():.0f}-{fa.max():.0f} um2, own density "
              f"{fo.min():.3f}-{fo.max():.3f}; real nuclei on the strokes ({len(ra)}): area {np.percentile(ra, 2):.0f} um2 "
              f"(2nd pct), own density from {ro.min():.3f} ({np.percentile(ro, 2):.3f} 2nd pct); real nuclei no larger "
              f"and no denser than the largest and densest of those: {inside} ({100 * inside / max(len(ra), 1):.1f} %)")
        out[ink] = {"fake": int(len(fa)), "fake_area_um2": [float(fa.min()), float(fa.max())],
                    "fake_own_density": [float(fo.min()), float(fo.max())], "real": int(len(ra)),
                    "real_inside_fake_box": inside}
    return out


def _stroke_figures(path: Path, size: int, mpp: float):
    truth = json.loads(path.with_suffix("").with_suffix(".truth.json").read_text())
    config = TilerConfig()
    with open_slide(path) as slide:
        plan = plan_tiles(slide, config, mpp, workers=2)
    ds = plan.thumbnail_downsample
    decision, fg = decide_stain(plan.thumbnail, plan.thumbnail_mpp)
    h, w = plan.thumbnail.shape[:2]
    stroke = pen_stroke_mask(truth["artifacts"]["pen"]["mask"], size, size, int(round(ds)))[:h, :w]
    cells = cell_box_mask(truth, (h, w), ds)
    near = ndi.binary_dilation(cells, iterations=max(1, int(round(15.0 / plan.thumbnail_mpp))))
    bare = stroke & ~near
    found = float((fg.ink & bare).sum() / max(bare.sum(), 1))
    found_all = float((fg.ink & stroke).sum() / max(stroke.sum(), 1))
    # grid tiles mostly on the stroke and holding no cell: none should be kept
    rows, cols = plan.grid_meta["shape"]
    stride, tile0 = plan.grid_meta["stride"][0], plan.grid_meta["tile_level0"][0]
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    boxes = np.stack([np.round(cc.ravel() * stride), np.round(rr.ravel() * stride),
                      np.full(rr.size, tile0), np.full(rr.size, tile0)], 1)
    on_stroke = tile_fractions(stroke, ds, boxes) >= 0.5
    with_cell = tile_fractions(cells, ds, boxes) > 0
    stroke_tiles = on_stroke & ~with_cell
    kept = {(int(r), int(c)) for r, c in plan.grid}
    kept_stroke = np.zeros(len(boxes), bool)  # the stroke tiles the tiler kept
    kept_stroke[np.flatnonzero(stroke_tiles)] = [(int(r), int(c)) in kept for r, c in
                                                 zip(rr.ravel()[stroke_tiles], cc.ravel()[stroke_tiles])]
    n_kept = int(kept_stroke.sum())
    nuclei = np.array([c["nucleus"] for c in truth["cells"] if c["nucleus"] is not None], float)
    in_group = np.array([c["group"] is not None for c in truth["cells"] if c["nucleus"] is not None])
    ok = _in_kept_tiles(nuclei, plan.coords) if len(nuclei) else np.ones(0, bool)
    grp = float(ok[in_group].mean()) if in_group.any() else float("nan")
    # grid tiles wholly inside the bare-glass blocks of the truth: should not be kept
    glass = np.zeros(len(boxes), bool)
    for x, y, w, h in truth["empty_fields"]:
        glass |= ((boxes[:, 0] >= x) & (boxes[:, 0] + boxes[:, 2] <= x + w) & (boxes[:, 1] >= y)
                  & (boxes[:, 1] + boxes[:, 3] <= y + h))
    n_glass_kept = sum((int(r), int(c)) in kept for r, c in zip(rr.ravel()[glass], cc.ravel()[glass]))
    # nuclei found on the stroke outside every cell box, those holding kept stroke tiles, the real ones on the stroke
    centres = np.asarray(fg.nuclei, float).reshape(-1, 2)
    at = tuple(np.clip(np.round(centres).astype(int), 0, np.array(stroke.shape) - 1).T)
    truth_rc = nuclei[:, ::-1] / ds if len(nuclei) else np.zeros((0, 2))
    near_truth = cKDTree(truth_rc).query(centres)[0] <= 5 if len(truth_rc) and len(centres) else np.zeros(len(centres), bool)
    off_cells = stroke[at] & ~cells[at]
    real = stroke[at] & cells[at] & near_truth
    pts0 = (centres + 0.5) * ds  # level-0 (y, x), as the tiler counts them
    tile_of = (np.clip(pts0[:, 0] // stride, 0, rows - 1).astype(int) * cols
               + np.clip(pts0[:, 1] // stride, 0, cols - 1).astype(int))
    holding = kept_stroke[tile_of] if len(centres) else np.zeros(0, bool)
    measures = _nucleus_measures(plan.thumbnail, truth, centres, plan.thumbnail_mpp, {"fake": holding, "real": real})
    return (decision.stain, found, found_all, n_kept, int(stroke_tiles.sum()), float(ok.mean()), grp, n_glass_kept,
            int(glass.sum()), int(plan.foreground_info.get("ink_tiles_dropped", 0)), int(off_cells.sum()), measures)


def _nucleus_measures(rgb: np.ndarray, truth: dict, centres: np.ndarray, mpp: float, groups: dict) -> dict:
    """Area (um2) and own density (OD above the top-hat's floor: the ink under it subtracted) of
    the found nuclei flagged in each of ``groups``. The nuclei are labelled again with the public
    nucleus finder on the OD against the truth's glass colour and matched to the found centres
    (within 1 px); unmatched ones are left out."""
    glass = np.asarray(truth["glass_rgb"], np.float32)
    od_rg = np.stack([np.log10(glass[c]) - np.log10(np.maximum(rgb[..., c], 1).astype(np.float32)) for c in (0, 1)])
    found = label_nuclei(nucleus_pixels(od_rg[0], od_rg[1], mpp), mpp)
    out = {}
    for name, flag in groups.items():
        pick = centres[flag]
        idx = np.zeros(0, np.int64)
        if len(pick) and len(found):
            d, j = cKDTree(found.centres).query(pick)
            idx = j[d <= 1.0]
        out[name + "_area"] = found.areas[idx] * mpp * mpp
        out[name + "_own"] = own_density(od_rg, found, idx, mpp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder [default: %(default)s]")
    ap.add_argument("--only", choices=("blood", "pap", "ink"), default=None)
    ap.add_argument("--size", type=int, default=8192, help="side of the synthetic ink smears (px)")
    ap.add_argument("--mpp", type=float, default=1.0,
                    help="their pixel size; 8192 px at 1 um/px draws a 245-um stroke, two tiles wide")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON ('-' = stdout)")
    args = ap.parse_args(argv)
    return run_script(lambda: evaluate(args.shared, args.only, args.size, args.mpp), args.json)


def evaluate(shared: Path, only: str | None, size: int, mpp: float) -> dict:
    """The chosen sections' figures, printed and returned."""
    needed = {"blood": ["smear_fields"], "pap": ["pap_fields/mendeley_lbc_512", "smear_fields", "slides", "pbc"]}
    for section in ([only] if only else ["blood", "pap"]):
        for sub in needed.get(section, []):
            if not (shared / sub).is_dir():
                raise WsiTriageError(f"{shared / sub}: not found (the {section} figures need the shared data; "
                                     "--shared, or --only ink)")
    doc: dict = {}
    if only in (None, "blood"):
        doc["blood"] = {**smear_fields(shared / "smear_fields"), "discs": disc_overshoot()}
    if only in (None, "pap"):
        doc["pap"] = {**pap_fields(shared / "pap_fields" / "mendeley_lbc_512"), "stain_auto": stain_decisions(shared)}
    if only in (None, "ink"):
        doc["ink"] = ink_strokes(size, mpp)
    return doc


if __name__ == "__main__":
    sys.exit(main())
