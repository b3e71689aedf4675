"""Turn stored tile probabilities into a slide score, a heatmap, an overlay, a gallery and GeoJSON.

Tile suspicion is the summed probability of the checkpoint's suspicious classes. The slide
score is one configurable statistic of the tile suspicions (top-k mean by default), written
with its settings. Everything is derived from the store alone; outputs are written atomically
and an unchanged aggregation (same scores, same settings) is a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gzip
import hashlib
import io
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata as _importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from wsi_contracts import tilestore as tile_store
from wsi_contracts.tilestore import ScoreMeta, StoreMeta
from ..errors import OptionError, OutputError, StoreError
from ..names import printable
from ..progress import Counter, Progress
from .objects import aggregate_objects, calibrated, calibration_for
from .outputs import gallery_png, geojson_collection, heatmap_picture, overlay_picture
from ..scoring import ood_summary
from ..scoring import read_ood, read_scores, scores_key

__all__ = ['METHODS', 'SUMMARY_NAME', 'VERSION_PACKAGES', 'AggregateConfig', 'AggregateResult', 'tile_suspicion', 'slide_score', 'heatmap_grid', 'package_versions', 'write_atomic', 'output_names', 'read_summary', 'aggregate_store']

METHODS = ("topk_mean", "quantile", "fraction_above")
SUMMARY_NAME = "summary.json"
VERSION_PACKAGES = ("numpy", "torch", "timm", "safetensors", "zarr", "dask", "distributed", "openslide-python",
                    "openslide-bin", "tifffile", "imagecodecs", "scikit-image", "matplotlib")


@dataclass(frozen=True)
class AggregateConfig:
    """How tile suspicions become a slide score and the pictures. All of it is recorded in summary.json."""

    method: str = "topk_mean"  # topk_mean | quantile | fraction_above
    # Tiles averaged by topk_mean. 3, chosen on 40 tuning smears built from training-pool cells
    # (slide AUC: top-1 0.958, top-3 0.950, top-5 0.917, top-10 0.855); few suspicious cells
    # should be able to raise a slide, a single odd tile should not.
    top_k: int = 3
    quantile: float = 0.95  # for method=quantile
    threshold: float = 0.5  # for method=fraction_above (and the reported count above it)
    gallery_k: int = 16  # tiles shown in gallery.png and listed as top tiles
    overlay_alpha: float = 0.6
    geojson_gzip: bool = False

    def validated(self) -> "AggregateConfig":
        if self.method not in METHODS:
            raise OptionError("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.top_k < 1:
            raise OptionError("top_k", f"must be >= 1, got {self.top_k}")
        if self.gallery_k < 0:
            raise OptionError("gallery_k", f"must be >= 0, got {self.gallery_k}")
        for name in ("quantile", "threshold", "overlay_alpha"):
            if not 0 <= getattr(self, name) <= 1:
                raise OptionError(name, f"must be in [0, 1], got {getattr(self, name)}")
        return self

    def score_settings(self) -> dict[str, Any]:
        """Only the settings that shape the slide score (for the summary and the report)."""
        if self.method == "topk_mean":
            return {"top_k": self.top_k}
        if self.method == "quantile":
            return {"quantile": self.quantile}
        return {"threshold": self.threshold}


@dataclass
class AggregateResult:
    out_dir: Path
    summary: dict[str, Any]
    reused: bool
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        return self.summary["score"]["value"]


# --------------------------------------------------------------------------- numbers


def tile_suspicion(probs: np.ndarray, class_names: Sequence[str], suspicious: Sequence[str]) -> np.ndarray:
    """Summed probability of the suspicious classes, (N,) float32 in [0, 1]."""
    idx = [list(class_names).index(c) for c in suspicious]
    return np.clip(np.asarray(probs, dtype=np.float32)[:, idx].sum(axis=1), 0.0, 1.0)


def slide_score(suspicion: np.ndarray, config: AggregateConfig) -> float | None:
    """The configured statistic of the tile suspicions; None when there is no tile."""
    s = np.asarray(suspicion, dtype=np.float64)
    if s.size == 0:
        return None
    if config.method == "topk_mean":
        k = min(config.top_k, s.size)
        return float(np.mean(np.partition(s, s.size - k)[s.size - k:]))
    if config.method == "quantile":
        return float(np.quantile(s, config.quantile))
    return float(np.mean(s > config.threshold))


def heatmap_grid(values: np.ndarray, grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Tile values on the tile grid (rows, cols), NaN where no tile was kept."""
    heat = np.full(tuple(int(v) for v in shape), np.nan, dtype=np.float32)
    if len(values):
        heat[grid[:, 0], grid[:, 1]] = values
    return heat


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"wsi-triage": __version__, "python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = _importlib_metadata.version(name)
        except _importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --------------------------------------------------------------------------- writing


