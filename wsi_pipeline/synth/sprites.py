"""Sprites at the slide's scale: cut-out cells, red cells and debris, ready to composite.

A ``SpriteBank`` cuts cells out of the pool's images on demand (with an LRU cache), scales them
from the images' pixel size to the slide's, keeps them in the source images' white balance (the slide's glass is lit
with it, ``layout.slide_glass``), or, for the Pap stain, re-renders them with the Pap dyes (``synth_pap``), and
keeps blurred copies for the out-of-focus patch. Sprites are attenuation
arrays (uint8, 255 = clear; ``LUT`` turns them into transmittance factors).
Part of ``wsi_pipeline.synth``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from .cells import CellPool, cut_out_cell, cut_out_red_cells, disk, read_rgb, transmittance
from .config import S_BANK, S_PAP, S_PAP_RED, seeded_rng
from .pap import nuclear_weight, nucleus_centre, pap_cell, pap_red_cell

__all__ = ['NON_EPITHELIAL', 'LUT', 'oriented', 'SpriteBank']

# Classes that stay as small as they are under the Pap stain (no epithelial cytoplasm body).
NON_EPITHELIAL = ("lymphocyte", "platelet")

LUT = np.arange(256, dtype=np.float32) / 255.0  # uint8 attenuation -> transmittance factor

def _blur_sprite(k: np.ndarray, mask: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """An out-of-focus copy of a sprite, padded by 3 sigma on every side (so its centre stays put)."""
    from scipy import ndimage as ndi

    pad = int(math.ceil(3 * sigma))
    a = 1.0 - np.pad(k, ((pad, pad), (pad, pad), (0, 0)), constant_values=255).astype(np.float32) / 255.0
    a = ndi.gaussian_filter(a, (sigma, sigma, 0))
    kb = np.clip(np.rint((1.0 - a) * 255.0), 0, 255).astype(np.uint8)
    return kb, np.pad(mask, pad)


def oriented(arr: np.ndarray, o: int) -> np.ndarray:
    """One of the 8 orientations of a sprite: ``o & 3`` quarter turns, then a mirror if ``o & 4``."""
    arr = np.rot90(arr, o & 3)
    return arr[:, ::-1] if o & 4 else arr


class SpriteBank:
    """Cut-out cells (lazily, with an LRU), red cells and debris at the slide's scale."""

    def __init__(self, pool: CellPool, scale: float, cells_mpp: float, mpp: float, seed: int,
                 cache_size: int = 2048, stain: str = "romanowsky") -> None:
        self.pool = pool
        self.scale = scale
        self.mpp = mpp
        self.seed = seed
        self.stain = stain
        # nucleus centre (row, col) in each cell's sprite (before orientation), None without one
        self.nuclei: dict[int, tuple[float, float] | None] = {}
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray] | None] = OrderedDict()
        self._blurred: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size
        rng = seeded_rng(seed, S_BANK)
        # Red cells from up to 48 pool images, and the typical image background.
        order = rng.permutation(len(pool.relpaths))[:48]
        self.red: list[tuple[np.ndarray, np.ndarray]] = []
        bgs = []
        for i in order:
            rgb = read_rgb(pool.root / pool.relpaths[i])
            bgs.append(transmittance(rgb)[1])
            if len(self.red) < 160:
                self.red.extend(cut_out_red_cells(rgb, cells_mpp, scale))
        self.background = np.median(np.array(bgs), axis=0).astype(np.float32)
        # the source images' white balance (the slide's glass is lit with it: layout.slide_glass)
        self.tint = (self.background / self.background.mean()).astype(np.float32)
        if stain == "pap":
            self.red = [(pap_red_cell(k, seeded_rng(seed, S_PAP_RED, i)), m) for i, (k, m) in enumerate(self.red)]
        self.debris = _make_debris(rng, mpp)
        # Float copies of the small, much-reused sprites (saves a lookup per composite).
        self.red_f = [LUT[k] for k, _ in self.red]
        self.debris_f = [LUT[k] for k, _ in self.debris]

    def cell(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The sprite (attenuation, mask) of pool image ``index``, or None if no cell could be cut out."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        sprite = cut_out_cell(read_rgb(self.pool.root / self.pool.relpaths[index]), self.scale)
        if sprite is not None and self.stain == "pap":
            cls = self.pool.classes[self.pool.labels[index]]
            k, m, self.nuclei[index] = pap_cell(sprite[0], sprite[1], self.mpp, seeded_rng(self.seed, S_PAP, index),
                                                epithelial=cls not in NON_EPITHELIAL)
            sprite = (k, m)
        elif sprite is not None:
            od = -np.log10(np.maximum(LUT[sprite[0]], 1e-3))
            self.nuclei[index] = nucleus_centre(nuclear_weight(od, sprite[1]))
        self._cache[index] = sprite
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return sprite

    def blurred(self, key: tuple, sprite: tuple[np.ndarray, np.ndarray],
                sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """The out-of-focus copy of ``sprite``, cached under ``key``."""
        if key not in self._blurred:
            self._blurred[key] = _blur_sprite(sprite[0], sprite[1], sigma)
            if len(self._blurred) > 512:
                self._blurred.popitem(last=False)
        return self._blurred[key]


def _make_debris(rng: np.random.Generator, mpp: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stain precipitate, dust and fragments: small irregular dark blobs."""
    from scipy import ndimage as ndi

    out = []
    colours = [(0.35, 0.22, 0.55), (0.55, 0.48, 0.42), (0.30, 0.25, 0.35), (0.6, 0.45, 0.6)]
    for i in range(32):
        size_um = rng.uniform(1.0, 9.0) if i % 3 else rng.uniform(8.0, 20.0)
        n = max(5, int(round(size_um / mpp)) + 6)
        noise = ndi.gaussian_filter(rng.standard_normal((n, n)), max(1.0, n / 8))
        yy, xx = np.mgrid[:n, :n]
        rad = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) / (n / 2 - 2)
        field = noise / (noise.std() + 1e-6) - 2.5 * rad**2
        mask = field > np.quantile(field, rng.uniform(0.55, 0.8))
        mask &= rad < 1.0
        if i % 4 == 0:  # a sprinkle of precipitate dots
            mask = (rng.random((n, n)) < 0.06) & (rad < 1.0)
            mask = ndi.binary_dilation(mask, disk(max(1, int(0.5 / mpp))))
        if not mask.any():
            mask[n // 2, n // 2] = True
        col = np.array(colours[int(rng.integers(len(colours)))], np.float32)
        dens = rng.uniform(0.5, 1.0)
        alpha = ndi.gaussian_filter(mask.astype(np.float32), 0.8) * dens
        k = 1.0 - alpha[..., None] * (1.0 - col)
        out.append((np.clip(np.rint(k * 255), 0, 255).astype(np.uint8), mask))
    return out
