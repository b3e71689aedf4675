"""Pixels of a synthetic smear: any window of level 0, rendered from the layout.

Composition works in transmittance: every sprite anchored in a block that reaches the window
multiplies into one transmittance map (so drawing order does not matter), then the pen mark,
then the light (glass colour x smooth gain x faint noise) turns it into uint8 RGB.
Part of ``wsi_pipeline.synth``.
"""

from __future__ import annotations

import numpy as np

from .layout import BLOCK, NOISE_SIZE, Layout, bilinear_patch, overlap
from .sprites import LUT

__all__ = ['CHUNK', 'Renderer']

CHUNK = 2048  # render width per call, level-0 px (a multiple of the tile)


class Renderer:
    """Renders windows of one slide's level 0 from its layout."""

    def __init__(self, layout: Layout) -> None:
        self.lay = layout
        self.bg = layout.glass

    def band(self, y0: int, y1: int) -> np.ndarray:
        """Level-0 rows [y0, y1) across the whole slide, rendered ``CHUNK`` px wide at a time.

        Bands must be asked for top to bottom: once a band is rendered, the layout forgets the
        blocks that no later band can reach (memory then grows with the width, not the area).
        """
        lay = self.lay
        W = lay.cfg.width
        band = np.empty((y1 - y0, W, 3), np.uint8)
        for x0 in range(0, W, CHUNK):
            x1 = min(x0 + CHUNK, W)
            band[:, x0:x1] = self.render(y0, y1, x0, x1)
        lay.evict_before(max((y1 - lay.margin) // BLOCK, 0))
        return band

    def render(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The uint8 RGB window [y0, y1) x [x0, x1) of level 0."""
        lay = self.lay
        h, w = y1 - y0, x1 - x0
        T = np.ones((h, w, 3), np.float32)
        mg = lay.margin
        bi0, bi1 = max((y0 - mg) // BLOCK, 0), min((y1 - 1 + mg) // BLOCK, lay.nby - 1)
        bj0, bj1 = max((x0 - mg) // BLOCK, 0), min((x1 - 1 + mg) // BLOCK, lay.nbx - 1)
        for bi in range(bi0, bi1 + 1):
            for bj in range(bj0, bj1 + 1):
                blk = lay.block(bi, bj)
                if not blk.sprites:
                    continue
                hit = np.flatnonzero((blk.x0 < x1) & (blk.x1 > x0) & (blk.y0 < y1) & (blk.y1 > y0))
                if not hit.size:
                    continue
                sx0, sy0, sx1, sy1 = blk.x0[hit], blk.y0[hit], blk.x1[hit], blk.y1[hit]
                cx0, cy0 = np.maximum(sx0, x0), np.maximum(sy0, y0)
                cx1, cy1 = np.minimum(sx1, x1), np.minimum(sy1, y1)
                sprites = blk.sprites
                for i, a, b, c, d, e, f, g, k in zip(
                        hit.tolist(), (cy0 - y0).tolist(), (cy1 - y0).tolist(), (cx0 - x0).tolist(),
                        (cx1 - x0).tolist(), (cy0 - sy0).tolist(), (cy1 - sy0).tolist(),
                        (cx0 - sx0).tolist(), (cx1 - sx0).tolist()):
                    sub = sprites[i][e:f, g:k]
                    T[a:b, c:d] *= LUT[sub] if sub.dtype == np.uint8 else sub
        # Pen mark.
        pb = lay.pen_bbox
        if overlap([x0, y0, w, h], pb):
            m = bilinear_patch(lay.pen, lay.gstep, y0, y1, x0, x1)
            if m.max() > 0:
                T *= 1.0 - m[..., None] * (1.0 - lay.pen_ink)
        # Light: glass colour x smooth gain x faint noise.
        light = bilinear_patch(lay.gain, lay.gstep, y0, y1, x0, x1, sub=8)
        rows = np.arange(y0, y1) % NOISE_SIZE
        cols = np.arange(x0, x1) % NOISE_SIZE
        light *= lay.noise[rows][:, cols]
        T *= light[..., None] * self.bg
        np.minimum(T, 255.0, out=T)
        return T.astype(np.uint8)
