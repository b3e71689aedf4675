"""Slide-level and tile-level evaluation of a student on generated smears with known answers,
for the grid and the cells (object-centred) tile placements side by side on the same smears.

Builds N positive and N negative smears (``wsi_pipeline.synth``) from blood-cell images that no
model was trained on — by default the PBC images of configs/pbc_heldout.txt in ../shared/data/pbc
(held out from ALL training), else the held-out cells shipped with the package; ``--pool
validation`` uses the checkpoint's own validation split of the training pool instead (cells it never
learned from, so it is as sure of them as of new cells: for choosing settings and calibrating, never
for reporting; ``--pool tuning``, the whole training pool, makes a model look surer than it is) —
runs each through the pipeline (``run_slide``: tile, score with the threads scheduler, aggregate)
once per placement (``--tiling grid|cells|both``) and reports for each:

- slide ROC AUC of the slide scores (Mann-Whitney U, scipy.stats.mannwhitneyu) with a bootstrap
  95 % interval (scipy.stats.bootstrap, percentile, positives and negatives resampled apart), both
  score distributions, and the shares of positives >= 0.5 and negatives < 0.5 (the documented
  decision point of a calibrated score);
- planted-cell detection: a planted suspicious cell (truth JSON, ``suspicious: true``) counts as
  detected when its own tile (of the stored tiles holding its centre, the one centred nearest to
  it) has suspicion >= the threshold (0.5); suspicion = summed probability of the checkpoint's
  suspicious classes, read from ``scores/<sha12>/probs`` in the tile store; cells with no tile
  count as missed;
- false suspicion on normal cells by class (same own-tile rule) and each class's coverage (share
  of its cells that have a tile at all);
- tiles per slide and pipeline time.

``--calibrate`` fits each placement's logistic calibration of the raw slide score (Platt scaling)
on the smears of the run; ``--fields`` instead measures on the real BCCD smear fields how many boxed
white cells get their own centred tile, and tiles per field, for both placements (the tiler's plan).

Every slide has its own seed (positive i: base + 2i, negative i: base + 2i + 1); ``--twins``
gives negative i the seed of positive i instead (same layout, no suspicious cell). The planted
classes are the checkpoint's suspicious classes. Nothing is written into the repository: the
smears and stores go to a temporary folder (removed) or to ``--out`` (kept; a rerun reuses the
smears and stores, and a new ``--checkpoint`` re-scores the stored tiles without re-tiling).

    python benchmarks/eval_triage.py [--n 20] [--size 3072x3072] [--tiling both] [--out DIR] [--json FILE|-]
    python benchmarks/eval_triage.py --pool validation --seed 5000 --calibrate
    python benchmarks/eval_triage.py --fields
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.stats import bootstrap, mannwhitneyu

from wsi_contracts import tilestore as tile_store
from wsi_pipeline.aggregation import AggregateConfig, tile_suspicion
from wsi_contracts import checkpoint as checkpoint_contract
from wsi_contracts.checkpoint import CheckpointInfo
from wsi_pipeline.scoring import read_checkpoint_info
from wsi_pipeline.errors import UserError, WsiTriageError
from wsi_pipeline.pipeline import RunOptions, run_slide
from wsi_pipeline.scoring import ScoreConfig, read_scores, scores_key
from wsi_pipeline.script import at_least, run_script
from wsi_pipeline.synth import SynthConfig, list_cells, made_with, parse_size, read_cell_list, synthesize, truth_paths

#: the repository checkout this script belongs to (configs/, and ../shared/data beside it)
ROOT = Path(__file__).resolve().parents[1]
HELDOUT_LIST = ROOT / "configs" / "pbc_heldout.txt"


# --------------------------------------------------------------------------- numbers


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC = P(score_pos > score_neg) + 0.5 P(equal): the Mann-Whitney U of the positives over n_pos * n_neg."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    return float(mannwhitneyu(pos, neg, alternative="two-sided").statistic / (pos.size * neg.size))


def bootstrap_auc_ci(pos: np.ndarray, neg: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval (scipy.stats.bootstrap), resampling positives and negatives separately."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if pos.size < 2 or neg.size < 2:
        return float("nan"), float("nan")
    res = bootstrap((pos, neg), roc_auc, n_resamples=n_boot, method="percentile", paired=False, vectorized=False,
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def platt_fit(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Platt scaling: logistic p = 1 / (1 + exp(-(a * s + b))) fitted by maximum likelihood to Platt's
    smoothed targets ((N+ + 1) / (N+ + 2) and 1 / (N- + 2)), which stay finite when the classes separate."""
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    t = np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(ab):
        z = ab[0] * s + ab[1]
        return float(np.sum(np.logaddexp(0, z) - t * z))

    mid = (s[y].min() + s[~y].max()) / 2 if n_pos and n_neg else float(np.median(s))
    fit = minimize(loss, x0=np.array([10.0, -10.0 * mid]), method="Nelder-Mead",
                   options={"xatol": 1e-6, "fatol": 1e-9, "maxiter": 20000})
    return {"slope": round(float(fit.x[0]), 4), "intercept": round(float(fit.x[1]), 4)}


