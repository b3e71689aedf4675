"""Aggregation by object for ``cells`` stores: object suspicion, the slide score over objects, an object
suspicion map on the thumbnail grid, and one QuPath detection per object.

An object's suspicion is the highest suspicion of its tiles (a group is as suspicious as its
worst part). The slide score is the configured statistic (top-k mean by default) over objects
instead of tiles, so a group covered by six tiles counts once and a cell cut by a tile border
cannot be counted twice. Pure functions of arrays; aggregate.py reads the store and writes.
"""

from __future__ import annotations

import functools
import json
import math
import uuid
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .outputs import class_colour, feature_namespace

__all__ = ["object_suspicion", "object_best_tile", "object_counts", "object_heatmap", "object_geojson",
           "calibrated", "calibration_for", "aggregate_objects"]



def object_suspicion(suspicion: np.ndarray, tile_object: np.ndarray, n_objects: int) -> np.ndarray:
    """(M,) highest tile suspicion of each object (0 for an object without a tile, which the tiler never makes)."""
    out = np.zeros(int(n_objects), np.float32)
    if len(suspicion):
        np.maximum.at(out, np.asarray(tile_object, np.int64), np.asarray(suspicion, np.float32))
    return out


def object_best_tile(suspicion: np.ndarray, tile_object: np.ndarray, n_objects: int) -> np.ndarray:
    """(M,) index of each object's most suspicious tile (-1 when it has none)."""
    best = np.full(int(n_objects), -1, np.int64)
    if len(suspicion):
        order = np.lexsort((-np.asarray(suspicion), np.asarray(tile_object)))  # by object, most suspicious first
        objs = np.asarray(tile_object)[order]
        first = np.ones(len(order), bool)
        first[1:] = objs[1:] != objs[:-1]
        best[objs[first]] = order[first]
    return best


def object_counts(obj_suspicion: np.ndarray, threshold: float, top_k: int) -> dict[str, Any]:
    """The object figures summary.json reports beside the slide score."""
    s = np.asarray(obj_suspicion, np.float64)
    n = int(s.size)
    k = min(top_k, n)
    return {
        "n_objects": n,
        "topk_mean": round(float(np.mean(np.partition(s, n - k)[n - k:])), 6) if n else None,
        "top_k": int(top_k),
        "above_threshold": int(np.sum(s > threshold)),
        "fraction_above": round(float(np.mean(s > threshold)), 6) if n else None,
        "threshold": float(threshold),
    }


def calibrated(raw: float | None, calibration: dict[str, Any]) -> float | None:
    """The logistic calibration of a raw slide score (None stays None)."""
    if raw is None:
        return None
    z = float(calibration["slope"]) * float(raw) + float(calibration["intercept"])
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def object_heatmap(centres: np.ndarray, obj_suspicion: np.ndarray, shape: tuple[int, int], downsample: float,
                   radius0: float) -> np.ndarray:
    """Object suspicion on the thumbnail grid: each object spreads its suspicion over a disc of
    ``radius0`` level-0 px (half a tile) around its centre, the highest value wins where discs
    meet; NaN where no object is near. A map of where the suspicious cells are, on the fixed 0-1 scale."""
    h, w = (int(v) for v in shape)
    heat = np.full((h, w), -1.0, np.float32)
    if len(centres):
        rows = np.clip((np.asarray(centres)[:, 1] / downsample).astype(np.int64), 0, h - 1)
        cols = np.clip((np.asarray(centres)[:, 0] / downsample).astype(np.int64), 0, w - 1)
        order = np.argsort(obj_suspicion, kind="stable")  # most suspicious written last
        heat[rows[order], cols[order]] = np.asarray(obj_suspicion, np.float32)[order]
        r = max(1.0, radius0 / downsample)
        k = int(math.ceil(r))
        yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
        heat = ndi.grey_dilation(heat, footprint=(xx * xx + yy * yy) <= r * r, mode="constant", cval=-1.0)
    heat[heat < 0] = np.nan
    return heat


def object_geojson(bbox: np.ndarray, centres: np.ndarray, area: np.ndarray, n_nuclei: np.ndarray,
                   obj_suspicion: np.ndarray, best_probs: np.ndarray, n_tiles: np.ndarray, class_names: list[str],
                   provenance: dict[str, Any]) -> dict[str, Any]:
    """QuPath-importable detections, one box per object in level-0 px, with its centre and measurements
    (suspicion, class probabilities of its most suspicious tile, area in um^2, nuclei, tiles);
    classification by the argmax of those probabilities."""
    features = []
    namespace = feature_namespace(provenance)
    for i in range(len(bbox)):
        x, y, w, h = (int(v) for v in bbox[i])
        arg = int(np.argmax(best_probs[i])) if len(class_names) else 0
        measurements = {f"prob_{c}": round(float(p), 6) for c, p in zip(class_names, best_probs[i])}
        measurements.update({"suspicion": round(float(obj_suspicion[i]), 6), "area_um2": round(float(area[i]), 2),
                             "n_nuclei": int(n_nuclei[i]), "n_tiles": int(n_tiles[i]),
                             "centre_x": round(float(centres[i][0]), 1), "centre_y": round(float(centres[i][1]), 1)})
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(namespace, f"{provenance.get('slide_fingerprint')}:object:{i}")),
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
            "properties": {
                "objectType": "detection",
                "name": f"object {i}" + (" (group)" if int(n_nuclei[i]) > 1 else ""),
                "classification": {"name": class_names[arg], "color": class_colour(class_names[arg])},
                "measurements": measurements,
                "isLocked": True,
            },
        })
    return {"type": "FeatureCollection", "metadata": provenance, "features": features}


