"""The smallest slide the pipeline takes: a camera-field PNG of stained round blobs on pale glass.

No cells and no ground truth (:mod:`wsi_pipeline.synth.smear` makes real-cell smears); for tests
and fault-injection runs that need a readable image in milliseconds. The PNG carries no pixel size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["blob_field"]


def blob_field(path: str | Path, seed: int = 0, size: tuple[int, int] = (384, 256), n: int = 14) -> Path:
    """Write a ``size`` (width, height) PNG with ``n`` stained discs 8-16 px in radius; returns its path."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.empty((h, w, 3), dtype=np.float32)
    img[:] = (236, 230, 234)
    img += rng.normal(0, 2.0, img.shape)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(n):
        cx, cy, r = rng.uniform(20, w - 20), rng.uniform(20, h - 20), rng.uniform(8, 16)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        colour = np.array([rng.uniform(90, 160), rng.uniform(40, 90), rng.uniform(120, 170)])
        img[inside] = colour + rng.normal(0, 6, (int(inside.sum()), 3))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return path
