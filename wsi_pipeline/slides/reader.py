"""One slide interface over three backends: OpenSlide, tifffile and Pillow.

``open_slide`` tries the backends in that order. OpenSlide handles the vendor formats
(svs, ndpi, mrxs, scn, bif, vms, DICOM) and generic tiled TIFF; tifffile takes TIFFs that
OpenSlide refuses or under-reads (flat/stripped TIFF, OME-TIFF, SubIFD pyramids); Pillow takes
plain fields of view from a microscope camera (PNG, JPEG, ...).

Fast read path: for Aperio and generic tiled TIFF levels stored as JPEG tiles, regions are
assembled from the file's own JPEG tiles (``os.pread`` + ``imagecodecs.jpeg_decode``, a small
shared LRU of decoded tiles) instead of going through OpenSlide's cairo renderer. It gives the
same pixels (identical on aligned reads) and both pread and the codec release the GIL, so
reader threads scale. ``open_slide(..., fast=False)`` turns it off for comparison.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import re
import threading
import warnings
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SlideError, UnknownMppError

__all__ = ['MPP_SOURCES', 'MAX_PLAUSIBLE_TIFF_MPP', 'DEFAULT_TILE_CACHE_BYTES', 'MAX_LEVEL_SIDE', 'MAX_SLIDE_MM', 'MAX_WHOLE_IMAGE_PIXELS', 'MIN_BYTES_PER_PIXEL', 'MULTI_FILE_SUFFIXES', 'PixelSize', 'UNKNOWN_MPP', 'read_budget', 'Slide', 'EXIF_ORIENTED_FORMATS', 'open_slide', 'slide_info', 'fingerprint']

MPP_SOURCES = ("metadata", "tiff-resolution", "objective-power", "user", "unknown")
# A TIFF resolution coarser than this is a print/screen DPI (72, 96, 300 dpi ...), not the
# pixel size of a microscope image (even a 1x overview is ~10 um/px).
MAX_PLAUSIBLE_TIFF_MPP = 25.0
DEFAULT_TILE_CACHE_BYTES = 64 * 1024 * 1024
#: no scanner writes a level wider or taller than this; a header claiming more is damaged or hostile
MAX_LEVEL_SIDE = 1_000_000
#: physical extent (mm) beyond any glass slide (75 x 25 mm; 75 x 50 for large-format)
MAX_SLIDE_MM = 300.0
#: an image decoded whole (Pillow images, TIFF layouts read as one array) may have at most this many pixels
MAX_WHOLE_IMAGE_PIXELS = 300_000_000
#: a single-file slide of over a gigapixel stored in fewer bytes per pixel than this is a hostile
#: header (real ones, even mostly blank, hold 0.01-1 byte/px); reading it would take hours
MIN_BYTES_PER_PIXEL = 1e-3
#: formats whose pixels live in other files next to the one named
MULTI_FILE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".dcm")
_MIB = 1024 * 1024
# OpenSlide vendors whose pyramid levels are plain TIFF pages we may decode ourselves.
_FAST_VENDORS = {"aperio", "generic-tiff"}
_TIFF_JPEG = 7
_UNIT_TO_UM = {"um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "micron": 1.0, "microns": 1.0,
               "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}


@dataclass(frozen=True)
class PixelSize:
    """Pixel size in um/px and where it came from (one of ``MPP_SOURCES``)."""

    x: float | None
    y: float | None
    source: str

    @property
    def known(self) -> bool:
        return self.x is not None and self.y is not None

    @property
    def estimated(self) -> bool:
        """True when guessed from the objective power (mpp ~ 10 / objective)."""
        return self.source == "objective-power"

    @property
    def mean(self) -> float | None:
        return (self.x + self.y) / 2.0 if self.known else None

    def as_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "source": self.source, "estimated": self.estimated}


UNKNOWN_MPP = PixelSize(None, None, "unknown")


# --------------------------------------------------------------------------------------------
# Pixel conversion helpers


def _composite_rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """Straight-alpha RGBA -> RGB on white (transparent = outside the slide)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = np.empty(rgb.shape, np.uint8)
    for r0 in range(0, rgb.shape[0], 1024):  # in bands: uint16 temporaries of a whole image cost GBs
        a = alpha[r0:r0 + 1024].astype(np.uint16)[..., None]
        out[r0:r0 + 1024] = (rgb[r0:r0 + 1024].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        hi = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        return (np.clip(np.nan_to_num(arr), 0, hi) * (255.0 / hi) + 0.5).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        bits = np.iinfo(arr.dtype).bits
        if np.issubdtype(arr.dtype, np.signedinteger):
            arr = np.clip(arr, 0, None)
            bits -= 1
        return (arr >> (bits - 8)).astype(np.uint8)
    raise ValueError(f"unsupported pixel type {arr.dtype}")


def _to_rgb8(arr: np.ndarray, *, miniswhite: bool = False) -> np.ndarray:
    """(h, w[, s]) any dtype -> (h, w, 3) uint8; grey is replicated, alpha composited on white."""
    arr = _to_uint8(arr)
    if miniswhite:
        arr = 255 - arr
    if arr.ndim == 2:
        arr = arr[..., None]
    samples = arr.shape[2]
    if samples == 1:
        return np.repeat(arr, 3, axis=2)
    if samples == 2:  # grey + alpha
        return _composite_rgba_on_white(np.concatenate([np.repeat(arr[..., :1], 3, 2), arr[..., 1:]], 2))
    if samples == 4:
        return _composite_rgba_on_white(arr)
    return np.ascontiguousarray(arr[..., :3])


def _short_reason(exc: BaseException, path: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for variant in {path, repr(path), os.path.abspath(path)}:
        text = text.replace(variant, "").replace("''", "")
    text = re.sub(r"\s+", " ", text).strip(" :")
    return (text[:70] + "...") if len(text) > 73 else (text or type(exc).__name__)


# --------------------------------------------------------------------------------------------
# Per-slide read budget: a batch gives each slide a deadline, checked on every region read, so a
# header that makes reading endless ends in a recorded error instead of a hung batch.

_BUDGET: dict[str, float | None] = {"deadline": None, "seconds": None}


@contextlib.contextmanager
def read_budget(seconds: float | None):
    """Within the block, any slide read after ``seconds`` raises :class:`SlideError` (None: no limit)."""
    previous = dict(_BUDGET)
    _BUDGET.update(deadline=None if seconds is None else time.monotonic() + seconds, seconds=seconds)
    try:
        yield
    finally:
        _BUDGET.update(previous)


def _check_budget(path: Path) -> None:
    deadline = _BUDGET["deadline"]
    if deadline is not None and time.monotonic() > deadline:
        raise SlideError(f"{path}: reading took longer than the per-slide budget of {_BUDGET['seconds']:g} s "
                         "(--slide-timeout); damaged or unusually large slide")


# --------------------------------------------------------------------------------------------
# Level readers: integer level coordinates in, RGB uint8 out, white outside the image


class _TileCache:
    """Thread-safe LRU of decoded tiles, bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_TILE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            tile = self._items.get(key)
            if tile is not None:
                self._items.move_to_end(key)
            return tile

    def put(self, key: tuple, tile: np.ndarray) -> None:
        if tile.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


class _FileReader:
    """Positional reads (no shared file offset, so safe from many threads)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.size = os.fstat(self._fd).st_size
        self._lock = None if hasattr(os, "pread") else threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        if self._lock is not None:  # no pread on this platform
            with self._lock:
                os.lseek(self._fd, offset, os.SEEK_SET)
                return os.read(self._fd, size)
        chunks, done = [], 0
        while done < size:
            chunk = os.pread(self._fd, size - done, offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _TruncatedError(ValueError):
    """A level's data lies past the end of the file."""


class _LevelReader:
    width: int
    height: int

    def read(self, lx: int, ly: int, w: int, h: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class _ArrayLevel(_LevelReader):
    """A level held in memory (Pillow images, TIFF layouts the segment reader does not cover)."""

    def __init__(self, width: int, height: int, load: Callable[[], np.ndarray]) -> None:
        self.width, self.height = width, height
        self._load = load
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()

    def array(self) -> np.ndarray:
        if self._array is None:
            with self._lock:
                if self._array is None:
                    self._array = self._load()
        return self._array

    def read(self, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        arr = self.array()
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, self.width), min(ly + h, self.height)
        if x1 > x0 and y1 > y0:
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = arr[y0:y1, x0:x1]
        return out


class _SegmentLevel(_LevelReader):
    """A chunky TIFF page read tile by tile (or strip by strip) straight from the file."""

    def __init__(self, page, reader: _FileReader, cache: _TileCache, key: int) -> None:
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        if page.is_tiled:
            self.seg_w, self.seg_h = int(page.tilewidth), int(page.tilelength)
        else:
            self.seg_w = self.width
            self.seg_h = min(int(page.rowsperstrip or self.height), self.height)
        self.n_across = -(-self.width // self.seg_w)
        self.n_down = -(-self.height // self.seg_h)
        self.offsets = tuple(int(v) for v in page.dataoffsets)
        self.counts = tuple(int(v) for v in page.databytecounts)
        if len(self.offsets) < self.n_across * self.n_down:
            raise ValueError("fewer segments than the image needs")
        size = reader.size
        if any(c and (o + c > size or o < 0) for o, c in zip(self.offsets, self.counts)):
            raise _TruncatedError("image data past the end of the file (truncated or damaged file)")
        self._reader, self._cache, self._key = reader, cache, key
        self._miniswhite = int(page.photometric) == 0
        self.decoder = "generic"
        if int(page.compression) == _TIFF_JPEG and int(page.bitspersample) == 8:
            import imagecodecs
            from tifffile.tifffile import jpeg_decode_colorspace

            colorspace, outcolorspace = jpeg_decode_colorspace(
                int(page.photometric), int(page.planarconfig), page.extrasamples, page.is_jfif)
            tables = page.jpegtables

            def decode(data: bytes, index: int) -> np.ndarray:
                return imagecodecs.jpeg_decode(data, tables=tables, colorspace=colorspace,
                                               outcolorspace=outcolorspace)

            self.decoder = "jpeg"
        else:
            page_decode, tables = page.decode, page.jpegtables

            def decode(data: bytes, index: int) -> np.ndarray:
                arr = page_decode(data, index, jpegtables=tables)[0]
                return arr.reshape(arr.shape[-3:])

        self._decode = decode

    def tile(self, index: int) -> np.ndarray:
        key = (self._key, index)
        tile = self._cache.get(key)
        if tile is not None:
            return tile
        count = self.counts[index]
        if count == 0:  # sparse tile: nothing scanned there
            tile = np.full((self.seg_h, self.seg_w, 3), 255, np.uint8)
        else:
            tile = _to_rgb8(self._decode(self._reader.read(self.offsets[index], count), index),
                            miniswhite=self._miniswhite)
        self._cache.put(key, tile)
        return tile

    def read(self, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, self.width), min(ly + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return out
        sw, sh = self.seg_w, self.seg_h
        for ty in range(y0 // sh, (y1 - 1) // sh + 1):
            for tx in range(x0 // sw, (x1 - 1) // sw + 1):
                tile = self.tile(ty * self.n_across + tx)
                # clip to the image too: edge tiles are padded in the file
                ax0, ay0 = max(x0, tx * sw), max(y0, ty * sh)
                ax1 = min(x1, tx * sw + min(sw, tile.shape[1]))
                ay1 = min(y1, ty * sh + min(sh, tile.shape[0]))
                if ax1 > ax0 and ay1 > ay0:
                    out[ay0 - ly:ay1 - ly, ax0 - lx:ax1 - lx] = \
                        tile[ay0 - ty * sh:ay1 - ty * sh, ax0 - tx * sw:ax1 - tx * sw]
        return out


class _OpenSlideLevel(_LevelReader):
    """OpenSlide's own renderer (every format it supports)."""

    def __init__(self, osr, level: int) -> None:
        self._osr, self._level = osr, level
        self.width, self.height = osr.level_dimensions[level]
        self._ds = float(osr.level_downsamples[level])

    def read_level0(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        region = self._osr.read_region((int(x), int(y)), self._level, (int(w), int(h)))
        return _composite_rgba_on_white(np.asarray(region))

    def read(self, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        return self.read_level0(round(lx * self._ds), round(ly * self._ds), w, h)


def _shift_bilinear(src: np.ndarray, fx: float, fy: float, w: int, h: int) -> np.ndarray:
    """Sample ``src`` (h+1, w+1, 3) at a sub-pixel offset, as OpenSlide's cairo renderer does."""
    wx, wy = int(round(fx * 256)), int(round(fy * 256))
    a = src.astype(np.int32)
    rows = a[:, :w] * (256 - wx) + a[:, 1:w + 1] * wx
    out = rows[:h] * (256 - wy) + rows[1:h + 1] * wy
    return ((out + (1 << 15)) >> 16).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# The Slide


class Slide:
    """An opened slide or field of view. Reads are thread-safe; use as a context manager."""

    def __init__(self, *, path: Path, backend: str, format: str, vendor: str | None,
                 levels: list[_LevelReader], mpp: PixelSize, associated_images: list[str],
                 properties: dict[str, str], downsamples: list[float] | None = None,
                 closers: list[Callable[[], None]] | None = None,
                 openslide_levels: list[_OpenSlideLevel] | None = None,
                 cache: _TileCache | None = None) -> None:
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
        self._openslide_levels = openslide_levels
        self._cache = cache
        self._closed = False
        self._reads_lock = threading.Lock()
        self.level_reads = [0] * self.level_count  # region reads served by each level

    def _count_read(self, level: int) -> None:
        _check_budget(self.path)
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
                             f"{type(exc).__name__}: {_short_reason(exc, str(self.path))} (damaged file?)") from None

    # -- description
    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, backend={self.backend!r}, format={self.format!r}, "
                f"dimensions={self.dimensions}, levels={self.level_count}, mpp={self.mpp})")

    @property
    def fast_levels(self) -> list[int]:
        """Levels read by decoding the file's JPEG tiles directly (openslide backend only)."""
        if self.backend != "openslide":
            return []
        return [i for i, lv in enumerate(self._levels) if isinstance(lv, _SegmentLevel)]

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
        if isinstance(reader, _OpenSlideLevel):
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


# --------------------------------------------------------------------------------------------
# Pixel size


def _plausible_tiff_mpp(x: float | None, y: float | None) -> PixelSize:
    if not x or not y or x <= 0 or y <= 0 or max(x, y) > MAX_PLAUSIBLE_TIFF_MPP:
        return UNKNOWN_MPP
    return PixelSize(float(x), float(y), "tiff-resolution")


def _objective_mpp(power) -> PixelSize:
    try:
        value = float(power)
    except (TypeError, ValueError):
        return UNKNOWN_MPP
    if not math.isfinite(value) or value <= 0:
        return UNKNOWN_MPP
    return PixelSize(10.0 / value, 10.0 / value, "objective-power")


def _openslide_mpp(props: dict[str, str], vendor: str | None) -> PixelSize:
    try:
        mx, my = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        mx = my = None
    if mx and my and mx > 0 and my > 0:
        # generic-tiff's mpp is OpenSlide's reading of the TIFF resolution tags
        from_tiff = (vendor == "generic-tiff" and "tiff.XResolution" in props
                     and props.get("tiff.ResolutionUnit") in ("centimeter", "inch"))
        return _plausible_tiff_mpp(mx, my) if from_tiff else PixelSize(mx, my, "metadata")
    return _objective_mpp(props.get("openslide.objective-power"))


def _tiff_resolution_mpp(page) -> PixelSize:
    try:
        xres, yres = page.resolution
        unit = int(page.resolutionunit)
    except Exception:
        return UNKNOWN_MPP
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
    if um_per_unit is None or not xres or not yres:
        return UNKNOWN_MPP
    return _plausible_tiff_mpp(um_per_unit / xres, um_per_unit / yres)


def _ome_mpp(xml: str | None) -> PixelSize:
    if not xml:
        return UNKNOWN_MPP
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return UNKNOWN_MPP
    for elem in root.iter():
        if elem.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        sizes = []
        for axis in ("X", "Y"):
            value = elem.get(f"PhysicalSize{axis}")
            unit = elem.get(f"PhysicalSize{axis}Unit", "µm")
            factor = _UNIT_TO_UM.get(unit)
            if value is None or factor is None:
                return UNKNOWN_MPP
            sizes.append(float(value) * factor)
        if all(s > 0 for s in sizes):
            return PixelSize(sizes[0], sizes[1], "metadata")
        return UNKNOWN_MPP
    return UNKNOWN_MPP


def _tifffile_mpp(tif, page) -> PixelSize:
    if tif.is_ome:
        found = _ome_mpp(tif.ome_metadata)
        if found.known:
            return found
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        if str(meta.get("unit", "")).lower() in ("micron", "microns", "um", "µm", "\\u00B5m"):
            try:
                xres, yres = page.resolution
                return PixelSize(1.0 / xres, 1.0 / yres, "metadata")
            except Exception:
                pass
    if tif.is_svs:
        description = page.description or ""
        match = re.search(r"\bMPP\s*=\s*([0-9.]+)", description)
        if match and float(match.group(1)) > 0:
            value = float(match.group(1))
            return PixelSize(value, value, "metadata")
        found = _tiff_resolution_mpp(page)
        if found.known:
            return found
        match = re.search(r"\bAppMag\s*=\s*([0-9.]+)", description)
        return _objective_mpp(match.group(1)) if match else UNKNOWN_MPP
    return _tiff_resolution_mpp(page)


# --------------------------------------------------------------------------------------------
# Backends


def _tiff_pages(tif) -> list:
    """Every image page of a TIFF: top-level IFDs and the SubIFD pyramid levels."""
    pages, seen = [], set()
    for page in tif.pages:
        pages.append(page)
        seen.add(page.offset)
    for series in tif.series:
        for level in series.levels:
            for page in level.pages:
                if page is not None and page.offset not in seen:
                    pages.append(page)
                    seen.add(page.offset)
    return pages


def _fast_jpeg_page(page) -> bool:
    return (page.is_tiled and int(page.compression) == _TIFF_JPEG and int(page.photometric) in (2, 6)
            and int(page.samplesperpixel) == 3 and int(page.bitspersample) == 8
            and int(page.planarconfig) == 1 and not page.extrasamples
            and int(getattr(page, "imagedepth", 1)) == 1)


def _try_openslide(path: Path, fast: bool, cache: _TileCache):
    import openslide

    osr = openslide.OpenSlide(str(path))
    closers: list[Callable[[], None]] = [osr.close]
    try:
        props = dict(osr.properties)
        vendor = props.get("openslide.vendor")
        levels: list[_LevelReader] = [_OpenSlideLevel(osr, i) for i in range(osr.level_count)]
        tif = None
        if vendor in _FAST_VENDORS:
            try:
                import tifffile

                tif = tifffile.TiffFile(str(path))
                closers.append(tif.close)
            except Exception:
                tif = None
        if tif is not None and vendor == "generic-tiff":
            # OpenSlide ignores SubIFD pyramids and OME physical sizes: tifffile reads those better
            if tif.is_ome or len(tif.series[0].levels) > osr.level_count:
                return None, closers
        if fast and tif is not None:
            reader = None
            candidates = [p for p in _tiff_pages(tif) if p.is_tiled]
            for i, (w, h) in enumerate(osr.level_dimensions):
                match = next((p for p in candidates if (p.imagewidth, p.imagelength) == (w, h)), None)
                if match is None or not _fast_jpeg_page(match):
                    continue
                try:
                    if reader is None:
                        reader = _FileReader(path)
                        closers.append(reader.close)
                    levels[i] = _SegmentLevel(match, reader, cache, key=i)
                except Exception:
                    pass  # OpenSlide keeps this level
        slide = Slide(
            path=path, backend="openslide", format=vendor or "unknown",
            vendor=None if vendor in (None, "generic-tiff") else vendor,
            levels=levels, mpp=_openslide_mpp(props, vendor),
            associated_images=sorted(osr.associated_images), properties=props,
            downsamples=[float(d) for d in osr.level_downsamples], closers=closers, cache=cache)
        return slide, []
    except BaseException:
        for closer in reversed(closers):
            closer()
        raise


def _series_level_array(level) -> np.ndarray:
    """A tifffile series level as (h, w, samples): first index of T/Z/..., channels last."""
    arr = level.asarray()
    axes = level.axes
    keep = []
    for i, axis in enumerate(axes):
        if axis not in "YXSC":
            arr = arr.take(0, axis=len(keep))
        else:
            keep.append(axis)
    order = [keep.index(a) for a in "YX"] + [i for i, a in enumerate(keep) if a in "CS"]
    arr = arr.transpose(order)
    if arr.ndim == 4:  # C and S both present
        arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    return arr


def _try_tifffile(path: Path, cache: _TileCache) -> Slide:
    import tifffile

    tif = tifffile.TiffFile(str(path))
    closers: list[Callable[[], None]] = [tif.close]
    try:
        if not tif.series or not tif.series[0].levels:
            raise ValueError("no image in the TIFF")
        series = tif.series[0]
        reader: _FileReader | None = None
        levels: list[_LevelReader] = []
        for index, level in enumerate(series.levels):
            page = level.keyframe
            if "Y" not in level.axes or "X" not in level.axes:
                raise ValueError(f"series axes {level.axes!r} have no Y/X plane")
            chunky = (len(level.pages) == 1 and page.axes in ("YX", "YXS")
                      and (int(page.planarconfig) == 1 or int(page.samplesperpixel) == 1)
                      and int(getattr(page, "imagedepth", 1)) == 1 and int(page.photometric) != 3
                      and len(page.dataoffsets) > 0)
            reader_level: _LevelReader | None = None
            if chunky:
                try:
                    if reader is None:
                        reader = _FileReader(path)
                        closers.append(reader.close)
                    reader_level = _SegmentLevel(page, reader, cache, key=index)
                except _TruncatedError:
                    raise
                except Exception:
                    reader_level = None
            if reader_level is None:
                miniswhite = int(page.photometric) == 0
                colormap = page.colormap if int(page.photometric) == 3 else None

                def load(level=level, miniswhite=miniswhite, colormap=colormap,
                         size=(int(page.imagewidth), int(page.imagelength))) -> np.ndarray:
                    _check_whole_image(path, *size)
                    arr = _series_level_array(level)
                    if colormap is not None:  # palette image: indices -> RGB
                        arr = np.moveaxis(np.asarray(colormap)[:, arr.squeeze()], 0, -1)
                    return _to_rgb8(arr, miniswhite=miniswhite)

                reader_level = _ArrayLevel(int(page.imagewidth), int(page.imagelength), load)
            levels.append(reader_level)
        levels.sort(key=lambda lv: -lv.width * lv.height)
        page0 = series.levels[0].keyframe
        props = {"tifffile.series-axes": series.axes, "tifffile.compression": str(page0.compression.name)}
        for name in ("XResolution", "YResolution", "ResolutionUnit", "Software"):
            tag = page0.tags.get(name)
            if tag is not None:
                props[f"tiff.{name}"] = str(tag.value)
        if page0.description:
            props["tiff.ImageDescription"] = page0.description[:2000]
        associated = sorted({s.name.lower() for s in tif.series[1:]
                             if s.name and s.name.lower() in ("label", "macro", "thumbnail", "overview")})
        return Slide(path=path, backend="tifffile", format="ome-tiff" if tif.is_ome else "tiff",
                     vendor=None, levels=levels, mpp=_tifffile_mpp(tif, page0),
                     associated_images=associated, properties=props, closers=closers, cache=cache)
    except BaseException:
        for closer in reversed(closers):
            closer()
        raise


def _check_whole_image(path: Path, width: int, height: int) -> None:
    """Refuse, before decoding, an image that would be decoded whole into more than the pixel cap."""
    if width * height > MAX_WHOLE_IMAGE_PIXELS:
        raise SlideError(f"{path}: a {width} x {height} px image stored without tiles would be decoded whole "
                         f"({width * height / 1e6:.0f} Mpx > {MAX_WHOLE_IMAGE_PIXELS / 1e6:.0f} Mpx); "
                         "convert it to a tiled pyramidal TIFF")


EXIF_ORIENTED_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP")


def _try_pillow(path: Path) -> Slide:
    """A camera field or screenshot (PNG, JPEG, ...): the header is read now, the pixels on first use,
    so ``info`` and a missing pixel size cost nothing and a huge image is refused before decoding."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():  # our own cap (MAX_WHOLE_IMAGE_PIXELS) decides, in one line
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    with image:
        fmt = (image.format or path.suffix.lstrip(".") or "image").lower()
        info = {f"pillow.{k}": str(v) for k, v in image.info.items()
                if isinstance(v, (str, int, float, tuple)) and len(str(v)) < 200}
        width, height = image.size
        # EXIF orientation of camera JPEGs (PNG's getexif would decode the whole image to look for it)
        oriented = image.format in EXIF_ORIENTED_FORMATS
        if oriented and image.getexif().get(0x0112) in (5, 6, 7, 8):
            width, height = height, width

    def load() -> np.ndarray:
        _check_whole_image(path, width, height)
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            if oriented:
                image = ImageOps.exif_transpose(image)  # camera JPEGs: show them upright
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = _to_rgb8(np.asarray(image).astype(np.uint16 if image.mode != "I" else np.int32))
            elif "A" in image.getbands() or "transparency" in image.info:
                arr = _composite_rgba_on_white(np.asarray(image.convert("RGBA")))
            else:
                arr = np.asarray(image.convert("RGB"))
        arr = np.ascontiguousarray(arr)
        if arr.shape[:2] != (height, width):
            raise ValueError(f"decoded {arr.shape[1]} x {arr.shape[0]} px, header said {width} x {height}")
        return arr

    level = _ArrayLevel(width, height, load)
    return Slide(path=path, backend="pillow", format="jpeg" if fmt == "mpo" else fmt, vendor=None,
                 levels=[level], mpp=UNKNOWN_MPP, associated_images=[], properties=info)


def open_slide(path: str | Path, mpp: float | None = None, *, fast: bool = True,
               tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES) -> Slide:
    """Open a slide or field of view with the first backend that reads it.

    ``mpp`` overrides the pixel size (source ``user``); ``fast=False`` reads every level
    through OpenSlide's renderer (for comparison)."""
    shown = str(path)
    path = Path(path)
    if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise SlideError(f"{shown}: --mpp must be a positive number of um/px, got {mpp}")
    if not path.exists():
        if path.is_symlink():
            try:
                os.stat(path)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise SlideError(f"{shown}: symbolic link loop") from None
            raise SlideError(f"{shown}: broken symbolic link (points to {os.readlink(path)}, which does not exist)")
        raise SlideError(f"{shown}: no such file")
    if path.is_dir():
        raise SlideError(f"{shown}: is a directory, not a slide file (for MIRAX give the .mrxs "
                         "file, for DICOM one .dcm file of the series)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            handle.read(1)
    except PermissionError:
        raise SlideError(f"{shown}: permission denied") from None
    except OSError as exc:
        raise SlideError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise SlideError(f"{shown}: empty file (0 bytes)")

    with _quiet_tifffile():  # its complaints about a damaged file would break the one-line error
        return _open_checked(path, shown, size, mpp, fast, tile_cache_bytes)


@contextlib.contextmanager
def _quiet_tifffile():
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _open_checked(path: Path, shown: str, size: int, mpp: float | None, fast: bool,
                  tile_cache_bytes: int) -> Slide:
    cache = _TileCache(tile_cache_bytes)
    reasons: list[str] = []
    slide: Slide | None = None
    try:
        slide, leftovers = _try_openslide(path, fast, cache)
        for closer in reversed(leftovers):  # OpenSlide deferred to tifffile
            closer()
        if slide is None:
            reasons.append("openslide: deferred to tifffile (SubIFD pyramid or OME-TIFF)")
    except Exception as exc:
        reasons.append(f"openslide: {_short_reason(exc, str(path))}")
    if slide is None:
        try:
            slide = _try_tifffile(path, cache)
        except Exception as exc:
            reasons.append(f"tifffile: {_short_reason(exc, str(path))}")
    if slide is None:
        try:
            slide = _try_pillow(path)
        except Exception as exc:
            reasons.append(f"pillow: {_short_reason(exc, str(path))}")
    if slide is None:
        raise SlideError(f"{shown}: not a readable slide ({'; '.join(reasons)})")
    dims = slide.dimensions
    pixels = dims[0] * dims[1]
    if max(max(d) for d in slide.level_dimensions) > MAX_LEVEL_SIDE or min(dims) < 1:
        slide.close()
        raise SlideError(f"{shown}: header claims a {dims[0]} x {dims[1]} px image, beyond any scanner "
                         f"(max {MAX_LEVEL_SIDE} px a side): damaged or hostile file")
    if pixels > 1e9 and path.suffix.lower() not in MULTI_FILE_SUFFIXES and size < pixels * MIN_BYTES_PER_PIXEL:
        slide.close()
        raise SlideError(f"{shown}: header claims a {dims[0]} x {dims[1]} px image ({pixels / 1e9:.0f} Gpx) stored "
                         f"in {size / 1e6:.1f} MB: damaged or hostile file")
    if mpp is not None:
        slide.mpp = PixelSize(float(mpp), float(mpp), "user")
    return slide


def slide_info(slide: Slide) -> dict:
    """JSON-able summary for ``wsi-triage info``."""
    known = slide.mpp.known
    levels = []
    for i, (dims, ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples)):
        levels.append({"level": i, "dimensions": list(dims), "downsample": float(ds),
                       "mpp": slide.level_mpp(i) if known else None})
    return {
        "path": str(slide.path),
        "format": slide.format,
        "backend": slide.backend,
        "vendor": slide.vendor,
        "dimensions": list(slide.dimensions),
        "level_count": slide.level_count,
        "levels": levels,
        "mpp": slide.mpp.as_dict(),
        "associated_images": list(slide.associated_images),
        "fast_read_levels": slide.fast_levels,
    }


def fingerprint(path: str | Path) -> str:
    """sha256 (hex) over the file size and its first and last MiB: cheap, mtime-free."""
    path = Path(path)
    try:
        size = path.stat().st_size
        digest = hashlib.sha256(str(size).encode() + b"\n")
        with open(path, "rb") as handle:
            digest.update(handle.read(_MIB))
            if size > _MIB:
                handle.seek(size - _MIB)
                digest.update(handle.read(_MIB))
    except FileNotFoundError:
        raise SlideError(f"{path}: no such file") from None
    except OSError as exc:
        raise SlideError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()
