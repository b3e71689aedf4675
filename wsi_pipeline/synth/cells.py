"""Cell images: the pool of single-cell images a smear is made from, and cutting cells out of them.

``list_cells`` finds the images (an ImageFolder: ``<root>/<class>/*.jpg``); ``cut_out_cell`` and
``cut_out_red_cells`` turn one image into attenuation sprites (``k = 1 - alpha * (1 - T)``, uint8,
255 = clear) of its central cell and of its whole, isolated red cells, at a chosen scale.
Part of ``wsi_pipeline.synth`` (the public entry point, which re-exports these names).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import WsiTriageError

__all__ = ['SHIPPED_CELLS', 'PBC_MPP', 'IMAGE_SUFFIXES', 'CellPool', 'list_cells', 'read_cell_list', 'disk', 'transmittance', 'segment_cells', 'cut_out_cell', 'cut_out_red_cells', 'read_rgb']

SHIPPED_CELLS = Path(__file__).resolve().parents[1] / "data" / "cells"
PBC_MPP = 0.27
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------
# The cell pool


@dataclass(frozen=True)
class CellPool:
    """The cell images of an ImageFolder: relpaths under ``root`` and their class labels."""

    root: Path
    classes: tuple[str, ...]
    relpaths: tuple[str, ...]  # sorted
    labels: np.ndarray  # class index per relpath

    def of_class(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.labels == self.classes.index(name))


def list_cells(root: str | Path | None = None, cell_list: Sequence[str] | None = None) -> CellPool:
    """The usable cell images under ``root`` (an ImageFolder), restricted to ``cell_list`` if given."""
    root = Path(root) if root is not None else SHIPPED_CELLS
    if not root.is_dir():
        raise WsiTriageError(f"{root}: cell image folder not found (expected <dir>/<class>/*.jpg)")
    found: dict[str, str] = {}
    with os.scandir(root) as it:
        class_dirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    for cname in class_dirs:
        with os.scandir(root / cname) as it:
            for e in it:
                if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file():
                    found[f"{cname}/{e.name}"] = cname
    if cell_list is not None:
        wanted = list(dict.fromkeys(cell_list))
        missing = [r for r in wanted if r not in found]
        if missing:
            raise WsiTriageError(f"{root}: {len(missing)} of {len(wanted)} listed cell images are not there "
                                 f"(first: {missing[0]}); is --cells the folder the list is relative to?")
        found = {r: found[r] for r in wanted}
    if not found:
        raise WsiTriageError(f"{root}: no cell images (expected <dir>/<class>/*.jpg)")
    relpaths = tuple(sorted(found))
    classes = tuple(sorted(set(found.values())))
    labels = np.array([classes.index(found[r]) for r in relpaths], dtype=np.int32)
    return CellPool(root, classes, relpaths, labels)


def read_cell_list(path: str | Path) -> tuple[str, ...]:
    """Relpaths, one a line (``#`` comments and blank lines skipped), e.g. configs/pbc_heldout.txt."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise WsiTriageError(f"{path}: cannot read the cell list ({exc.strerror or exc})") from None
    items = tuple(s.strip().replace("\\", "/") for s in lines if s.strip() and not s.strip().startswith("#"))
    if not items:
        raise WsiTriageError(f"{path}: the cell list names no images")
    return items


# --------------------------------------------------------------------------------------------
# Cutting cells out of their images


def disk(r: int) -> np.ndarray:
    """A filled disc of radius ``r`` (a morphology footprint)."""
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def transmittance(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel transmittance relative to the image's own background (median of its brightest fifth)."""
    f = rgb.astype(np.float32)
    bright = f.sum(axis=2)
    bg = np.median(f[bright >= np.percentile(bright, 80)], axis=0)
    bg = np.maximum(bg, 1.0)
    return np.clip(f / bg, 1e-3, 1.0), bg


def segment_cells(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Split a cell image into stained objects.

    Returns (T, bg, labels, central): transmittance, background RGB, a watershed label image of
    the stained objects (0 = background) and the label of the object at the centre (0 if none).
    The central object is seeded by the strongly stained (nuclear) blobs near the centre, the
    others by maxima of the distance transform, so a red cell touching the central cell becomes
    its own object.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    T, bg = transmittance(rgb)
    od = -np.log(T)
    fg = ndi.binary_fill_holes(ndi.binary_opening(od.sum(axis=2) > 0.25, disk(1)))
    h, w = fg.shape
    yy, xx = np.mgrid[:h, :w]
    dcen = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    nuc = od[..., 1] > 0.9
    nlab, n = ndi.label(nuc)
    central_seed = np.zeros_like(fg)
    if n:
        sizes = ndi.sum(nuc, nlab, np.arange(1, n + 1))
        mind = ndi.minimum(dcen, nlab, np.arange(1, n + 1))
        keep = [i + 1 for i in range(n) if sizes[i] >= 8 and mind[i] < 0.17 * min(h, w)]
        central_seed = np.isin(nlab, keep)
    if not central_seed.any():
        central_seed = fg & (dcen < 0.05 * min(h, w))
    dist = ndi.distance_transform_edt(fg)
    smooth = ndi.gaussian_filter(dist, 1.0)
    peaks = (smooth >= ndi.maximum_filter(smooth, size=9)) & (smooth > 2.0)
    markers, nm = ndi.label(peaks)
    central = nm + 1
    markers[ndi.binary_dilation(central_seed, disk(3))] = central
    labels = watershed(-dist, markers, mask=fg)
    if not (labels == central).any():
        return T, bg, labels, 0
    return T, bg, labels, central


def _sprite_from_mask(T: np.ndarray, mask: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Crop ``mask`` with a feathered edge into an attenuation sprite (uint8, 255 = clear) at ``scale``."""
    from scipy import ndimage as ndi

    pad = 3
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, mask.shape[0])
    c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, mask.shape[1])
    m = np.pad(mask[r0:r1, c0:c1], pad).astype(np.float32)
    t = np.pad(T[r0:r1, c0:c1], ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    alpha = ndi.gaussian_filter(m, 0.7)
    k = 1.0 - alpha[..., None] * (1.0 - t)
    if abs(scale - 1.0) > 1e-3:
        from skimage.transform import rescale

        k = rescale(k, scale, order=1, channel_axis=-1, anti_aliasing=scale < 1, mode="edge")
        m = rescale(m, scale, order=1, anti_aliasing=False, mode="constant")
    mask_out = m >= 0.5
    if not mask_out.any():
        return None
    return np.clip(np.rint(k * 255.0), 0, 255).astype(np.uint8), mask_out


def cut_out_cell(rgb: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
    """The central cell of a cell image as (attenuation uint8 (h, w, 3), mask), or None if there is none.

    Red cells that overlap the central cell (where the watershed cannot split them) are removed
    by colour: they absorb blue nearly as much as green, stained white-cell cytoplasm does not
    (median OD blue/green 0.65 for red cells, 0.27-0.41 for the PBC cytoplasm classes).
    """
    from scipy import ndimage as ndi

    T, _, labels, central = segment_cells(rgb)
    if not central:
        return None
    od = ndi.gaussian_filter(-np.log(T), (1.5, 1.5, 0))
    red_like = (od[..., 2] > 0.55 * od[..., 1]) & (od[..., 1] < 0.6)
    cell = ndi.binary_opening((labels == central) & ~red_like, disk(2))
    lab, n = ndi.label(cell)
    if n > 1:  # keep the largest piece
        cell = lab == (1 + int(np.argmax(ndi.sum(cell, lab, np.arange(1, n + 1)))))
    cell = ndi.binary_fill_holes(ndi.binary_closing(cell, disk(2)))
    border = cell[0].sum() + cell[-1].sum() + cell[:, 0].sum() + cell[:, -1].sum()
    if cell.sum() < 20 or border > 8 or cell.mean() > 0.45:
        return None  # nothing there, cut by the image border, or merged with its neighbours
    return _sprite_from_mask(T, cell, scale)


def cut_out_red_cells(rgb: np.ndarray, mpp: float, scale: float = 1.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Whole, isolated, round, pale objects other than the central cell: the image's red cells."""
    from scipy import ndimage as ndi

    T, _, labels, central = segment_cells(rgb)
    od = -np.log(T)
    h, w = labels.shape
    out = []
    diam = 7.5 / mpp
    for obj, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None or obj == central:
            continue
        if sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w:
            continue  # cut by the image border
        m = labels[sl] == obj
        area = m.sum()
        eq = 2 * math.sqrt(area / math.pi)
        bh, bw = m.shape
        if not (0.75 * diam <= eq <= 1.25 * diam) or not (0.8 <= bh / bw <= 1.25):
            continue  # not red-cell sized, or elongated
        if area < 0.88 * (math.pi / 4) * bh * bw:
            continue  # not a whole disc (a fragment left by an overlap)
        g = od[sl][m][:, 1]
        if g.mean() > 0.6 or g.max() > 1.0:
            continue  # too dark for a red cell, or a platelet lies on it
        full = np.zeros_like(labels, dtype=bool)
        full[sl] = m
        sprite = _sprite_from_mask(T, full, scale)
        if sprite is not None:
            out.append(sprite)
    return out


def read_rgb(path: Path) -> np.ndarray:
    """A cell image as uint8 RGB; an unreadable file is a ``WsiTriageError``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise WsiTriageError(f"{path}: cannot read the cell image ({exc})") from None
