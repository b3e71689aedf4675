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

__all__ = ["feature_namespace", "COLORMAP", "OVERLAY_FLOOR", "heatmap_rgba", "heatmap_picture", "tile_values", "mask_outline",
           "overlay_image", "overlay_scale", "overlay_picture", "overlay_png", "gallery_png", "png_bytes",
           "CLASS_COLOURS", "class_colour", "geojson_collection"]

#: perceptually uniform, readable in greyscale and by most colour-blind viewers
COLORMAP = "viridis"


# --------------------------------------------------------------------------- pictures


def _colormap():
    import matplotlib

    return matplotlib.colormaps[COLORMAP]


def heatmap_rgba(heat: np.ndarray, band_rows: int = 256) -> np.ndarray:
    """(rows, cols, 4) uint8 on the fixed 0..1 scale; cells without a tile are transparent.

    Colour-mapped ``band_rows`` rows at a time (the colormap's float64 RGBA of a whole 60k-px smear's
    object map is ~0.2 GB); every cell's colour is its own, whatever the band height."""
    rgba = np.empty(tuple(heat.shape) + (4,), np.uint8)
    step = max(1, int(band_rows))
    for r0 in range(0, heat.shape[0], step):
        part = heat[r0:r0 + step]
        rgba[r0:r0 + len(part)] = (_colormap()(np.nan_to_num(np.clip(part, 0, 1), nan=0.0)) * 255).round().astype(np.uint8)
        rgba[r0:r0 + len(part), ..., 3] = np.where(np.isfinite(part), 255, 0)
    return rgba


OVERLAY_FLOOR = 0.2  # tiles below this suspicion are not drawn on overlay.png
OVERLAY_MIN_SIDE = 1600  # overlay.png's picture is enlarged to at least this many px on its long side ...
OVERLAY_MAX_SIDE = 2400  # ... and reduced to at most this many
MASK_OUTLINE_RGB = (40, 40, 40)
MASK_OUTLINE_OPACITY = 0.6


