"""Small slides and stores for the scorer/aggregate/run/batch tests (made on the fly, no fixtures on disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from wsi_pipeline.synth import SHIPPED_CELLS, SynthConfig, synthesize
from wsi_pipeline.tiling import TilerConfig, tile_slide


def blob_field(path: Path, seed: int = 0, size: tuple[int, int] = (384, 256), n: int = 14) -> Path:
    """A camera-field PNG: stained round cells on a pale, slightly noisy background (no mpp in the file)."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return path


def tiled_store(slide: Path, out: Path, tile_size: int = 32, mpp: float = 0.5, stain: str = "pap") -> Path:
    """Tile ``slide`` (a blob field, mpp given) the way ``run`` would for a checkpoint of that geometry."""
    result = tile_slide(slide, out, TilerConfig(target_mpp=mpp, tile_size=tile_size, stain=stain), mpp=mpp)
    assert result.n_tiles > 0
    return result.path


def cells_dir(shared: Path | None) -> Path | None:
    """Cell images for synthetic smears: the shipped held-out cells, else the shared PBC set."""
    if SHIPPED_CELLS.is_dir() and any(SHIPPED_CELLS.iterdir()):
        return None  # synth's default
    if shared is not None and (shared / "pbc").is_dir():
        return shared / "pbc"
    return Path("__missing__")


def smear(path: Path, cells: Path | None, *, fraction: float, seed: int = 1, size: int = 1536,
          mpp: float = 0.25, regions: int | None = None):
    return synthesize(path, SynthConfig(width=size, height=size, mpp=mpp, seed=seed, cells=cells,
                                        fraction=fraction, regions=regions))
