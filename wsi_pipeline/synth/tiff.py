"""The pyramidal TIFF of a synthetic smear: level 0 streamed band by band, lower levels spooled.

Bands of one tile row of level 0 are rendered, JPEG-encoded (in a few threads) and handed to
``tifffile`` as they come. The lower pyramid levels are averaged (2x2) from the same bands and
kept as encoded tiles in a temporary file beside the slide, then written after level 0, so
memory grows with the slide's width, not its area. Output is byte-identical for one config:
no time stamps, and the OME UUID is derived from the request.
Part of ``wsi_pipeline.synth``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import OutputError
from ..progress import Progress
from .config import SynthConfig

__all__ = ['pyramid_sizes', 'write_slide']


def _half(rows: np.ndarray, step: int = 4096) -> np.ndarray:
    """2x2 mean (odd edges replicated), a few thousand columns at a time to keep temporaries small."""
    h, w = rows.shape[:2]
    if h % 2 or w % 2:
        rows = np.pad(rows, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = rows.shape[:2]
    out = np.empty((h // 2, w // 2, 3), np.uint8)
    for c in range(0, w, step):
        r = rows[:, c:c + step].astype(np.uint16)
        s = r[0::2, 0::2] + r[1::2, 0::2] + r[0::2, 1::2] + r[1::2, 1::2]
        s += 2
        s >>= 2
        out[:, c // 2:(c + r.shape[1]) // 2] = s
    return out


def _tiles_of(block: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Full-size tiles of a band of rows (views; right and bottom edges padded by replication)."""
    h, w = block.shape[:2]
    for c in range(0, w, tile):
        t = block[:, c:c + tile]
        if t.shape[0] != tile or t.shape[1] != tile:
            t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
        yield t


class _PyramidSpool:
    """Lower pyramid levels, averaged from the level-0 bands and kept as encoded tiles on disk."""

    def __init__(self, sizes: list[tuple[int, int]], tile: int, encode_many, fh) -> None:
        self.sizes = sizes  # levels 1.. as (w, h)
        self.tile = tile
        self.encode_many = encode_many
        self.fh = fh
        self.pending: list[np.ndarray | None] = [None] * len(sizes)
        self.index: list[list[tuple[int, int]]] = [[] for _ in sizes]

    def push_level0(self, band: np.ndarray) -> None:
        if self.sizes:
            self._add(0, _half(band))

    def _add(self, k: int, rows: np.ndarray) -> None:
        if k >= len(self.sizes):
            return
        pend = rows if self.pending[k] is None else np.concatenate([self.pending[k], rows])
        while pend.shape[0] >= self.tile:
            self._emit(k, pend[:self.tile])
            pend = pend[self.tile:]
        self.pending[k] = pend

    def _emit(self, k: int, block: np.ndarray) -> None:
        for data in self.encode_many(_tiles_of(block, self.tile)):
            self.index[k].append((self.fh.tell(), len(data)))
            self.fh.write(data)
        self._add(k + 1, _half(block))

    def finish(self) -> None:
        for k in range(len(self.sizes)):
            pend = self.pending[k]
            if pend is not None and pend.shape[0]:
                self._emit(k, pend)
            self.pending[k] = None

    def tiles(self, k: int) -> Iterator[bytes]:
        for off, n in self.index[k]:
            self.fh.seek(off)
            yield self.fh.read(n)


# Settings added after the OME UUID was defined: left out of it at their defaults, so slides made
# before they existed keep their bytes.
_LATER_FIELDS = {"stain": "romanowsky", "pen_ink": "random"}


def _request_repr(cfg: SynthConfig) -> str:
    """``repr(cfg)`` without the later settings that are at their defaults (the OME UUID's input)."""
    parts = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
             if not (f.name in _LATER_FIELDS and getattr(cfg, f.name) == _LATER_FIELDS[f.name])]
    return f"{type(cfg).__name__}({', '.join(parts)})"


def pyramid_sizes(width: int, height: int, smallest: int = 1024) -> list[tuple[int, int]]:
    """Level sizes, halving (rounding up) until the long side is at most ``smallest``."""
    sizes = [(width, height)]
    while max(sizes[-1]) > smallest:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


