"""The histology recipe (greyscale Otsu at ~8 um/px plus an area filter), kept as the baseline the
benchmarks compare the cytology mask with."""

from __future__ import annotations

import numpy as np

from .morphology import _block_mean, _remove_small
from .pixels import _as_rgb

__all__ = ["otsu_baseline_mask"]


# --------------------------------------------------------------------------- baseline

def otsu_baseline_mask(rgb: np.ndarray, mpp: float, min_area_um2: float = 10_000.0) -> np.ndarray:
    """The histology thumbnail method, for comparison only.

    In the style of TIAToolbox/CLAM tissue masking: block-average to ~8 um/px, greyscale, Otsu
    threshold (tissue = darker than the cut), drop connected regions smaller than
    ``min_area_um2`` and expand back to the input grid. The default area, 0.01 mm^2, is gentle:
    CLAM's default contour filter (``a_t=100`` reference 512-px patches) is ~1.6 mm^2 at
    0.25 um/px.
    """
    from skimage.filters import threshold_otsu

    rgb = _as_rgb(rgb)
    H, W = rgb.shape[:2]
    f = max(1, int(round(8.0 / mpp)))
    small = _block_mean(rgb, f) if f > 1 else rgb.astype(np.float32)
    grey = small @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if grey.size < 2 or float(grey.max() - grey.min()) < 1e-6:
        return np.zeros((H, W), dtype=bool)
    fg = grey < threshold_otsu(grey)
    fg = _remove_small(fg, min_area_um2 / (mpp * f) ** 2)
    return np.repeat(np.repeat(fg, f, axis=0), f, axis=1)[:H, :W]
