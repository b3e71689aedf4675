"""The per-slide pictures and GeoJSON: overlay, heatmap, gallery and QuPath detections.

Pure functions of arrays (no store access), kept apart from aggregate.py so that the
pictures can change without touching how a slide is scored.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from typing import Any

import numpy as np

__all__ = ["COLORMAP", "heatmap_rgba", "overlay_image", "overlay_png", "gallery_png", "png_bytes",
           "geojson_collection"]

#: perceptually uniform, readable in greyscale and by most colour-blind viewers
COLORMAP = "viridis"


# --------------------------------------------------------------------------- pictures


def _colormap():
    import matplotlib

    return matplotlib.colormaps[COLORMAP]


def heatmap_rgba(heat: np.ndarray) -> np.ndarray:
    """(rows, cols, 4) uint8 on the fixed 0..1 scale; cells without a tile are transparent."""
    rgba = (_colormap()(np.nan_to_num(np.clip(heat, 0, 1), nan=0.0)) * 255).round().astype(np.uint8)
    rgba[..., 3] = np.where(np.isfinite(heat), 255, 0)
    return rgba


def overlay_image(thumbnail: np.ndarray, mask: np.ndarray, heat: np.ndarray, grid_meta: dict,
                  downsample: float, alpha: float) -> np.ndarray:
    """The thumbnail with tile suspicions blended in where there is tissue and a scored tile."""
    h, w = thumbnail.shape[:2]
    sx, sy = (float(v) for v in grid_meta["stride"])
    ox, oy = (float(v) for v in grid_meta.get("origin", [0, 0]))
    rows, cols = heat.shape
    x0 = (np.arange(w) + 0.5) * downsample - ox
    y0 = (np.arange(h) + 0.5) * downsample - oy
    col = np.floor(x0 / sx).astype(np.int64)
    row = np.floor(y0 / sy).astype(np.int64)
    col_ok = (col >= 0) & (col < cols)
    row_ok = (row >= 0) & (row < rows)
    values = np.full((h, w), np.nan, dtype=np.float32)
    rr, cc = np.ix_(np.flatnonzero(row_ok), np.flatnonzero(col_ok))
    values[rr, cc] = heat[row[row_ok][:, None], col[col_ok][None, :]]
    if mask.shape == (h, w):
        values[~mask.astype(bool)] = np.nan
    coloured = _colormap()(np.nan_to_num(values, nan=0.0))[..., :3] * 255
    out = thumbnail[..., :3].astype(np.float32)
    paint = np.isfinite(values)
    out[paint] = (1 - alpha) * out[paint] + alpha * coloured[paint]
    return out.round().clip(0, 255).astype(np.uint8)


def _figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def overlay_png(image: np.ndarray, title: str) -> bytes:
    """The overlay with a colour bar on the fixed 0..1 suspicion scale."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    scale = 8.0 / max(h, w)
    fig = Figure(figsize=(max(w * scale, 2.5) + 1.4, max(h * scale, 2.5) + 0.6), dpi=100)
    ax = fig.add_axes((0.02, 0.02, 0.78, 0.9))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    cax = fig.add_axes((0.84, 0.1, 0.035, 0.75))
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=_colormap()), cax=cax)
    bar.set_label("tile suspicion (0-1)")
    return _figure_png(fig)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes: the fixed bitmap font
        return ImageFont.load_default()


def gallery_png(tiles: np.ndarray, scores: np.ndarray, coords: np.ndarray, labels: list[str],
                columns: int = 4) -> bytes:
    """The top tiles in a grid, each captioned with rank, suspicion, argmax class and level-0 x, y.

    Composed with Pillow (not matplotlib subplots, which cost about a second per slide).
    """
    from PIL import Image, ImageDraw

    n = len(tiles)
    side = int(tiles.shape[1]) if n else 128
    zoom = max(1, -(-96 // side))  # small tiles are enlarged (nearest) to stay legible
    cell = side * zoom
    caption, pad = 30, 6
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    canvas = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + caption + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    if n == 0:
        draw.text((pad, pad), "no tiles", fill="black", font=font)
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (cell + pad), pad + r * (cell + caption + pad)
        tile = Image.fromarray(np.ascontiguousarray(tiles[i][..., :3]))
        if zoom > 1:
            tile = tile.resize((cell, cell), Image.Resampling.NEAREST)
        draw.text((x0, y0), f"#{i + 1}  {float(scores[i]):.3f}  {labels[i]}", fill="black", font=font)
        draw.text((x0, y0 + 14), f"x {int(coords[i][0])}, y {int(coords[i][1])}", fill=(90, 90, 90), font=font)
        canvas.paste(tile, (x0, y0 + caption))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def png_bytes(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- GeoJSON


_CLASS_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                  (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def geojson_collection(coords: np.ndarray, probs: np.ndarray, suspicion: np.ndarray, class_names: list[str],
                       provenance: dict[str, Any]) -> dict[str, Any]:
    """QuPath-importable detections, one square per tile in level-0 pixels."""
    features = []
    argmax = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    namespace = uuid.UUID(hashlib.sha256(json.dumps(provenance.get("checkpoint_sha256", "")).encode()).hexdigest()[:32])
    for i in range(len(coords)):
        x, y, w, h = (int(v) for v in coords[i])
        name = class_names[int(argmax[i])]
        measurements = {f"prob_{c}": round(float(p), 6) for c, p in zip(class_names, probs[i])}
        measurements["suspicion"] = round(float(suspicion[i]), 6)
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(namespace, f"{provenance.get('slide_fingerprint')}:{i}")),
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
            "properties": {
                "objectType": "detection",
                "name": f"tile {i}",
                "classification": {"name": name, "color": list(_CLASS_COLOURS[int(argmax[i]) % len(_CLASS_COLOURS)])},
                "measurements": measurements,
                "isLocked": True,
            },
        })
    return {"type": "FeatureCollection", "metadata": provenance, "features": features}
