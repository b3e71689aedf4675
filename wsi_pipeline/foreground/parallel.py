"""Row bands and the thread pool the foreground pass uses on large images."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
