"""The opened slide: level choice by pixel size, region reads at any level-0 position (sub-pixel
offsets interpolated as OpenSlide does), resampled reads at a target pixel size, thumbnails."""

from __future__ import annotations

import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SlideError, UnknownMppError
from .budget import check_budget
from .levels import LevelReader
from .limits import MAX_SLIDE_MM
from .pixel_size import PixelSize
from .tiff_tiles import TileCache

__all__ = ["Slide", "short_reason"]


def short_reason(exc: BaseException, path: str) -> str:
    """A library's exception as a short phrase for a one-line error (the path, named elsewhere, left out)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for variant in {path, repr(path), os.path.abspath(path)}:
        text = text.replace(variant, "").replace("''", "")
    text = re.sub(r"\s+", " ", text).strip(" :")
    return (text[:70] + "...") if len(text) > 73 else (text or type(exc).__name__)


def _shift_bilinear(src: np.ndarray, fx: float, fy: float, w: int, h: int) -> np.ndarray:
    """Sample ``src`` (h+1, w+1, 3) at a sub-pixel offset, as OpenSlide's cairo renderer does."""
    wx, wy = int(round(fx * 256)), int(round(fy * 256))
    a = src.astype(np.int32)
    rows = a[:, :w] * (256 - wx) + a[:, 1:w + 1] * wx
    out = rows[:h] * (256 - wy) + rows[1:h + 1] * wy
    return ((out + (1 << 15)) >> 16).astype(np.uint8)