def write_atomic(path: Path, data: bytes) -> Path:
    """Write via a temporary file in the same directory and ``os.replace``, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # a read-only or vanished folder: the one-line error wins
            tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write output ({exc.strerror or exc})") from None
    return path


def _save_npy(heat: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, heat, allow_pickle=False)
    return buf.getvalue()


def output_names(stem: str, config: AggregateConfig) -> dict[str, str]:
    return {
        "summary": SUMMARY_NAME, "overlay": "overlay.png", "heatmap_png": "heatmap.png",
        "heatmap_npy": "heatmap.npy", "gallery": "gallery.png",
        "geojson": f"{stem}.geojson" + (".gz" if config.geojson_gzip else ""),
    }


def _aggregation_key(store_meta: StoreMeta, score_meta: ScoreMeta, config: AggregateConfig) -> str:
    payload = {
        "slide_fingerprint": store_meta.slide_fingerprint,
        "tiler_config_hash": store_meta.tiler_config_hash,
        "store_created": store_meta.created,
        "checkpoint_sha256": score_meta.checkpoint_sha256,
        "scored": score_meta.scored,
        "config": dataclasses.asdict(config),
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_summary(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / SUMMARY_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def aggregate_store(
    store_path: str | Path,
    out_dir: str | Path,
    config: AggregateConfig = AggregateConfig(),
    *,
    checkpoint_sha256: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> AggregateResult:
    """Write summary.json, heatmap.npy/.png, overlay.png, gallery.png and ``<stem>.geojson[.gz]`` into ``out_dir``.

    ``checkpoint_sha256`` picks whose scores to use (default: the store's only or latest complete
    scores). Reads only the store. ``progress("aggregating", files_written, n_files)``
    (:mod:`wsi_pipeline.progress`) reports the outputs.
    """
    config = config.validated()
    counter = Counter(progress, "aggregating")
    plan = _plan_aggregation(Path(store_path), Path(out_dir), config, checkpoint_sha256)
    previous = None if force else _up_to_date(plan)
    if previous is not None:
        counter.plan(len(plan.paths), len(plan.paths))
        return AggregateResult(plan.out_dir, previous, True, plan.paths)
    _make_out_dir(plan.out_dir)
    ood_entry = _check_inputs(plan)
    counter.plan(len(plan.paths))
    scored = _score_slide(plan, config)
    summary = _summary(plan, config, scored, ood_entry)
    _write_outputs(plan, config, scored, summary, counter)
    return AggregateResult(plan.out_dir, summary, False, plan.paths)


@dataclass(frozen=True)
class _AggregatePlan:
    """One aggregation: the store, its scores, and where the outputs go."""

    store: Path
    out_dir: Path
    stem: str
    group: Any  # the store's zarr group
    meta: StoreMeta
    probs: np.ndarray  # (N, K)
    attrs: ScoreMeta  # the score group's attributes
    names: dict[str, str]  # output_names
    paths: dict[str, Path]
    key: str  # _aggregation_key: same key, same outputs


def _plan_aggregation(store_path: Path, out_dir: Path, config: AggregateConfig,
                      checkpoint_sha256: str | None) -> _AggregatePlan:
    group = tile_store.require_complete(store_path)
    meta = tile_store.read_store_meta(group)
    probs, attrs = read_scores(group, checkpoint_sha256)
    stem = store_path.name[:-5] if store_path.name.endswith(".zarr") else store_path.name
    names = output_names(stem, config)
    return _AggregatePlan(store_path, out_dir, stem, group, meta, probs, attrs, names,
                          {k: out_dir / v for k, v in names.items()}, _aggregation_key(meta, attrs, config))


def _up_to_date(plan: _AggregatePlan) -> dict[str, Any] | None:
    """The previous summary when it was made from the same scores and settings and every output is there."""
    previous = read_summary(plan.out_dir)
    if previous and previous.get("aggregation_key") == plan.key and all(p.exists() for p in plan.paths.values()):
        return previous
    return None


def _make_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create output directory ({exc.strerror or exc})") from None


def _check_inputs(plan: _AggregatePlan) -> dict[str, Any] | None:
    """Refuse scores (or OOD distances) that do not cover the tiles, and a store without its grid; the
    slide's OOD entry for summary.json (None: the checkpoint has no OOD statistics)."""
    n, sha = plan.meta.n_tiles, plan.attrs.checkpoint_sha256
    if plan.probs.shape != (n, len(plan.attrs.class_names)) or (n and not np.isfinite(plan.probs).all()):
        raise StoreError(f"{plan.store}: scores {scores_key(sha)} are incomplete or "
                         "inconsistent with the tiles; run `wsi-triage score` again")
    ood = read_ood(plan.group, plan.attrs)  # (distances, threshold) or None: no OOD statistics in the checkpoint
    if ood is not None and (ood[0].shape != (n,) or (n and not np.isfinite(ood[0]).all())):
        raise StoreError(f"{plan.store}: scores {scores_key(sha)}/ood are incomplete or "
                         "inconsistent with the tiles; run `wsi-triage score` again")
    if plan.meta.grid is None:
        raise StoreError(f"{plan.store}: tile store attribute 'grid' is missing (damaged store); delete it and "
                         "rerun `wsi-triage run` on the slide")
    return ood_summary(*ood) if ood is not None else None


