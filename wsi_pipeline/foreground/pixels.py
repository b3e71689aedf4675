"""Pixel conversions shared by the foreground rules (RGB checks, HSV, log10 of 8-bit levels)."""

from __future__ import annotations

import numpy as np

__all__ = []

_LOG10_U8 = np.log10(np.maximum(np.arange(256, dtype=np.float32), 1.0)).astype(np.float32)


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 view/copy of an RGB(A) image (floats in 0..1 or 0..255 accepted)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    rgb = rgb[..., :3]
    if rgb.dtype != np.uint8:
        if np.issubdtype(rgb.dtype, np.floating) and rgb.size and float(rgb.max()) <= 1.0:
            rgb = rgb * 255.0
        rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    return rgb


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees, saturation and value (0..1), float32, for a uint8 RGB array."""
    r = rgb[..., 0].astype(np.float32)
    g = rgb[..., 1].astype(np.float32)
    b = rgb[..., 2].astype(np.float32)
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    d = mx - mn
    dd = np.where(d > 0, d, 1.0)
    h = np.where(mx == r, ((g - b) / dd) % 6.0, np.where(mx == g, (b - r) / dd + 2.0, (r - g) / dd + 4.0))
    h = np.where(d > 0, h * 60.0, 0.0).astype(np.float32)
    s = (d / np.maximum(mx, 1.0)).astype(np.float32)
    return h, s, (mx / 255.0).astype(np.float32)