def write_slide(out: Path, cfg: SynthConfig, render_band: Callable[[int, int], np.ndarray],
                sizes: list[tuple[int, int]], truth_name: str,
                progress: Progress | None = None) -> None:
    """Write the slide to ``out`` as a pyramidal JPEG TIFF (levels ``sizes``), via ``<out>.partial``.

    ``render_band(y0, y1)`` gives level-0 rows [y0, y1), asked for top to bottom one tile row at
    a time; ``progress("synth", rows_done, rows_total)`` is called before the first and after each. ``truth_name`` (the ground
    truth file) goes into the image description. ``out``'s folder must exist.
    """
    import imagecodecs
    import tifffile

    partial = out.with_name(out.name + ".partial")
    W, H, T = cfg.width, cfg.height, cfg.tile
    workers = cfg.workers or min(4, os.cpu_count() or 1)

    def encode(tile: np.ndarray) -> bytes:
        return imagecodecs.jpeg_encode(np.ascontiguousarray(tile), level=cfg.quality, colorspace="RGB",
                                       outcolorspace="YCBCR", subsampling=(2, 2))

    pool_ex = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

    def encode_many(tiles: Iterable[np.ndarray]) -> list[bytes]:
        return list(pool_ex.map(encode, tiles)) if pool_ex else [encode(t) for t in tiles]

    try:
        spool_fh = tempfile.TemporaryFile(dir=out.parent, prefix=".synth-spool-")
    except OSError as exc:
        raise OutputError(f"{out.parent}: cannot write there ({exc.strerror or exc})") from None
    spool = _PyramidSpool(sizes[1:], T, encode_many, spool_fh)

    def level0() -> Iterator[bytes]:
        if progress:
            progress("synth", 0, H)
        for y0 in range(0, H, T):
            y1 = min(y0 + T, H)
            band = render_band(y0, y1)
            # Everything for this band happens before its tiles are handed over: tifffile stops
            # pulling once it has the last tile, so code after the last yield would never run.
            spool.push_level0(band)
            if y1 == H:
                spool.finish()
            encoded = encode_many(_tiles_of(band, T))
            del band
            if progress:
                progress("synth", y1, H)
            yield from encoded

    common = dict(dtype=np.uint8, tile=(T, T), photometric="rgb", compression="jpeg",
                  resolutionunit="CENTIMETER", software="wsi-triage synth")
    description = (f"wsi-triage synthetic cytology smear; seed={cfg.seed}; mpp={cfg.mpp}; "
                   + (f"stain={cfg.stain}; " if cfg.stain != "romanowsky" else "") + f"truth={truth_name}")
    try:
        with spool_fh, tifffile.TiffWriter(partial, bigtiff=True, ome=cfg.ome) as tw:
            res0 = (1e4 / cfg.mpp, 1e4 / cfg.mpp)
            if cfg.ome:
                # A UUID derived from the request keeps OME files byte-identical for a seed.
                digest = hashlib.sha256(json.dumps([out.name, _request_repr(cfg)]).encode()).digest()
                meta = {"axes": "YXS", "PhysicalSizeX": cfg.mpp, "PhysicalSizeXUnit": "µm",
                        "PhysicalSizeY": cfg.mpp, "PhysicalSizeYUnit": "µm", "Name": out.name,
                        "UUID": str(uuid.UUID(bytes=digest[:16], version=4)), "Creator": "wsi-triage synth"}
                tw.write(level0(), shape=(H, W, 3), resolution=res0, subifds=len(sizes) - 1, metadata=meta, **common)
            else:
                tw.write(level0(), shape=(H, W, 3), resolution=res0, description=description, metadata=None,
                         **common)
            for k, (w, h) in enumerate(sizes[1:]):
                ds = W / w
                tw.write(spool.tiles(k), shape=(h, w, 3), resolution=(1e4 / (cfg.mpp * ds),) * 2,
                         subfiletype=1, metadata=None, **common)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(f"{out}: cannot write the slide ({exc.strerror or exc})") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        if pool_ex:
            pool_ex.shutdown()
    os.replace(partial, out)