@dataclass(frozen=True)
class _SlideScore:
    """The numbers and maps of one aggregation, before anything is written."""

    suspicion: np.ndarray  # (N,) per tile
    argmax: np.ndarray  # (N,) most probable class per tile
    coords: np.ndarray  # (N, 4)
    score: float | None  # calibrated when the checkpoint has a calibration
    raw: float | None
    calibration: dict[str, Any] | None
    heat: np.ndarray
    heat_grid_meta: dict[str, Any]
    gallery: np.ndarray  # tile indices shown in gallery.png
    top_tiles: list[dict[str, Any]]
    by_object: dict[str, Any] | None  # a "cells" store: aggregate_objects' result
    provenance: dict[str, Any]


def _score_slide(plan: _AggregatePlan, config: AggregateConfig) -> _SlideScore:
    group, meta, probs, attrs = plan.group, plan.meta, plan.probs, plan.attrs
    class_names = list(attrs.class_names)
    n = meta.n_tiles
    coords = np.asarray(group["coords"][:]) if n else np.zeros((0, 4), dtype=np.int64)
    grid = np.asarray(group["grid"][:]) if n else np.zeros((0, 2), dtype=np.int32)
    suspicion = tile_suspicion(probs, class_names, list(attrs.suspicious_classes))
    score = slide_score(suspicion, config)
    heat = heatmap_grid(suspicion, grid, meta.grid.shape)
    order = np.argsort(-suspicion, kind="stable")[: config.gallery_k]
    argmax = probs.argmax(axis=1) if n else np.zeros(0, dtype=int)
    top_tiles = [{
        "rank": r + 1, "index": int(i), "suspicion": round(float(suspicion[i]), 6),
        "x": int(coords[i][0]), "y": int(coords[i][1]), "w": int(coords[i][2]), "h": int(coords[i][3]),
        "row": int(grid[i][0]), "col": int(grid[i][1]), "argmax": class_names[int(argmax[i])],
    } for r, i in enumerate(order)]
    provenance = _provenance(plan)
    # a "cells" store is aggregated by object (aggregation/objects.py): score, map, GeoJSON and gallery
    by_object = aggregate_objects(group, suspicion, probs, class_names, config, provenance, slide_score) if n else None
    raw = by_object["raw_score"] if by_object else score
    calibration = calibration_for(attrs.checkpoint_sha256, attrs.checkpoint_metadata,
                                  "cells" if by_object else "grid", config.method, config.top_k)
    score = calibrated(raw, calibration) if calibration else raw
    heat_grid_meta = meta.grid.as_dict()
    if by_object:
        heat, heat_grid_meta = by_object["heat"], by_object["heat_grid_meta"]
        order = by_object["gallery_tiles"]
    return _SlideScore(suspicion, argmax, coords, score, raw, calibration, heat, heat_grid_meta,
                       np.asarray(order, dtype=np.int64), top_tiles, by_object, provenance)