def write_calibrated(source: CheckpointInfo, sha256: str, calibration: dict[str, Any], out: Path) -> dict[str, str]:
    """A copy of the evaluated checkpoint whose metadata ``calibration`` is the fitted one (every
    tensor as stored), refused when the source file changed since it was scored."""
    if source.sha256 != sha256:
        raise WsiTriageError(f"{source.path}: the checkpoint changed during the evaluation; run again")
    sha = checkpoint_contract.copy_with_metadata(source, out, {"calibration": calibration})
    return {"path": str(out), "sha256": sha, "source_sha256": sha256}


def centre_tiles(coords: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """Indices of the stored tiles (level-0 x, y, w, h) whose area holds the point (cx, cy)."""
    x, y, w, h = coords[:, 0], coords[:, 1], coords[:, 2], coords[:, 3]
    return np.flatnonzero((x <= cx) & (cx < x + w) & (y <= cy) & (cy < y + h))


def own_tile(coords: np.ndarray, cx: float, cy: float) -> int:
    """The cell's own tile: of the tiles holding its centre, the one whose centre is nearest (-1: none).

    On a grid without overlap that is the one tile holding the centre; with tiles placed on
    objects it is the tile centred on the cell, not a neighbour's tile that happens to reach it."""
    idx = centre_tiles(coords, cx, cy)
    if idx.size == 0:
        return -1
    c = coords[idx]
    d = np.hypot(c[:, 0] + c[:, 2] / 2.0 - cx, c[:, 1] + c[:, 3] / 2.0 - cy)
    return int(idx[np.argmin(d)])


@dataclass
class SlideEval:
    slide: str
    label: str  # positive | negative
    seed: int
    status: str
    score: float | None
    n_tiles: int
    n_tiles_flagged: int  # suspicion >= threshold
    n_tiles_flagged_clean: int  # flagged tiles holding no planted cell
    n_tiles_clean: int  # tiles holding no planted cell
    planted: int
    detected: int
    foreground_missed: int
    synth_seconds: float
    run_seconds: float
    tiles_by_class: dict[str, list[int]] | None = None  # class -> [cells with an own tile, of them flagged, cells]
    raw_score: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def evaluate_store(store: Path, truth: dict, info: CheckpointInfo, threshold: float) -> dict[str, int]:
    """Tile counts and planted-cell detection for one scored store."""
    group = tile_store.open_store(store)
    n = tile_store.read_store_meta(group).n_tiles
    if n == 0:
        planted = sum(1 for c in truth["cells"] if c["suspicious"])
        return {"n_tiles": 0, "n_tiles_flagged": 0, "n_tiles_flagged_clean": 0, "n_tiles_clean": 0,
                "planted": planted, "detected": 0, "foreground_missed": planted}
    coords = np.asarray(group["coords"][:], dtype=np.int64)
    probs, attrs = read_scores(group, info.sha256)
    suspicion = tile_suspicion(probs, attrs.class_names, attrs.suspicious_classes)
    flagged = suspicion >= threshold
    holds_planted = np.zeros(n, dtype=bool)
    holds_cell = np.zeros(n, dtype=bool)
    planted = detected = missed = 0
    # per class: [cells with a tile of their own, of them flagged, cells]; last, tiles holding no listed cell
    by_class: dict[str, list[int]] = {}
    for cell in truth["cells"]:
        x, y, w, h = cell["bbox"]
        cx, cy = x + w / 2.0, y + h / 2.0
        holds_cell[centre_tiles(coords, cx, cy)] = True
        own = own_tile(coords, cx, cy)
        tally = by_class.setdefault(cell["class"], [0, 0, 0])
        tally[2] += 1
        if own >= 0:
            tally[0] += 1
            tally[1] += int(flagged[own])
        if cell["suspicious"]:
            planted += 1
            if own < 0:
                missed += 1
                continue
            holds_planted[centre_tiles(coords, cx, cy)] = True
            detected += int(flagged[own])
    by_class["(tiles without a listed cell)"] = [int((~holds_cell).sum()), int((flagged & ~holds_cell).sum()),
                                                 int((~holds_cell).sum())]
    return {"n_tiles": n, "n_tiles_flagged": int(flagged.sum()), "tiles_by_class": by_class,
            "n_tiles_flagged_clean": int((flagged & ~holds_planted).sum()), "n_tiles_clean": int((~holds_planted).sum()),
            "planted": planted, "detected": detected, "foreground_missed": missed}


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def best_split(pos: np.ndarray, neg: np.ndarray) -> dict[str, float] | None:
    """The raw-score threshold with the largest smaller share of the two classes on their side of it
    (positives >= t, negatives < t): what any monotone calibration could reach at its 0.5."""
    if pos.size == 0 or neg.size == 0:
        return None
    best = max(((float(np.mean(pos >= t)), float(np.mean(neg < t)), float(t)) for t in np.unique(np.r_[pos, neg])),
               key=lambda r: (min(r[0], r[1]), r[0] + r[1]))
    return {"threshold": best[2], "positives_at_or_above": best[0], "negatives_below": best[1]}


def summarise(slides: list[SlideEval], threshold: float) -> dict[str, Any]:
    pos = [s for s in slides if s.label == "positive" and s.score is not None]
    neg = [s for s in slides if s.label == "negative" and s.score is not None]
    ps = np.array([s.score for s in pos])
    ns = np.array([s.score for s in neg])
    auc = roc_auc(ps, ns)
    ci = bootstrap_auc_ci(ps, ns) if ps.size and ns.size else (float("nan"), float("nan"))
    planted = sum(s.planted for s in slides if s.label == "positive")
    detected = sum(s.detected for s in slides if s.label == "positive")
    missed = sum(s.foreground_missed for s in slides if s.label == "positive")
    neg_tiles = sum(s.n_tiles for s in slides if s.label == "negative")
    neg_flagged = sum(s.n_tiles_flagged for s in slides if s.label == "negative")
    pos_clean = sum(s.n_tiles_clean for s in slides if s.label == "positive")
    pos_clean_flagged = sum(s.n_tiles_flagged_clean for s in slides if s.label == "positive")

    def dist(a: np.ndarray) -> dict[str, float] | None:
        if a.size == 0:
            return None
        q = np.quantile(a, [0.0, 0.25, 0.5, 0.75, 1.0])
        return {"n": int(a.size), "min": float(q[0]), "q25": float(q[1]), "median": float(q[2]),
                "q75": float(q[3]), "max": float(q[4]), "mean": float(a.mean())}

    by_class: dict[str, list[int]] = {}
    for s in slides:
        for cls, (held, flag, total) in (s.tiles_by_class or {}).items():
            tally = by_class.setdefault(cls, [0, 0, 0])
            tally[0] += held
            tally[1] += flag
            tally[2] += total
    return {
        "flag_rate_by_class": {c: {"n": t, "flagged": f, "rate": _rate(f, t), "cells": a, "coverage": _rate(t, a)}
                               for c, (t, f, a) in sorted(by_class.items())},
        "slide_auc": auc, "slide_auc_ci95": list(ci),
        "scores": {"positive": dist(ps), "negative": dist(ns)},
        "errors": sum(1 for s in slides if s.status == "error"),
        "empty": sum(1 for s in slides if s.status == "empty"),
        "threshold": threshold,
        "planted_cells": planted, "detected_cells": detected, "foreground_missed_cells": missed,
        "detection_rate": _rate(detected, planted),
        "detection_rate_in_tiles": _rate(detected, planted - missed),
        "negative_tiles": neg_tiles, "negative_tiles_flagged": neg_flagged,
        "fp_rate_negative_tiles": _rate(neg_flagged, neg_tiles),
        "fp_rate_clean_tiles_of_positives": _rate(pos_clean_flagged, pos_clean),
        # the documented decision point: slide score 0.5
        "positives_at_or_above_0_5": _rate(int(np.sum(ps >= 0.5)), ps.size),
        "negatives_below_0_5": _rate(int(np.sum(ns < 0.5)), ns.size),
        # how far the score is from the probability it claims to be (0 = right and sure; 0.25 = a
        # constant 0.5): what calibrating on cells the model never saw should lower
        "brier": float(np.mean(np.r_[(1.0 - ps) ** 2, ns ** 2])) if ps.size + ns.size else None,
        "raw_scores": {"positive": [s.raw_score for s in pos], "negative": [s.raw_score for s in neg]},
        "best_split": best_split(np.array([s.raw_score for s in pos]), np.array([s.raw_score for s in neg])),
        "tiles_per_slide": float(np.mean([s.n_tiles for s in slides])) if slides else None,
        "pipeline_seconds": round(sum(s.run_seconds for s in slides), 1),
    }


# --------------------------------------------------------------------------- driver


def cell_source(cells: str | None, cell_list: str | None) -> tuple[Path | None, tuple[str, ...] | None, str]:
    """(cells root, list, description): --cells/--cell-list, else shared PBC held-out, else shipped cells."""
    if cells:
        listed = read_cell_list(cell_list) if cell_list else None
        return Path(cells), listed, f"{cells}" + (f" restricted to {cell_list}" if cell_list else "")
    env = os.environ.get("WSI_TRIAGE_SHARED_DATA")
    shared = Path(env) if env else ROOT.parent / "shared" / "data"
    pbc = shared / "pbc"
    if pbc.is_dir():
        lst = cell_list or str(HELDOUT_LIST)
        return pbc, read_cell_list(lst), f"{pbc} restricted to {lst}"
    print(f"note: {pbc} not found; using the held-out cells shipped with the package", file=sys.stderr)
    return None, None, "shipped held-out cells (wsi_pipeline/data/cells)"


FIELD_MPP = 0.07  # ../shared/data/smear_fields: median red-cell box 109 px for a ~7.5 um red cell


def fields_eval(folder: Path, info: CheckpointInfo, centred: float = 0.15) -> dict[str, Any]:
    """The tiler's own plan (grid and cells) on each real BCCD field (VOC boxes) at the checkpoint's geometry.

    A boxed white cell "gets its own centred tile" when a planned tile starts within ``centred``
    tiles of where a tile centred on the box would start once kept inside the field the same way
    (a field is about 1.3 x 1 tile, so a cell near its edge cannot be centred exactly)."""
    import xml.etree.ElementTree as ET

    from wsi_pipeline.slides import open_slide
    from wsi_pipeline.tiling import TilerConfig, plan_tiles

    out: dict[str, Any] = {"fields": 0, "wbc": 0}
    for placement in ("grid", "cells"):
        out[placement] = {"tiles": 0, "wbc_centred": 0, "wbc_in_a_tile": 0}
    t0 = time.perf_counter()
    for xml in sorted((folder / "annotations").glob("*.xml")):
        image = folder / f"{xml.stem}.jpg"
        if not image.is_file():
            continue
        boxes = [tuple(int(o.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax"))
                 for o in ET.parse(xml).getroot().iter("object") if o.find("name").text == "WBC"]
        out["fields"] += 1
        out["wbc"] += len(boxes)
        with open_slide(image, mpp=FIELD_MPP) as slide:
            w, h = slide.dimensions
            for placement in ("grid", "cells"):
                config = TilerConfig(target_mpp=info.tile_mpp, tile_size=info.tile_size, stain="romanowsky",
                                     tiling=placement)
                coords = plan_tiles(slide, config, FIELD_MPP, workers=1).coords
                tally = out[placement]
                tally["tiles"] += len(coords)
                tile0 = info.tile_size * info.tile_mpp / FIELD_MPP
                for x0, y0, x1, y1 in boxes:
                    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                    if len(coords) == 0:
                        continue
                    tally["wbc_in_a_tile"] += int(centre_tiles(coords, cx, cy).size > 0)
                    ix = min(max(cx - tile0 / 2, 0), max(w - tile0, 0))
                    iy = min(max(cy - tile0 / 2, 0), max(h - tile0, 0))
                    tally["wbc_centred"] += int(np.hypot(coords[:, 0] - ix, coords[:, 1] - iy).min() <= centred * tile0)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def print_fields(doc: dict[str, Any]) -> None:
    n = doc["wbc"]
    print(f"real BCCD smear fields: {doc['fields']} fields, {n} boxed white cells, at {FIELD_MPP} um/px "
          f"({doc['seconds']:.0f} s)")
    print(f"  {'placement':<10} {'own centred tile':>20} {'centre in a tile':>18} {'tiles per field':>16}")
    for p in ("grid", "cells"):
        d = doc[p]
        print(f"  {p:<10} {_fmt(d['wbc_centred'] / n, True):>11} ({d['wbc_centred']:>3}/{n}) "
              f"{_fmt(d['wbc_in_a_tile'] / n, True):>18} {d['tiles'] / doc['fields']:>16.2f}")


def tuning_list(pool_root: Path) -> tuple[str, ...]:
    """The PBC images NOT held out (the training pool): relpaths under ``pool_root`` minus configs/pbc_heldout.txt."""
    held = set(read_cell_list(str(HELDOUT_LIST)))
    return tuple(sorted(str(p.relative_to(pool_root)) for p in pool_root.glob("*/*.jpg")
                        if str(p.relative_to(pool_root)) not in held))


def validation_list(pool_root: Path, info: CheckpointInfo) -> tuple[str, ...]:
    """The PBC images of the checkpoint's own validation split (never trained on, unlike the rest of
    the training pool): distill's split with the settings its provenance records, checked against
    the validation count it records for that data root."""
    from distill.data import split_paths

    prov = info.metadata.get("provenance") or {}
    split = prov.get("split") or {}
    entries = [d for d in prov.get("data", []) if isinstance(d, dict) and Path(str(d.get("root", ""))).name == pool_root.name
               and d.get("n_val") is not None]
    if not split or not entries:
        raise WsiTriageError(f"{info.path}: its provenance records no split of a '{pool_root.name}' data root; "
                             "--pool validation needs one")
    group_pattern = (prov.get("config") or {}).get("group_pattern")
    _, val = split_paths(pool_root, float(split["val_frac"]), int(split["seed"]), HELDOUT_LIST, group_pattern)
    if len(val) != int(entries[0]["n_val"]):
        raise WsiTriageError(f"{info.path}: its validation split of {pool_root} held {entries[0]['n_val']} images, "
                             f"the split made here {len(val)}; the data or the exclude list changed")
    return tuple(val)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="positive smears, and as many negative ones")
    ap.add_argument("--size", default="3072x3072", help="level-0 size WIDTHxHEIGHT of each smear (px)")
    ap.add_argument("--mpp", type=float, default=0.25, help="pixel size of the smears (um/px)")
    ap.add_argument("--fraction", type=float, default=0.3,
                    help="share of the cells in each planted region of a positive smear that are suspicious")
    ap.add_argument("--seed", type=int, default=1000, help="base seed (slide i of 2N gets base + i)")
    ap.add_argument("--twins", action="store_true", help="negative i uses positive i's seed (same layout)")
    ap.add_argument("--checkpoint", default=None, help="student checkpoint [default: the bundled demo student]")
    ap.add_argument("--cells", default=None, help="ImageFolder of cell images [default: ../shared/data/pbc]")
    ap.add_argument("--cell-list", default=None,
                    help="relpaths under --cells to use [default with ../shared/data/pbc: configs/pbc_heldout.txt]")
    ap.add_argument("--pool", choices=["heldout", "validation", "tuning"], default="heldout",
                    help="with ../shared/data/pbc: held-out cells (evaluation), the checkpoint's validation split "
                         "(cells it never learned from: for choosing settings and calibrating; use another --seed) "
                         "or the whole training pool")
    ap.add_argument("--tiling", choices=["grid", "cells", "both"], default="both",
                    help="tile placement(s) to evaluate on the same smears, side by side")
    ap.add_argument("--calibrate", action="store_true",
                    help="fit the logistic calibration of each placement's raw slide score (Platt) on these smears "
                         "and print it (for a checkpoint's `calibration` metadata; use --pool validation)")
    ap.add_argument("--write-calibration", type=Path, default=None, metavar="OUT",
                    help="with --calibrate: write a copy of the checkpoint carrying the fitted calibration in its "
                         "metadata (`calibration`; tensors bit for bit) to OUT")
    ap.add_argument("--fields", action="store_true",
                    help="only the real BCCD smear fields (../shared/data/smear_fields): white cells with their own "
                         "centred tile and tiles per field, grid vs cells")
    ap.add_argument("--threshold", type=float, default=0.5, help="tile suspicion that counts as flagged")
    ap.add_argument("--workers", type=int, default=None, help="scoring and tiling workers [default: CPU count]")
    ap.add_argument("--out", type=Path, default=None, help="keep smears and stores here [default: temporary]")
    ap.add_argument("--json", default=None, metavar="FILE",
                    help="also write the results as JSON ('-' = stdout, the tables then on stderr)")
    ap.add_argument("--verbose", action="store_true", help="print one line per slide")
    args = ap.parse_args(argv)
    if args.write_calibration and not args.calibrate:
        ap.error("--write-calibration needs --calibrate")
    return run_script(lambda: evaluate_fields(args) if args.fields else evaluate_smears(args), args.json)


def evaluate_fields(args: argparse.Namespace) -> dict[str, Any]:
    """--fields: the tiler's plans on the real BCCD fields, printed."""
    folder = Path(os.environ.get("WSI_TRIAGE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "smear_fields"
    if not folder.is_dir():
        raise WsiTriageError(f"{folder}: not found (the BCCD smear fields)")
    doc = fields_eval(folder, read_checkpoint_info(args.checkpoint))
    print_fields(doc)
    return doc


def evaluate_smears(args: argparse.Namespace) -> dict[str, Any]:
    """N positive and N negative smears through the pipeline per placement; the summary printed."""
    at_least("--n", args.n)
    placements = ["grid", "cells"] if args.tiling == "both" else [args.tiling]
    width, height = parse_size(args.size)
    # Score every slide with one frozen copy: a checkpoint file replaced during the run
    # (e.g. a new export) would otherwise split the slides between two models.
    source = read_checkpoint_info(args.checkpoint)
    t_all = time.perf_counter()
    try:
        out = args.out or Path(tempfile.mkdtemp(prefix="wsi-triage-eval-"))
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsiTriageError(f"{args.out}: cannot create the folder ({exc.strerror or exc})") from None
    results: dict[str, list[SlideEval]] = {p: [] for p in placements}
    synth_total = 0.0
    try:
        frozen = out / f"checkpoint-{source.sha12}.safetensors"
        shutil.copyfile(source.path, frozen)
        info = read_checkpoint_info(frozen)
        if info.sha256 != source.sha256:
            raise WsiTriageError(f"{source.path}: the checkpoint changed while it was being copied; run again")
        cells, listed, cells_desc = cell_source(args.cells, args.cell_list)
        list_name = args.cell_list or (str(HELDOUT_LIST) if listed else None)
        if args.pool != "heldout":
            if cells is None or args.cells:
                raise WsiTriageError(f"--pool {args.pool} needs ../shared/data/pbc (and no --cells)")
            if args.pool == "tuning":
                listed = tuning_list(cells)
                list_name = "training pool (pbc minus configs/pbc_heldout.txt)"
            else:
                listed = validation_list(cells, info)
                list_name = "checkpoint's validation split of the training pool (never trained on)"
            cells_desc = f"{cells} restricted to the {list_name}"
        pool = list_cells(cells, listed)
        suspicious = tuple(c for c in info.suspicious_classes if c in pool.classes)
        if not suspicious:
            raise WsiTriageError(f"{info.path}: suspicious classes {list(info.suspicious_classes)} have no cell "
                                 f"images in {pool.root} (classes: {', '.join(pool.classes)})")
        plan = []
        for i in range(args.n):
            plan.append(("positive", args.seed + 2 * i, args.fraction))
            plan.append(("negative", args.seed + 2 * i + (0 if args.twins else 1), 0.0))
        for k, (label, seed, fraction) in enumerate(plan):
            slide = out / "smears" / f"{label[:3]}-{seed}.tiff"
            cfg = SynthConfig(width=width, height=height, mpp=args.mpp, seed=seed, cells=cells, cell_list=listed,
                              cell_list_name=list_name, suspicious=suspicious, fraction=fraction)
            truth_json = truth_paths(slide)[0]
            t0 = time.perf_counter()
            if not (slide.is_file() and made_with(truth_json, cfg)):  # same settings, same renderer
                synthesize(slide, cfg)
            synth_s = time.perf_counter() - t0
            synth_total += synth_s
            truth = json.loads(truth_json.read_text())
            if truth["label"] != label:  # e.g. a positive too small to hold a planted cell
                print(f"note: {slide.name} came out {truth['label']}; evaluated as such", file=sys.stderr)
                label = truth["label"]
            for placement in placements:
                r = _evaluate_slide(slide, truth, label, seed, placement, out, info, frozen, args)
                results[placement].append(r)
                if args.verbose:
                    print(f"[{k + 1:>3}/{len(plan)}] {placement:<5} {r.slide:<16} score {r.score:.4f}  "
                          f"tiles {r.n_tiles:>5}  flagged {r.n_tiles_flagged:>4}  planted {r.planted:>3}  "
                          f"detected {r.detected:>3}  missed {r.foreground_missed:>2}  run {r.run_seconds:5.1f}s",
                          file=sys.stderr, flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)

    wall = time.perf_counter() - t_all
    doc = {
        "checkpoint": str(source.path), "checkpoint_sha12": info.sha12, "class_names": list(info.class_names),
        "suspicious_classes": list(info.suspicious_classes), "planted_classes": list(suspicious),
        "cells": cells_desc, "n_per_label": args.n, "size": [width, height], "mpp": args.mpp,
        "fraction": args.fraction, "base_seed": args.seed, "twins": args.twins,
        "slide_score": AggregateConfig().method, "top_k": AggregateConfig().top_k,
        "placements": {p: summarise(results[p], args.threshold) for p in placements},
        "runtime": {"wall_seconds": round(wall, 1), "synth_seconds": round(synth_total, 1), "cpus": os.cpu_count()},
        "slides": {p: [r.as_dict() for r in results[p]] for p in placements},
    }
    if args.calibrate:
        doc["calibration"] = {}
        for p in placements:
            rs = [r for r in results[p] if r.raw_score is not None]
            fit = platt_fit(np.array([r.raw_score for r in rs]), np.array([r.label == "positive" for r in rs]))
            doc["calibration"][p] = {**fit, "method": AggregateConfig().method, "top_k": AggregateConfig().top_k,
                                     "fitted_on": f"{len(rs)} smears, {cells_desc}, seeds from {args.seed}, "
                                                  f"{width}x{height} px at {args.mpp} um/px"}
        if args.write_calibration:
            doc["calibrated_checkpoint"] = write_calibrated(source, info.sha256, doc["calibration"],
                                                            args.write_calibration)
    print_summary(doc)
    return doc


def _evaluate_slide(slide: Path, truth: dict, label: str, seed: int, placement: str, out: Path,
                    info: CheckpointInfo, frozen: Path, args) -> SlideEval:
    """Run one smear through the pipeline with one placement and count what it found."""
    options = RunOptions(checkpoint=info.path, tile_workers=args.workers, tiling=placement,
                         score=ScoreConfig(scheduler="threads", workers=args.workers))
    try:
        run = run_slide(slide, out / f"triage-{placement}", options, info=info)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return SlideEval(slide.name, label, seed, "error", None, 0, 0, 0, 0,
                         sum(c["suspicious"] for c in truth["cells"]), 0, 0, 0.0, 0.0)
    if run.steps["score"]["key"] != scores_key(info.sha256):
        raise WsiTriageError(f"{run.store}: scored as {run.steps['score']['key']}, expected "
                             f"{scores_key(info.sha256)} ({frozen})")
    counts = evaluate_store(run.store, truth, info, args.threshold)
    # a slide without tissue tiles gets the lowest possible score, as triage would rank it last
    score = run.score if run.score is not None else 0.0
    raw = (run.summary or {}).get("score", {}).get("raw", run.score)
    return SlideEval(slide.name, label, seed, run.status, score, synth_seconds=0.0,
                     run_seconds=round(run.seconds, 2), raw_score=0.0 if raw is None else raw, **counts)


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{100 * v:.1f} %" if pct else f"{v:.3f}"


def print_summary(doc: dict[str, Any]) -> None:
    rt = doc["runtime"]
    places = list(doc["placements"])
    print(f"checkpoint {Path(doc['checkpoint']).name} ({doc['checkpoint_sha12']}), "
          f"suspicious: {', '.join(doc['suspicious_classes'])}; slide score: {doc['slide_score']} "
          f"(k={doc['top_k']}; over objects for cells)")
    print(f"smears: {doc['n_per_label']} positive + {doc['n_per_label']} negative, "
          f"{doc['size'][0]}x{doc['size'][1]} px at {doc['mpp']} um/px, fraction {doc['fraction']}, "
          f"{'twin' if doc['twins'] else 'independent'} seeds from {doc['base_seed']}; cells: {doc['cells']}")
    print()
    for p in places:
        d = doc["placements"][p]
        print(f"slide scores ({p})  n     min     q25  median     q75     max")
        for label in ("positive", "negative"):
            q = d["scores"][label]
            if q:
                print(f"  {label:<17} {q['n']:>2} {q['min']:>7.4f} {q['q25']:>7.4f} "
                      f"{q['median']:>7.4f} {q['q75']:>7.4f} {q['max']:>7.4f}")
    print()
    t = next(iter(doc["placements"].values()))["threshold"]

    def row(d: dict) -> dict[str, str]:
        lo, hi = d["slide_auc_ci95"]
        return {
            "slide ROC AUC (bootstrap 95 % CI)": f"{_fmt(d['slide_auc'])} ({_fmt(lo)}-{_fmt(hi)})",
            f"planted cells detected (own tile >= {t})":
                f"{_fmt(d['detection_rate'], True)} ({d['detected_cells']}/{d['planted_cells']})",
            "planted cells without a tile": f"{d['foreground_missed_cells']}/{d['planted_cells']}",
            f"negative-slide tiles >= {t}":
                f"{_fmt(d['fp_rate_negative_tiles'], True)} ({d['negative_tiles_flagged']}/{d['negative_tiles']})",
            "positives scoring >= 0.5": _fmt(d["positives_at_or_above_0_5"], True),
            "negatives scoring < 0.5": _fmt(d["negatives_below_0_5"], True),
            "Brier score of the slide score": _fmt(d.get("brier")),
            "best any calibration can do: positives / negatives on their side":
                "-" if not d.get("best_split") else
                f"{_fmt(d['best_split']['positives_at_or_above'], True)} / {_fmt(d['best_split']['negatives_below'], True)}",
            "tiles per slide": f"{d['tiles_per_slide']:.1f}" if d["tiles_per_slide"] is not None else "-",
            "pipeline time, all slides": f"{d['pipeline_seconds']:.0f} s",
            "slides failed / without tissue": f"{d['errors']} / {d['empty']}",
        }

    rows = {p: row(doc["placements"][p]) for p in places}
    keys = list(next(iter(rows.values())))
    width = max(len(k) for k in keys)
    print(f"{'':<{width}}  " + "  ".join(f"{p:<24}" for p in places))
    for k in keys:
        print(f"{k:<{width}}  " + "  ".join(f"{rows[p][k]:<24}" for p in places))
    print()
    print(f"normal cells falsely suspicious: share of the cells of each class with their own tile whose tile has "
          f"suspicion >= {t} (coverage: share of the class's cells that have a tile)")
    classes = sorted({c for p in places for c in doc["placements"][p]["flag_rate_by_class"]})
    print(f"  {'class':<30}" + "".join(f"{p + ' rate':>22}{p + ' coverage':>16}" for p in places))
    for cls in classes:
        mark = " (planted)" if cls in doc["planted_classes"] else ""
        cells = []
        for p in places:
            d = doc["placements"][p]["flag_rate_by_class"].get(cls)
            cells.append(f"{_fmt(d['rate'], True) + ' (' + str(d['flagged']) + '/' + str(d['n']) + ')':>22}"
                         f"{_fmt(d['coverage'], True):>16}" if d else f"{'-':>22}{'-':>16}")
        print(f"  {cls + mark:<30}" + "".join(cells))
    print()
    print(f"runtime: {rt['wall_seconds']:.0f} s wall (synth {rt['synth_seconds']:.0f} s), {rt['cpus']} CPUs")
    if doc.get("calibration"):
        print()
        print("calibration (Platt, raw slide score -> p = 1 / (1 + exp(-(slope * raw + intercept)))):")
        for p, c in doc["calibration"].items():
            print(f"  {p}: {json.dumps(c)}")
    if doc.get("calibrated_checkpoint"):
        c = doc["calibrated_checkpoint"]
        print(f"written: {c['path']} (sha256 {c['sha256'][:12]}..., from {c['source_sha256'][:12]}...)")

if __name__ == "__main__":
    sys.exit(main())
