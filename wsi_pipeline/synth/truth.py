"""Ground truth of a synthetic smear: where every cell, region and artefact went.

Written beside the slide as ``<stem>.truth.json`` (one cell per line) and ``<stem>.truth.geojson``
(rectangles QuPath can import), both from the document ``truth_document`` builds from the layout.
Part of ``wsi_pipeline.synth``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import OutputError
from ..aggregation import class_colour
from .cells import CellPool
from .config import SynthConfig
from .layout import BLOCK, Layout

__all__ = ['TRUTH_FORMAT', 'RENDERER_VERSION', 'truth_paths', 'write_truth', 'truth_document', 'cell_box_mask',
           'made_with']

TRUTH_FORMAT = "wsi-triage-synth-truth"
#: Raised whenever the same :class:`SynthConfig` draws different pixels, so that a benchmark reusing a
#: smear made earlier (``made_with``) makes it anew instead of measuring an old rendering. 2: one white
#: balance for glass and cells (the cell images' own) instead of neutral glass.
RENDERER_VERSION = 2
#: settings that do not change a single pixel (JPEG encoder threads)
_NOT_DRAWN = ("workers",)


def truth_paths(out: str | Path) -> tuple[Path, Path]:
    """Where the ground truth of slide ``out`` goes: ``<stem>.truth.json`` and ``.truth.geojson``."""
    out = Path(out)
    name = out.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(name + ".truth.json"), out.with_name(name + ".truth.geojson")


def cell_box_mask(truth: dict, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """(h, w) bool: the boxes of the truth's cells on an image ``downsample`` times smaller than level 0
    (e.g. the tiler's overview), each box widened to whole pixels."""
    h, w = (int(v) for v in shape)
    mask = np.zeros((h, w), bool)
    for c in truth["cells"]:
        x, y, bw, bh = (np.array(c["bbox"]) / downsample).astype(int)
        mask[max(0, y):y + bh + 1, max(0, x):x + bw + 1] = True
    return mask


def write_truth(doc: dict, json_path: Path, geojson_path: Path) -> None:
    """Write the ground truth document as JSON and as GeoJSON (each via a ``.partial`` file)."""
    _write_text(json_path, _dump_truth(doc))
    _write_text(geojson_path, _geojson_features(doc))


def _write_text(path: Path, text: str | Iterable[str]) -> None:
    try:
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "w", encoding="utf-8") as fh:
            if isinstance(text, str):
                fh.write(text)
            else:
                fh.writelines(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the ground truth ({exc.strerror or exc})") from None


def truth_document(out: Path, cfg: SynthConfig, pool: CellPool, layout: Layout,
                   sizes: list[tuple[int, int]]) -> dict:
    """The ground truth of slide ``out`` once its layout is complete (all blocks laid out)."""
    rows = sorted(layout.truth, key=lambda r: r[:8])
    cells = []
    by_class: dict[str, int] = {}
    groups: dict[int, list[int]] = {}
    for y, x, w, h, image, susp, region, blurred, nucleus, group in rows:
        cls = pool.classes[pool.labels[image]]
        by_class[cls] = by_class.get(cls, 0) + 1
        if group >= 0:
            box = groups.setdefault(group, [x, y, x + w, y + h, 0])
            box[:4] = [min(box[0], x), min(box[1], y), max(box[2], x + w), max(box[3], y + h)]
            box[4] += 1
        cells.append({"class": cls, "bbox": [x, y, w, h], "suspicious": susp,
                      "source": pool.relpaths[image], "region": region if region >= 0 else None,
                      "blurred": blurred, "nucleus": list(nucleus) if nucleus is not None else None,
                      "group": group if group >= 0 else None})
    n_susp = sum(c["suspicious"] for c in cells)
    regions = []
    for ri, reg in enumerate(layout.regions):
        inside = [c for c in cells if c["region"] == ri]
        regions.append({"bbox": [reg.x, reg.y, reg.w, reg.h], "n_cells": len(inside),
                        "n_suspicious": sum(c["suspicious"] for c in inside)})
    listed = cfg.cell_list
    config = _config_dict(cfg)
    return {
        "format": TRUTH_FORMAT,
        "format_version": 1,
        "renderer_version": RENDERER_VERSION,
        "slide": out.name,
        "label": "positive" if n_susp else "negative",
        "width": cfg.width,
        "height": cfg.height,
        "mpp": cfg.mpp,
        "seed": cfg.seed,
        "stain": cfg.stain,
        "levels": [list(s) for s in sizes],
        "config": config,
        "cells_source": {
            "root": str(pool.root),
            "shipped": cfg.cells is None,
            "list": cfg.cell_list_name,
            "list_sha256": _list_digest(listed),
            "n_images": len(pool.relpaths),
            "classes": list(pool.classes),
            "cells_mpp": cfg.cells_mpp,
        },
        "suspicious_classes": list(layout.suspicious_classes),
        "background_classes": list(layout.background_classes),
        "fraction": cfg.fraction,
        "planted_regions": regions,
        # cohesive cell groups (the layout's clusters): level-0 bbox [x, y, w, h] of their cells
        "groups": [{"id": gid, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "n_cells": b[4]}
                   for gid, b in sorted(groups.items())],
        "artifacts": {
            "pen": {"bbox": layout.pen_bbox, "ink": layout.pen_ink_name,
                    "ink_transmittance": [round(float(v), 3) for v in layout.pen_ink], "path": layout.pen_line,
                    "mask": layout.pen_truth()},
            "blur": {"bbox": layout.blur_bbox, "sigma_px": round(layout.blur_sigma, 2)},
        },
        "counts": {"cells": len(cells), "suspicious": n_susp, "by_class": dict(sorted(by_class.items())),
                   "red_cells": layout.n_red, "debris": layout.n_debris},
        "glass_rgb": [round(float(v), 2) for v in layout.glass],
        "empty_fields": _empty_fields(layout),
        "debris": sorted(layout.debris_boxes, key=lambda b: (b[1], b[0])),
        "cells": cells,
    }


def _empty_fields(layout: Layout) -> list[list[int]]:
    """Bare-glass rectangles [x, y, w, h]: runs of layout blocks in a block row that no cell
    reaches (debris and the pen mark may lie there; they are listed on their own)."""
    cfg = layout.cfg
    out = []
    for bi in range(layout.nby):
        free = np.flatnonzero(~layout.occupied[bi])
        if not free.size:
            continue
        starts = np.flatnonzero(np.diff(free, prepend=-2) != 1)
        ends = np.append(starts[1:], free.size) - 1
        y0 = bi * BLOCK
        h = min(BLOCK, cfg.height - y0)
        for a, b in zip(free[starts].tolist(), free[ends].tolist()):
            x0 = a * BLOCK
            out.append([x0, y0, min((b + 1) * BLOCK, cfg.width) - x0, h])
    return out


def _dump_truth(doc: dict) -> str:
    """JSON with one cell per line (readable and diff-friendly even for large slides)."""
    head = {k: v for k, v in doc.items() if k not in ("cells", "debris", "empty_fields")}
    head["empty_fields"] = "@@EMPTY@@"
    head["debris"] = "@@DEBRIS@@"
    pen = head["artifacts"]["pen"]
    if "mask" in pen:  # the stroke's runs on one line
        head["artifacts"] = {**head["artifacts"], "pen": {**pen, "mask": {**pen["mask"], "runs": "@@RUNS@@"}}}
    text = json.dumps(head, indent=1)[:-2].replace('"@@DEBRIS@@"', json.dumps(doc["debris"], separators=(",", ":")))
    text = text.replace('"@@EMPTY@@"', json.dumps(doc["empty_fields"], separators=(",", ":")))
    if "mask" in pen:
        text = text.replace('"@@RUNS@@"', json.dumps(pen["mask"]["runs"], separators=(",", ":")))
    lines = ",\n  ".join(json.dumps(c, separators=(",", ":")) for c in doc["cells"])
    return text + ',\n "cells": [\n  ' + lines + "\n ]\n}\n"


def _geojson_features(doc: dict) -> Iterator[str]:
    """QuPath-importable GeoJSON, written piece by piece: a rectangle per cell, the planted
    regions, the pen mark and the blurred patch (each an annotation with a classification)."""
    names = sorted(set(doc["cells_source"]["classes"]))
    colours = {n: class_colour(n) for n in names}  # the results' GeoJSON uses the same table

    def feature(bbox, props) -> str:
        x, y, w, h = bbox
        geom = {"type": "Polygon", "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]}
        return json.dumps({"type": "Feature", "geometry": geom, "properties": props}, separators=(",", ":"))

    def items() -> Iterator[str]:
        for c in doc["cells"]:
            yield feature(c["bbox"], {"objectType": "annotation",
                                      "classification": {"name": c["class"], "color": colours[c["class"]]},
                                      "suspicious": c["suspicious"], "source": c["source"]})
        for i, reg in enumerate(doc["planted_regions"]):
            yield feature(reg["bbox"], {"objectType": "annotation", "name": f"planted region {i}",
                                        "classification": {"name": "Planted region",
                                                           "color": class_colour("Planted region")},
                                        "n_suspicious": reg["n_suspicious"]})
        for name, bbox in (("Pen mark", doc["artifacts"]["pen"]["bbox"]), ("Blurred patch", doc["artifacts"]["blur"]["bbox"])):
            yield feature(bbox, {"objectType": "annotation", "classification": {"name": name, "color": class_colour(name)}})

    yield '{"type":"FeatureCollection","features":[\n'
    for i, item in enumerate(items()):
        yield ("," if i else "") + item + "\n"
    yield "]}\n"


def _list_digest(listed: Iterable[str] | None) -> str | None:
    return hashlib.sha256("\n".join(sorted(listed)).encode()).hexdigest() if listed else None


def _config_dict(cfg: SynthConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "cell_list"}


def made_with(truth_json: str | Path, cfg: SynthConfig) -> bool:
    """Whether the smear whose ground truth is ``truth_json`` was drawn from ``cfg`` by this renderer
    (same settings, same cell list, same ``RENDERER_VERSION``): only then may it be reused instead of
    made anew. A missing or unreadable file answers False."""
    try:
        doc = json.loads(Path(truth_json).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(doc, dict) or doc.get("renderer_version") != RENDERER_VERSION:
        return False
    want = _config_dict(cfg)
    have = doc.get("config") or {}
    if any(have.get(k) != _jsonable(v) for k, v in want.items() if k not in _NOT_DRAWN):
        return False
    return (doc.get("cells_source") or {}).get("list_sha256") == _list_digest(cfg.cell_list)


def _jsonable(value):
    """``value`` as it reads back from the truth JSON (tuples become lists)."""
    return json.loads(json.dumps(value))