def tile_values(shape: tuple[int, int], heat: np.ndarray, grid_meta: dict, downsample: float, *,
                row0: int = 0) -> np.ndarray:
    """Each pixel of a (h, w) picture of the slide (``downsample`` level-0 px per px) gets its tile's value, NaN off the grid.

    ``row0``: the picture is the band of rows ``row0 .. row0 + h`` of a taller one (same values as its rows)."""
    h, w = shape
    sx, sy = (float(v) for v in grid_meta["stride"])
    ox, oy = (float(v) for v in grid_meta.get("origin", [0, 0]))
    rows, cols = heat.shape
    col = np.floor(((np.arange(w) + 0.5) * downsample - ox) / sx).astype(np.int64)
    row = np.floor(((np.arange(row0, row0 + h) + 0.5) * downsample - oy) / sy).astype(np.int64)
    col_ok = (col >= 0) & (col < cols)
    row_ok = (row >= 0) & (row < rows)
    values = np.full((h, w), np.nan, dtype=np.float32)
    rr, cc = np.ix_(np.flatnonzero(row_ok), np.flatnonzero(col_ok))
    values[rr, cc] = heat[row[row_ok][:, None], col[col_ok][None, :]]
    return values


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The one-pixel inner rim of the foreground mask."""
    from scipy import ndimage

    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


#: overlay_image works on bands of this many rows: its float64 colour planes of a 2,400 px overlay
#: cost ~0.5 GB at once, the peak of a 60k-px slide's whole run
OVERLAY_BAND_ROWS = 128


def overlay_image(thumbnail: np.ndarray, mask: np.ndarray, heat: np.ndarray, grid_meta: dict,
                  downsample: float, alpha: float, floor: float = OVERLAY_FLOOR, *,
                  band_rows: int = OVERLAY_BAND_ROWS) -> np.ndarray:
    """The thumbnail with each scored tile tinted on the fixed 0-1 scale, opacity ``alpha * suspicion``.

    Tiles below ``floor`` are not drawn, so the cells stay visible except where there is something to
    see; the foreground mask is drawn as a thin outline (not a fill). Computed in bands of
    ``band_rows`` rows (every pixel depends only on its own values and, for the outline, its
    neighbours', so the result is the same for any band height).
    """
    h, w = thumbnail.shape[:2]
    heat = np.clip(heat, 0, 1)
    outline = mask.shape == (h, w)
    out = np.empty((h, w, 3), np.uint8)
    for r0 in range(0, h, max(1, int(band_rows))):
        r1 = min(h, r0 + max(1, int(band_rows)))
        values = tile_values((r1 - r0, w), heat, grid_meta, downsample, row0=r0)
        opacity = np.where(np.isfinite(values) & (np.nan_to_num(values, nan=-1.0) >= floor),
                           alpha * np.nan_to_num(values, nan=0.0), 0.0)[..., None]
        coloured = _colormap()(np.nan_to_num(values, nan=0.0))[..., :3] * 255
        band = np.asarray(thumbnail[r0:r1])[..., :3].astype(np.float32)
        band = (1 - opacity) * band + opacity * coloured
        if outline:  # one row beyond the band on each side: the outline of a band's edge rows needs them
            a, b = max(0, r0 - 1), min(h, r1 + 1)
            rim = mask_outline(np.asarray(mask[a:b]))[r0 - a:r0 - a + r1 - r0]
            band[rim] = (1 - MASK_OUTLINE_OPACITY) * band[rim] + MASK_OUTLINE_OPACITY * np.asarray(MASK_OUTLINE_RGB, np.float32)
        out[r0:r1] = band.round().clip(0, 255).astype(np.uint8)
    return out


def overlay_scale(shape: tuple[int, int]) -> float:
    """Factor that brings a picture's long side into [OVERLAY_MIN_SIDE, OVERLAY_MAX_SIDE]."""
    long_side = max(shape[:2])
    return float(np.clip(long_side, OVERLAY_MIN_SIDE, OVERLAY_MAX_SIDE)) / max(long_side, 1)


def _picture_with_colourbar(image: np.ndarray, title: str, label: str, note: str = "") -> bytes:
    """``image`` at its own pixel size, a title and a 0-1 colour bar, lettered to stay legible (text at
    least 12 px high) when the picture is shown at 40 % of its size (report.html shows it at 820-900 px).

    matplotlib draws only the lettering and the colour bar; the image is pasted into the drawn canvas
    pixel for pixel. Drawing it with ``imshow`` would cost three float64 RGBA copies of it (530 MB
    for a 2,400 px overlay: the peak of a 60k-px slide's whole run)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from PIL import Image

    dpi = 100
    h, w = image.shape[:2]
    left, right, top, bottom = 20, 300, 130 if note else 80, 20  # px around the image: colour bar right, title on top
    fig_w, fig_h = w + left + right, h + top + bottom
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    fig.text(left / fig_w, 1 - 16 / fig_h, title, fontsize=28, va="top", ha="left")
    if note:
        fig.text(left / fig_w, 1 - 70 / fig_h, note, fontsize=21, va="top", ha="left", color="#444444")
    bar_h = min(h * 0.8, 900)
    cax = fig.add_axes(((left + w + 50) / fig_w, (bottom + (h - bar_h) / 2) / fig_h, 36 / fig_w, bar_h / fig_h))
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=_colormap()), cax=cax)
    bar.set_ticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    bar.ax.tick_params(labelsize=24, length=8, width=1.5)
    bar.set_label(label, fontsize=26)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    picture = np.array(canvas.buffer_rgba())[..., :3]
    picture[top:top + h, left:left + w] = np.asarray(image)[..., :3]
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


#: rows of the thumbnail and mask read at a time by overlay_picture
PICTURE_BAND_ROWS = 1024


def _channel_image(source, channel: int | None, convert=None):
    """A Pillow "L" image of one channel of a (h, w, c) uint8 array or zarr array (``channel=None``: the
    2-D array itself, through ``convert``), filled band by band: neither the whole array nor Pillow's
    4-byte-per-pixel RGB copy of it (0.4 GB together for a 60k-px slide's thumbnail) is ever held."""
    from PIL import Image

    h, w = (int(v) for v in source.shape[:2])
    image = Image.new("L", (w, h))
    for r0 in range(0, h, PICTURE_BAND_ROWS):
        band = np.asarray(source[r0:r0 + PICTURE_BAND_ROWS])
        plane = band if channel is None else band[..., channel]
        plane = convert(plane) if convert is not None else plane
        image.paste(Image.fromarray(np.ascontiguousarray(plane, dtype=np.uint8)), (0, r0))
    return image


def overlay_picture(thumbnail: np.ndarray, mask: np.ndarray, heat: np.ndarray, grid_meta: dict,
                    downsample: float, alpha: float, title: str, floor: float = OVERLAY_FLOOR,
                    unit: str = "tile") -> bytes:
    """overlay.png: the overlay at 1,600-2,400 px on its long side with its title and colour bar;
    ``unit`` names what the heat is of (``tile``, or ``object`` for the cells placement).

    ``thumbnail`` (h, w, 3+) and ``mask`` (h, w) may be numpy or zarr arrays: they are read in bands
    and resized one channel at a time (Pillow resizes each channel of an RGB image alike)."""
    from PIL import Image

    scale = overlay_scale(thumbnail.shape)
    h, w = thumbnail.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    planes = []
    for c in range(3):  # one full-size channel at a time (each read from the store again)
        image = _channel_image(thumbnail, c)
        planes.append(image.resize(size, Image.Resampling.LANCZOS))
        image.close()
    thumb = np.asarray(Image.merge("RGB", planes))
    # bilinear then threshold: a smooth outline, not the staircase of the coarse mask's pixels
    if tuple(mask.shape) == (h, w):
        big = _channel_image(mask, None, lambda m: m.astype(np.uint8) * 255)
        big_mask = np.asarray(big.resize(size, Image.Resampling.BILINEAR)) > 127
        big.close()
    else:
        big_mask = np.asarray(mask)
    image = overlay_image(thumb, big_mask, heat, grid_meta, downsample / scale, alpha, floor)
    return _picture_with_colourbar(image, title, f"{unit} suspicion (0-1)",
                                   f"{unit} opacity grows with suspicion; {unit}s below {floor:g} not drawn; "
                                   "dark line: tissue mask")


def overlay_png(image: np.ndarray, title: str) -> bytes:
    """An overlay image with its title and a colour bar on the fixed 0..1 suspicion scale."""
    return _picture_with_colourbar(image, title, "tile suspicion (0-1)")


def heatmap_picture(heat: np.ndarray, title: str) -> bytes:
    """heatmap.png: the tile-grid raster enlarged (nearest) with a title and a 0-1 colour bar; grey where
    no tile was kept."""
    rgba = heatmap_rgba(heat)
    rgba[rgba[..., 3] == 0] = (225, 225, 225, 255)
    rows, cols = heat.shape
    k = max(1, 900 // max(rows, cols, 1))
    big = np.repeat(np.repeat(rgba[..., :3], k, axis=0), k, axis=1)
    return _picture_with_colourbar(big, title, "tile suspicion (0-1)", "one square per tile; grey: no tile")


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


#: QuPath classification colours by class name, shared by the results' GeoJSON and the synthetic
#: ground truth (wsi_pipeline.synth.truth), so a class looks the same in both. Other names get a
#: colour from PALETTE picked by a hash of the name (stable across runs and machines).
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "basophil": (145, 30, 180), "eosinophil": (245, 130, 48), "erythroblast": (230, 25, 75),
    "ig": (240, 50, 230), "lymphocyte": (0, 130, 200), "monocyte": (70, 240, 240),
    "neutrophil": (60, 180, 75), "platelet": (170, 110, 40),
    "Planted region": (255, 200, 0), "Pen mark": (0, 0, 255), "Blurred patch": (128, 128, 128),
}
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def class_colour(name: str) -> list[int]:
    """The [r, g, b] QuPath colour of class ``name``."""
    if name in CLASS_COLOURS:
        return list(CLASS_COLOURS[name])
    return list(PALETTE[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(PALETTE)])


def _clipped_ring(x: int, y: int, w: int, h: int, bounds: tuple[int, int] | None) -> list[list[int]] | None:
    x0, y0, x1, y1 = x, y, x + w, y + h
    if bounds is not None:
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, int(bounds[0])), min(y1, int(bounds[1]))
        if x1 <= x0 or y1 <= y0:
            return None
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature_namespace(provenance: dict[str, Any]) -> uuid.UUID:
    """The UUID namespace of a run's GeoJSON feature ids: one per checkpoint, so ids are stable
    across reruns of the same slide and checkpoint (``uuid5(namespace, "<fingerprint>:...")``)."""
    return uuid.UUID(hashlib.sha256(json.dumps(provenance.get("checkpoint_sha256", "")).encode()).hexdigest()[:32])


def geojson_collection(coords: np.ndarray, probs: np.ndarray, suspicion: np.ndarray, class_names: list[str],
                       provenance: dict[str, Any], bounds: tuple[int, int] | None = None) -> dict[str, Any]:
    """QuPath-importable detections, one rectangle per tile in level-0 pixels, clipped to the image
    ``bounds`` (width, height) when given: edge tiles extend past the image and QuPath would draw them so."""
    features = []
    argmax = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    namespace = feature_namespace(provenance)
    for i in range(len(coords)):
        ring = _clipped_ring(*(int(v) for v in coords[i]), bounds)
        if ring is None:
            continue
        name = class_names[int(argmax[i])]
        measurements = {f"prob_{c}": round(float(p), 6) for c, p in zip(class_names, probs[i])}
        measurements["suspicion"] = round(float(suspicion[i]), 6)
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(namespace, f"{provenance.get('slide_fingerprint')}:{i}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "name": f"tile {i}",
                "classification": {"name": name, "color": class_colour(name)},
                "measurements": measurements,
                "isLocked": True,
            },
        })
    return {"type": "FeatureCollection", "metadata": provenance, "features": features}
