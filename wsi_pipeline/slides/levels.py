"""What a pyramid level reader is: integer level coordinates in, RGB uint8 out, white outside
the image; and the in-memory level (images decoded whole)."""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np

__all__ = ["LevelReader", "ArrayLevel", "paste_clipped"]


class LevelReader:
    """One pyramid level. ``read`` takes level px; a reader with ``level0_coords`` set also has
    ``read_level0`` (level-0 px, sub-pixel placement its own, as OpenSlide's renderer)."""

    width: int
    height: int
    #: reads take level-0 coordinates (``read_level0``)
    level0_coords = False
    #: tiles decoded straight from the file (reported by ``Slide.fast_levels``)
    direct = False

    def read(self, lx: int, ly: int, w: int, h: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


def paste_clipped(out: np.ndarray, src: np.ndarray, lx: int, ly: int, sx: int, sy: int,
                  x0: int, y0: int, x1: int, y1: int) -> None:
    """Copy the level box [x0, x1) x [y0, y1) from ``src`` (whose pixel 0, 0 is level px sx, sy)
    into ``out`` (whose pixel 0, 0 is level px lx, ly); an empty box copies nothing."""
    if x1 > x0 and y1 > y0:
        out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = src[y0 - sy:y1 - sy, x0 - sx:x1 - sx]


class ArrayLevel(LevelReader):
    """A level held in memory (Pillow images, TIFF layouts the segment reader does not cover),
    loaded on first read."""

    def __init__(self, width: int, height: int, load: Callable[[], np.ndarray]) -> None:
        self.width, self.height = width, height
        self._load = load
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._array is not None

    def array(self) -> np.ndarray:
        if self._array is None:
            with self._lock:
                if self._array is None:
                    self._array = self._load()
        return self._array

    def read(self, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        arr = self.array()
        out = np.full((h, w, 3), 255, np.uint8)
        paste_clipped(out, arr, lx, ly, 0, 0, max(lx, 0), max(ly, 0),
                      min(lx + w, self.width), min(ly + h, self.height))
        return out
