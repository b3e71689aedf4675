"""Any decoded pixel array to the (h, w, 3) uint8 RGB every reader returns."""

from __future__ import annotations

import numpy as np

__all__ = ["composite_rgba_on_white", "to_rgb8"]


def composite_rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """Straight-alpha RGBA -> RGB on white (transparent = outside the slide)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = np.empty(rgb.shape, np.uint8)
    for r0 in range(0, rgb.shape[0], 1024):  # in bands: uint16 temporaries of a whole image cost GBs
        a = alpha[r0:r0 + 1024].astype(np.uint16)[..., None]
        out[r0:r0 + 1024] = (rgb[r0:r0 + 1024].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        hi = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        return (np.clip(np.nan_to_num(arr), 0, hi) * (255.0 / hi) + 0.5).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        bits = np.iinfo(arr.dtype).bits
        if np.issubdtype(arr.dtype, np.signedinteger):
            arr = np.clip(arr, 0, None)
            bits -= 1
        return (arr >> (bits - 8)).astype(np.uint8)
    raise ValueError(f"unsupported pixel type {arr.dtype}")


def to_rgb8(arr: np.ndarray, *, miniswhite: bool = False) -> np.ndarray:
    """(h, w[, s]) any dtype -> (h, w, 3) uint8; grey is replicated, alpha composited on white."""
    arr = _to_uint8(arr)
    if miniswhite:
        arr = 255 - arr
    if arr.ndim == 2:
        arr = arr[..., None]
    samples = arr.shape[2]
    if samples == 1:
        return np.repeat(arr, 3, axis=2)
    if samples == 2:  # grey + alpha
        return composite_rgba_on_white(np.concatenate([np.repeat(arr[..., :1], 3, 2), arr[..., 1:]], 2))
    if samples == 4:
        return composite_rgba_on_white(arr)
    return np.ascontiguousarray(arr[..., :3])
