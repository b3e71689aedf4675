"""Row bands and the thread pool the foreground pass uses on large images."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = []


# --------------------------------------------------------------------------- helpers

# Rows per band for the per-pixel stage: bounds memory on 8k x 8k thumbnails.
_BAND_ROWS = 512


def _bands(h: int, halo: int = 0):
    """(lo, hi, pad_lo, pad_hi): row bands of ``_BAND_ROWS`` with ``halo`` rows of context."""
    for lo in range(0, h, _BAND_ROWS):
        hi = min(h, lo + _BAND_ROWS)
        yield lo, hi, max(0, lo - halo), min(h, hi + halo)


class _Serial:
    """Stands in for a thread pool when one thread is asked for."""

    def map(self, fn, items):
        return map(fn, items)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _pool(workers: int):
    return _Serial() if workers <= 1 else ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fgmask")


# Rows x columns of the blocks :func:`_boxes` covers a mask with (a row band is one block high).
_BLOCK = (_BAND_ROWS, 64)


def _boxes(mask: np.ndarray, gap: int):
    """(r0, r1, c0, c1): boxes on a grid of ``_BLOCK`` covering every True pixel of ``mask``;
    the blocks hit in a block row are merged into one box when at most ``gap`` px apart. Work
    that only matters at those pixels is done in these boxes (with its own context around each)."""
    h, w = mask.shape
    bh, bw = _BLOCK
    starts = np.arange(0, w, bw)
    for r0 in range(0, h, bh):
        r1 = min(h, r0 + bh)
        cols = mask[r0:r1].any(axis=0)
        if not cols.any():
            continue
        hit = np.flatnonzero(np.logical_or.reduceat(cols, starts))
        run0 = hit[0]
        for a, b in zip(hit[:-1], hit[1:]):
            if (b - a - 1) * bw > gap:
                yield r0, r1, int(starts[run0]), int(starts[a]) + bw
                run0 = b
        yield r0, r1, int(starts[run0]), min(w, int(starts[hit[-1]]) + bw)