class Slide:
    """An opened slide or field of view. Reads are thread-safe; use as a context manager."""

    def __init__(self, *, path: Path, backend: str, format: str, vendor: str | None,
                 levels: list[LevelReader], mpp: PixelSize, associated_images: list[str],
                 properties: dict[str, str], downsamples: list[float] | None = None,
                 closers: list[Callable[[], None]] | None = None,
                 cache: TileCache | None = None) -> None:
        self.path = path
        self.backend = backend
        self.format = format
        self.vendor = vendor
        self._levels = levels
        self.level_count = len(levels)
        self.level_dimensions = [(int(lv.width), int(lv.height)) for lv in levels]
        self.dimensions = self.level_dimensions[0]
        w0, h0 = self.dimensions
        self.level_downsamples = downsamples or [
            (w0 / lv.width + h0 / lv.height) / 2.0 for lv in levels]
        self.mpp = mpp
        self.associated_images = associated_images
        self.properties = properties
        self._closers = closers or []
        self._cache = cache
        self._closed = False
        self._reads_lock = threading.Lock()
        self.level_reads = [0] * self.level_count  # region reads served by each level

    def _count_read(self, level: int) -> None:
        check_budget(self.path)
        with self._reads_lock:
            self.level_reads[level] += 1

    def _level_read(self, level: int, read: Callable[..., np.ndarray], *args) -> np.ndarray:
        """A level reader's call; a decoder failure inside the file becomes a one-line SlideError."""
        try:
            return read(*args)
        except SlideError:
            raise
        except MemoryError:
            raise SlideError(f"{self.path}: not enough memory to decode level {level}") from None
        except Exception as exc:  # noqa: BLE001 - codecs raise their own types (Jpeg8Error, OpenSlideError, ...)
            raise SlideError(f"{self.path}: cannot decode level {level} near ({args[0]}, {args[1]}): "
                             f"{type(exc).__name__}: {short_reason(exc, str(self.path))} (damaged file?)") from None

    # -- description
    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, backend={self.backend!r}, format={self.format!r}, "
                f"dimensions={self.dimensions}, levels={self.level_count}, mpp={self.mpp})")

    @property
    def fast_levels(self) -> list[int]:
        """Levels read by decoding the file's JPEG tiles directly (openslide backend only)."""
        if self.backend != "openslide":
            return []
        return [i for i, lv in enumerate(self._levels) if lv.direct]

    def require_mpp(self) -> PixelSize:
        if not self.mpp.known:
            raise UnknownMppError(
                f"{self.path}: pixel size (mpp) unknown; pass --mpp <um/px> "
                "(e.g. --mpp 0.25 for a 40x scan, 0.5 for 20x)")
        w_mm, h_mm = self.dimensions[0] * self.mpp.x / 1000, self.dimensions[1] * self.mpp.y / 1000
        if max(w_mm, h_mm) > MAX_SLIDE_MM:
            raise SlideError(f"{self.path}: {self.dimensions[0]} x {self.dimensions[1]} px at {self.mpp.x:g} um/px "
                             f"would be {w_mm:.0f} x {h_mm:.0f} mm, larger than any glass slide (damaged header, "
                             "or a wrong --mpp)")
        return self.mpp

    def level_mpp(self, level: int) -> float:
        return self.require_mpp().mean * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """Coarsest level whose pixels are at least as fine as ``target_mpp`` (1% slack)."""
        if not target_mpp or target_mpp <= 0:
            raise ValueError(f"target mpp must be positive, got {target_mpp}")
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= target_mpp * 1.01:
                best = level
        return best

    # -- reading
    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range 0..{self.level_count - 1}")

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB; x, y in level-0 px, w, h in level px; white outside the image."""
        self._check_level(level)
        w, h = int(w), int(h)
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}x{h}")
        reader = self._levels[level]
        if reader.level0_coords:
            self._count_read(level)
            return self._level_read(level, reader.read_level0, x, y, w, h)
        ds = self.level_downsamples[level]
        if x < 0 or y < 0:
            # OpenSlide's convention: content at level-0 0 lands at int(-x / ds) output px
            ox, oy = (int(-x / ds) if x < 0 else 0), (int(-y / ds) if y < 0 else 0)
            out = np.full((h, w, 3), 255, np.uint8)
            if ox < w and oy < h:
                out[oy:, ox:] = self.read_region(level, max(x, 0), max(y, 0), w - ox, h - oy)
            return out
        self._count_read(level)
        fx, fy = x / ds, y / ds
        ix, iy = math.floor(fx + 1e-9), math.floor(fy + 1e-9)
        dx, dy = fx - ix, fy - iy
        if dx < 1e-6 and dy < 1e-6:
            return self._level_read(level, reader.read, ix, iy, w, h)
        return _shift_bilinear(self._level_read(level, reader.read, ix, iy, w + 1, h + 1), dx, dy, w, h)

    def _read_box(self, level: int, bx0: float, by0: float, bx1: float, by1: float,
                  out_w: int, out_h: int) -> np.ndarray:
        """Level-px box (fractional) resampled to out_w x out_h (area filter when shrinking)."""
        from PIL import Image

        ix0, iy0 = math.floor(bx0 + 1e-9), math.floor(by0 + 1e-9)
        ix1, iy1 = max(math.ceil(bx1 - 1e-9), ix0 + 1), max(math.ceil(by1 - 1e-9), iy0 + 1)
        self._count_read(level)
        src = self._level_read(level, self._levels[level].read, ix0, iy0, ix1 - ix0, iy1 - iy0)
        box = (bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)
        if (out_w, out_h) == (ix1 - ix0, iy1 - iy0) and all(
                abs(a - b) < 1e-6 for a, b in zip(box, (0, 0, out_w, out_h))):
            return src
        shrinking = out_w < (bx1 - bx0) and out_h < (by1 - by0)
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        image = Image.fromarray(src).resize((out_w, out_h), resample, box=box)
        return np.asarray(image)

    def _level_scale(self, level: int) -> tuple[float, float]:
        (w0, h0), (wl, hl) = self.dimensions, self.level_dimensions[level]
        return w0 / wl, h0 / hl

    def read_region_mpp(self, x: int, y: int, w0: int, h0: int, target_mpp: float,
                        out_size: tuple[int, int] | None = None) -> np.ndarray:
        """Level-0 box (x, y, w0, h0) at ``target_mpp``, read from the coarsest adequate level."""
        mpp = self.require_mpp()
        if out_size is None:
            out_size = (max(1, round(w0 * mpp.x / target_mpp)), max(1, round(h0 * mpp.y / target_mpp)))
        level = self.best_level_for_mpp(target_mpp)
        sx, sy = self._level_scale(level)
        return self._read_box(level, x / sx, y / sy, (x + w0) / sx, (y + h0) / sy,
                              int(out_size[0]), int(out_size[1]))

    def thumbnail(self, target_mpp: float, block: int = 2048, workers: int = 1) -> tuple[np.ndarray, float]:
        """Whole-slide overview at about ``target_mpp``; returns (rgb, level-0 px per output px).

        Read from the coarsest adequate level in blocks of about ``block`` level px (``workers``
        threads at a time), so a single-level slide never needs its full level in memory."""
        mpp = self.require_mpp()
        w0, h0 = self.dimensions
        out_w = max(1, round(w0 * mpp.x / target_mpp))
        out_h = max(1, round(h0 * mpp.y / target_mpp))
        level = self.best_level_for_mpp(target_mpp)
        lw, lh = self.level_dimensions[level]
        kx, ky = lw / out_w, lh / out_h  # level px per output px
        step_x = max(1, int(block / max(kx, 1e-9)))
        step_y = max(1, int(block / max(ky, 1e-9)))
        out = np.empty((out_h, out_w, 3), np.uint8)
        blocks = [(r0, min(out_h, r0 + step_y), c0, min(out_w, c0 + step_x))
                  for r0 in range(0, out_h, step_y) for c0 in range(0, out_w, step_x)]

        def read(b: tuple[int, int, int, int]) -> None:
            r0, r1, c0, c1 = b
            out[r0:r1, c0:c1] = self._read_box(level, c0 * kx, r0 * ky, c1 * kx, r1 * ky, c1 - c0, r1 - r0)

        if workers <= 1 or len(blocks) == 1:
            for b in blocks:
                read(b)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thumbnail") as pool:
                for _ in pool.map(read, blocks):
                    pass
        if self._cache is not None and level > 0:
            # a pyramid level's tiles were each read once and full-resolution tile reads do not use
            # them: 64 MB freed before the foreground pass (level 0's stay: a small single-level
            # slide's tiles are then read from the cache)
            self._cache.clear()
        return out, (w0 / out_w + h0 / out_h) / 2.0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._cache is not None:
            self._cache.clear()
        for closer in self._closers:
            try:
                closer()
            except Exception:  # closing must not mask the caller's own error
                pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