def _provenance(plan: _AggregatePlan) -> dict[str, Any]:
    meta, attrs = plan.meta, plan.attrs
    return {
        "slide_path": meta.slide_path,
        "slide_fingerprint": meta.slide_fingerprint,
        "slide_mpp": meta.slide_mpp.as_dict() if meta.slide_mpp else None,
        "tiler_config": meta.tiler_config,
        "tiler_config_hash": meta.tiler_config_hash,
        "store": str(plan.store.resolve()),
        "scores": attrs.key,
        "checkpoint_sha256": attrs.checkpoint_sha256,
        "checkpoint_path": attrs.checkpoint_path,
        "checkpoint_metadata": attrs.checkpoint_metadata,
        "precision": attrs.precision,
        "device": attrs.device,
        "versions": package_versions(),
    }


def _summary(plan: _AggregatePlan, config: AggregateConfig, s: _SlideScore,
             ood_entry: dict[str, Any] | None) -> dict[str, Any]:
    """summary.json (docs/contracts.md): the score with its settings, the tiles, OOD, provenance."""
    n = plan.meta.n_tiles
    class_names = list(plan.attrs.class_names)
    by_object = s.by_object
    return {
        "slide": plan.stem,
        # ok | empty (no tile) | out_of_domain (most tiles unlike the checkpoint's training data: the score
        # is recorded but is no suspicion; wsi_pipeline.scoring.ood)
        "status": "empty" if not n else ("out_of_domain" if ood_entry and ood_entry["out_of_domain"] else "ok"),
        "score": {"value": None if s.score is None else round(s.score, 6), "method": config.method,
                  "settings": config.score_settings(), "over": "objects" if by_object else "tiles",
                  "raw": None if s.raw is None else round(s.raw, 6), "calibration": s.calibration},
        "tiles": {"n_tiles": n, "n_grid": plan.meta.n_grid,
                  "above_threshold": int(np.sum(s.suspicion > config.threshold)),
                  "threshold": config.threshold,
                  "mean_suspicion": round(float(s.suspicion.mean()), 6) if n else None},
        "empty_reason": plan.meta.empty_reason,
        "ood": ood_entry,
        "class_names": class_names,
        "suspicious_classes": list(plan.attrs.suspicious_classes),
        "class_fractions": {c: round(float(np.mean(s.argmax == j)), 6) if n else 0.0
                            for j, c in enumerate(class_names)},
        "top_tiles": s.top_tiles,
        **({"objects": by_object["summary"]} if by_object else {}),
        "aggregate_config": dataclasses.asdict(config),
        "aggregation_key": plan.key,
        "provenance": s.provenance,
        "outputs": plan.names,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_outputs(plan: _AggregatePlan, config: AggregateConfig, s: _SlideScore, summary: dict[str, Any],
                   counter: Counter) -> None:
    """Every picture and the GeoJSON, each atomically, then summary.json last (it marks completion)."""
    group = plan.group

    def write(name: str, data: bytes) -> None:
        write_atomic(plan.paths[name], data)
        counter.add(1)

    class_names = list(plan.attrs.class_names)
    thumbnail, mask = group["thumbnail"], group["mask"]  # zarr arrays, read in bands by overlay_picture
    downsample = float(group["thumbnail"].attrs.get("downsample", 1.0))
    title = f"{printable(plan.stem)}: {config.method} = " + ("n/a" if s.score is None else f"{s.score:.3f}")  # hostile names
    write("overlay", overlay_picture(thumbnail, mask, s.heat, s.heat_grid_meta, downsample, config.overlay_alpha,
                                     title, unit="object" if s.by_object else "tile"))
    write("heatmap_png", heatmap_picture(s.heat, title))
    write("heatmap_npy", _save_npy(s.heat))
    top = s.gallery
    tiles = tile_store.read_tiles(group, top) if len(top) else np.zeros((0, 1, 1, 3))  # checked, never fill
    write("gallery", gallery_png(tiles, s.suspicion[top], s.coords[top], [class_names[int(s.argmax[i])] for i in top]))
    collection = s.by_object["geojson"]() if s.by_object else geojson_collection(
        s.coords, plan.probs, s.suspicion, class_names, s.provenance, bounds=plan.meta.slide_dimensions)
    data = json.dumps(collection, separators=(",", ":")).encode()
    write("geojson", gzip.compress(data, mtime=0) if config.geojson_gzip else data)
    write("summary", json.dumps(summary, indent=2, default=str).encode())  # last: marks completion
