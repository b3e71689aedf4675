"""The OpenSlide backend: vendor formats (svs, ndpi, mrxs, scn, bif, vms, DICOM) and generic
tiled TIFF. For Aperio and generic TIFF levels stored as plain JPEG tiles the pixels come from
the tiled-TIFF reader instead of OpenSlide's cairo renderer (same pixels, identical on aligned
reads; reader threads scale); ``fast=False`` keeps every level on OpenSlide for comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .levels import LevelReader
from .pixel_size import openslide_mpp
from .pixels import composite_rgba_on_white
from .slide import Slide
from .tiff_tiles import FileReader, SegmentLevel, TileCache

__all__ = ["OpenSlideLevel", "open_with_openslide"]

# OpenSlide vendors whose pyramid levels are plain TIFF pages we may decode ourselves.
_FAST_VENDORS = {"aperio", "generic-tiff"}
_TIFF_JPEG = 7


class OpenSlideLevel(LevelReader):
    """OpenSlide's own renderer (every format it supports)."""

    level0_coords = True

    def __init__(self, osr, level: int) -> None:
        self._osr, self._level = osr, level
        self.width, self.height = osr.level_dimensions[level]
        self._ds = float(osr.level_downsamples[level])

    def read_level0(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        region = self._osr.read_region((int(x), int(y)), self._level, (int(w), int(h)))
        return composite_rgba_on_white(np.asarray(region))

    def read(self, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        return self.read_level0(round(lx * self._ds), round(ly * self._ds), w, h)


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


def _plain_jpeg_tiles(page) -> bool:
    """8-bit RGB/YCbCr JPEG tiles, one plane: what the tiled-TIFF reader decodes as OpenSlide would."""
    return (page.is_tiled and int(page.compression) == _TIFF_JPEG and int(page.photometric) in (2, 6)
            and int(page.samplesperpixel) == 3 and int(page.bitspersample) == 8
            and int(page.planarconfig) == 1 and not page.extrasamples
            and int(getattr(page, "imagedepth", 1)) == 1)


def _open_tiff(path: Path, closers: list[Callable[[], None]]):
    """The same file through tifffile (its pages for the direct path), or None if it will not parse."""
    try:
        import tifffile

        tif = tifffile.TiffFile(str(path))
    except Exception:
        return None
    closers.append(tif.close)
    return tif


def _direct_levels(path: Path, tif, osr, levels: list[LevelReader], cache: TileCache,
                   closers: list[Callable[[], None]]) -> None:
    """Swap in the tiled-TIFF reader for each OpenSlide level that is a plain JPEG-tiled page."""
    reader = None
    candidates = [p for p in _tiff_pages(tif) if p.is_tiled]
    for i, (w, h) in enumerate(osr.level_dimensions):
        match = next((p for p in candidates if (p.imagewidth, p.imagelength) == (w, h)), None)
        if match is None or not _plain_jpeg_tiles(match):
            continue
        try:
            if reader is None:
                reader = FileReader(path)
                closers.append(reader.close)
            levels[i] = SegmentLevel(match, reader, cache, key=i)
        except Exception:
            pass  # OpenSlide keeps this level


def open_with_openslide(path: Path, fast: bool, cache: TileCache) -> Slide | None:
    """The slide through OpenSlide; None when tifffile reads this TIFF better (SubIFD pyramid,
    OME-TIFF); OpenSlide's own error when it cannot read the file."""
    import openslide

    osr = openslide.OpenSlide(str(path))
    closers: list[Callable[[], None]] = [osr.close]
    try:
        props = dict(osr.properties)
        vendor = props.get("openslide.vendor")
        levels: list[LevelReader] = [OpenSlideLevel(osr, i) for i in range(osr.level_count)]
        tif = _open_tiff(path, closers) if vendor in _FAST_VENDORS else None
        # OpenSlide ignores SubIFD pyramids and OME physical sizes: tifffile reads those better
        if (tif is not None and vendor == "generic-tiff"
                and (tif.is_ome or len(tif.series[0].levels) > osr.level_count)):
            _close_all(closers)
            return None
        if fast and tif is not None:
            _direct_levels(path, tif, osr, levels, cache, closers)
        return Slide(
            path=path, backend="openslide", format=vendor or "unknown",
            vendor=None if vendor in (None, "generic-tiff") else vendor,
            levels=levels, mpp=openslide_mpp(props, vendor),
            associated_images=sorted(osr.associated_images), properties=props,
            downsamples=[float(d) for d in osr.level_downsamples], closers=closers, cache=cache)
    except BaseException:
        _close_all(closers)
        raise


def _close_all(closers: list[Callable[[], None]]) -> None:
    for closer in reversed(closers):
        closer()