def calibration_for(checkpoint_sha256: str | None, checkpoint_metadata: dict | None, placement: str,
                    method: str, top_k: int) -> dict[str, Any] | None:
    """The calibration that applies to this slide score, or None (then the score is reported raw).

    A checkpoint may carry its own under metadata ``calibration`` (``{placement: {"slope", "intercept",
    "method", "top_k"}}``, fitted by ``benchmarks/eval_triage.py --calibrate`` on tuning smears so
    that 0.5 is the decision point; the bundled demo student carries one). It applies only to the
    statistic it was fitted for."""
    table = None
    meta = checkpoint_metadata or {}
    own = meta.get("calibration")
    if isinstance(own, str):
        try:
            own = json.loads(own)
        except json.JSONDecodeError:
            own = None
    if isinstance(own, dict):
        table = own
    entry = (table or {}).get(placement)
    if not isinstance(entry, dict) or entry.get("method") != method or int(entry.get("top_k", -1)) != int(top_k):
        return None
    return entry


def aggregate_objects(group, suspicion: np.ndarray, probs: np.ndarray, class_names: list[str], config,
                      provenance: dict[str, Any], slide_score) -> dict[str, Any] | None:
    """Everything aggregate_store needs for a ``cells`` store (None for a grid store): object
    suspicions, the raw slide score over objects, the summary block, the object heatmap on the
    thumbnail grid (with its grid description), the GeoJSON collection (``geojson``: a function that
    builds it) and the gallery tiles."""
    from ..tiling import read_objects

    found = read_objects(group)
    if found is None:
        return None
    objects, tile_object = found
    m = len(objects)
    obj_s = object_suspicion(suspicion, tile_object, m)
    best = object_best_tile(suspicion, tile_object, m)
    n_tiles = np.bincount(np.asarray(tile_object, np.int64), minlength=m)
    thumb = group["thumbnail"]
    downsample = float(thumb.attrs.get("downsample", 1.0))
    tile0 = float(np.median(np.asarray(group["coords"][:, 2]))) if len(suspicion) else downsample
    # the thumbnail grid, or a quarter tile (about a cell) where that is coarser: a 60k-px slide's
    # 7,500 px thumbnail grid would cost gigabytes in the colour-mapped pictures
    step = max(downsample, tile0 / 4.0)
    shape = (math.ceil(thumb.shape[0] * downsample / step), math.ceil(thumb.shape[1] * downsample / step))
    heat = object_heatmap(objects.centre, obj_s, shape, step, tile0 / 2.0)
    heat_meta = {"origin": [0, 0], "stride": [step, step], "shape": list(heat.shape)}
    best_probs = probs[np.maximum(best, 0)] if m else np.zeros((0, len(class_names)), np.float32)
    order = np.argsort(-obj_s, kind="stable")[: config.gallery_k]
    top = [{"rank": r + 1, "object": int(i), "suspicion": round(float(obj_s[i]), 6), "tile": int(best[i]),
            "x": int(objects.bbox[i][0]), "y": int(objects.bbox[i][1]), "w": int(objects.bbox[i][2]),
            "h": int(objects.bbox[i][3]), "n_nuclei": int(objects.n_nuclei[i]),
            "argmax": class_names[int(np.argmax(best_probs[i]))]} for r, i in enumerate(order)]
    return {
        "suspicion": obj_s,
        "raw_score": slide_score(obj_s, config),
        "summary": {**object_counts(obj_s, config.threshold, config.top_k),
                    "singles": int(np.sum(objects.n_nuclei <= 1)), "groups": int(np.sum(objects.n_nuclei > 1)),
                    "top_objects": top,
                    # heatmap.npy of a cells store: cells of `stride` level-0 px (thumbnail px or a quarter tile)
                    "heatmap_grid": heat_meta},
        "heat": heat, "heat_grid_meta": heat_meta,
        # built when it is written, after overlay.png: a 60k-px smear's 24k objects are ~70 MB of dicts
        "geojson": functools.partial(object_geojson, objects.bbox, objects.centre, objects.area, objects.n_nuclei,
                                     obj_s, best_probs, n_tiles, class_names, provenance),
        "gallery_tiles": best[order],
    }
