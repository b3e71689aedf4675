"""Mask morphology with sizes in micrometres: small-object removal, dilation, erosion, hole filling,
the final clean-up (also in row bands for large images)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .parallel import _Serial
from .presets import StainPreset

__all__ = []


def _block_mean(img: np.ndarray, f: int) -> np.ndarray:
    """Mean of f x f blocks as float32; edge blocks average the pixels they have."""
    h, w = img.shape[:2]
    ys = np.arange(0, h, f)
    xs = np.arange(0, w, f)
    out = np.add.reduceat(img.astype(np.float32), ys, axis=0)
    out = np.add.reduceat(out, xs, axis=1)
    cy = np.diff(np.append(ys, h)).astype(np.float32)
    cx = np.diff(np.append(xs, w)).astype(np.float32)
    n = cy[:, None] * cx[None, :]
    return out / (n[..., None] if out.ndim == 3 else n)


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_px`` pixels (counted and looked up at
    the mask's own pixels only: a dark-edge or foreground mask is a small part of an overview)."""
    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    where = np.flatnonzero(lab)
    labels = lab.ravel()[where]
    keep = np.bincount(labels, minlength=n + 1) >= min_px
    out = np.zeros(lab.shape, dtype=bool)
    out.ravel()[where] = keep[labels]
    return out


def _upsample(mask: np.ndarray, f: int, H: int, W: int) -> np.ndarray:
    return np.repeat(np.repeat(mask, f, axis=0), f, axis=1)[:H, :W]


def _grow(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilate by about ``radius`` px (a square; a margin, not a measurement)."""
    return _dilate_local(mask, int(np.ceil(radius)))


def _dilate_local(mask: np.ndarray, r: int) -> np.ndarray:
    """:func:`_dilate` on the bounding box of ``mask`` grown by ``r`` (same result, less work
    for a pen stroke or a border on one side of a large thumbnail)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return mask.copy()
    if np.count_nonzero(mask) * (2 * r + 1) ** 2 < mask.size // 32:
        # scattered pixels (dark specks over a whole thumbnail): paint a square around each
        ys, xs = np.nonzero(mask)
        d = np.arange(-r, r + 1)
        out = np.zeros_like(mask)
        yy = np.clip(ys[:, None, None] + d[None, :, None], 0, mask.shape[0] - 1)
        xx = np.clip(xs[:, None, None] + d[None, None, :], 0, mask.shape[1] - 1)
        out[yy, xx] = True
        return out
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1 = max(0, rows[0] - r), min(mask.shape[0], rows[-1] + r + 1)
    x0, x1 = max(0, cols[0] - r), min(mask.shape[1], cols[-1] + r + 1)
    if (y1 - y0) * (x1 - x0) > 0.8 * mask.size:
        return _dilate(mask, r)
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = _dilate(np.ascontiguousarray(mask[y0:y1, x0:x1]), r)
    return out


def _clean(fg: np.ndarray, mpp: float, preset: StainPreset, top: bool = True, bottom: bool = True) -> np.ndarray:
    """Close cell rims, fill small holes, drop thin lines and dust; sizes in um.

    ``top`` / ``bottom``: whether the first / last row is the image border (for a band of a
    larger image they are context rows, see :func:`_clean_banded`)."""
    if not fg.any():
        return fg
    r_close = int(np.floor(preset.close_um / mpp + 0.5))
    if r_close >= 1:
        fg = _erode(_dilate(fg, r_close), r_close)
    hole_px = np.pi / 4.0 * (preset.max_hole_um / mpp) ** 2
    if hole_px >= 1:
        fg = _fill_small_holes(fg, hole_px, top, bottom)
    r_open = int(preset.min_object_um / 4.0 / mpp)  # removes lines thinner than ~min_object/2
    if r_open >= 1:
        fg = _dilate(_erode(fg, r_open), r_open)
    min_px = np.pi / 4.0 * (preset.min_object_um / mpp) ** 2
    if min_px > 1:
        fg = _remove_small(fg, min_px)
    return fg


def _clean_halo(mpp: float, preset: StainPreset) -> int:
    """Context rows that make :func:`_clean` of a band exact in the band's own rows.

    Closing and opening reach r rows each way per step; a hole or a speck of n pixels spans at
    most n rows, so one that touches the band is wholly inside band + n rows, and a larger
    component cut by the context edge still shows more than n pixels there.
    """
    r_close = int(np.floor(preset.close_um / mpp + 0.5))
    r_open = int(preset.min_object_um / 4.0 / mpp)
    hole_px = np.pi / 4.0 * (preset.max_hole_um / mpp) ** 2
    min_px = np.pi / 4.0 * (preset.min_object_um / mpp) ** 2
    return 2 * r_close + 2 * r_open + int(np.ceil(hole_px)) + int(np.ceil(min_px)) + 2


def _clean_banded(fg: np.ndarray, mpp: float, preset: StainPreset, pool) -> np.ndarray:
    """:func:`_clean` in row bands with exact context (see :func:`_clean_halo`)."""
    h = fg.shape[0]
    halo = _clean_halo(mpp, preset)
    n_bands = 1 if isinstance(pool, _Serial) else max(1, min(8, h // max(4 * halo, 256)))
    if n_bands <= 1 or not fg.any():
        return _clean(fg, mpp, preset)
    out = np.empty_like(fg)
    edges = np.linspace(0, h, n_bands + 1).astype(int)

    def band_work(i: int) -> None:
        lo, hi = edges[i], edges[i + 1]
        plo, phi = max(0, lo - halo), min(h, hi + halo)
        cleaned = _clean(np.ascontiguousarray(fg[plo:phi]), mpp, preset, top=plo == 0, bottom=phi == h)
        out[lo:hi] = cleaned[lo - plo:hi - plo]

    for _ in pool.map(band_work, range(n_bands)):
        pass
    return out


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilation by a (2r+1) square: separable running maxima, linear time for any r."""
    m = mask.view(np.uint8)
    m = ndi.maximum_filter1d(m, 2 * r + 1, axis=0, mode="nearest")
    return ndi.maximum_filter1d(m, 2 * r + 1, axis=1, mode="nearest").view(bool)


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Erosion by a (2r+1) square; the image border does not erode (cells cut by it stay)."""
    m = mask.view(np.uint8)
    m = ndi.minimum_filter1d(m, 2 * r + 1, axis=0, mode="nearest")
    return ndi.minimum_filter1d(m, 2 * r + 1, axis=1, mode="nearest").view(bool)


def _fill_small_holes(fg: np.ndarray, max_px: float, top: bool = True, bottom: bool = True) -> np.ndarray:
    """Fill background pockets (4-connected, not touching the border) of <= ``max_px`` pixels.

    ``top`` / ``bottom`` False: that row is not the image border (a band's context edge); a
    pocket cut by it is larger than ``max_px`` where it matters (see :func:`_clean_halo`)."""
    lab, n = ndi.label(~fg)
    if n == 0:
        return fg
    small = np.bincount(lab.ravel()) <= max_px
    small[0] = False
    edge = [lab[:, 0], lab[:, -1]] + ([lab[0]] if top else []) + ([lab[-1]] if bottom else [])
    small[np.concatenate(edge)] = False
    return fg | small[lab]
