"""The tiled-TIFF reader: a chunky TIFF page read tile by tile (or strip by strip) straight
from the file, ``os.pread`` for the bytes (no shared file offset, so reader threads do not
serialise), tifffile's public ``TiffPage.decode`` for the pixels, and a small shared LRU of
decoded tiles so neighbouring regions decode each file tile once.

``benchmarks/bench_slide_read.py`` measures it against tifffile's own region access
(``aszarr`` + zarr) and OpenSlide on the same tiles.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .levels import LevelReader, paste_clipped
from .pixels import to_rgb8

__all__ = ["DEFAULT_TILE_CACHE_BYTES", "TileCache", "FileReader", "TruncatedError", "SegmentLevel"]

DEFAULT_TILE_CACHE_BYTES = 64 * 1024 * 1024


class TileCache:
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


class FileReader:
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


class TruncatedError(ValueError):
    """A level's data lies past the end of the file."""


class SegmentLevel(LevelReader):
    """A chunky TIFF page (``tifffile.TiffPage``) read segment by segment straight from the file."""

    direct = True

    def __init__(self, page, reader: FileReader, cache: TileCache, key: int) -> None:
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
            raise TruncatedError("image data past the end of the file (truncated or damaged file)")
        self._reader, self._cache, self._key = reader, cache, key
        self._miniswhite = int(page.photometric) == 0
        self._page_decode, self._tables = page.decode, page.jpegtables

    def _decode(self, data: bytes, index: int) -> np.ndarray:
        arr = self._page_decode(data, index, jpegtables=self._tables)[0]
        return to_rgb8(arr.reshape(arr.shape[-3:]), miniswhite=self._miniswhite)

    def tile(self, index: int) -> np.ndarray:
        key = (self._key, index)
        tile = self._cache.get(key)
        if tile is not None:
            return tile
        count = self.counts[index]
        if count == 0:  # sparse tile: nothing scanned there
            tile = np.full((self.seg_h, self.seg_w, 3), 255, np.uint8)
        else:
            tile = self._decode(self._reader.read(self.offsets[index], count), index)
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
                paste_clipped(out, tile, lx, ly, tx * sw, ty * sh, max(x0, tx * sw), max(y0, ty * sh),
                              min(x1, tx * sw + min(sw, tile.shape[1])), min(y1, ty * sh + min(sh, tile.shape[0])))
        return out
