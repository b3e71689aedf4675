"""The tifffile backend: TIFFs that OpenSlide refuses or under-reads (flat or stripped TIFF,
OME-TIFF, SubIFD pyramids). Chunky pages go through the tiled-TIFF reader; any other layout
(planar, palette, multi-page, volumetric) is decoded whole by tifffile, within the pixel cap."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .levels import ArrayLevel, LevelReader
from .limits import check_whole_image
from .pixel_size import tifffile_mpp
from .pixels import to_rgb8
from .slide import Slide
from .tiff_tiles import FileReader, SegmentLevel, TileCache, TruncatedError

__all__ = ["open_with_tifffile"]

_ASSOCIATED = ("label", "macro", "thumbnail", "overview")
_PHOTOMETRIC_PALETTE = 3


def _series_level_array(level) -> np.ndarray:
    """A tifffile series level as (h, w, samples): first index of T/Z/..., channels last."""
    arr = level.asarray()
    axes = level.axes
    keep = []
    for axis in axes:
        if axis not in "YXSC":
            arr = arr.take(0, axis=len(keep))
        else:
            keep.append(axis)
    order = [keep.index(a) for a in "YX"] + [i for i, a in enumerate(keep) if a in "CS"]
    arr = arr.transpose(order)
    if arr.ndim == 4:  # C and S both present
        arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    return arr


def _chunky(level) -> bool:
    """One page of interleaved (or single) samples with segments: the tiled-TIFF reader's layout."""
    page = level.keyframe
    return (len(level.pages) == 1 and page.axes in ("YX", "YXS")
            and (int(page.planarconfig) == 1 or int(page.samplesperpixel) == 1)
            and int(getattr(page, "imagedepth", 1)) == 1 and int(page.photometric) != _PHOTOMETRIC_PALETTE
            and len(page.dataoffsets) > 0)


def _whole_level(path: Path, level) -> ArrayLevel:
    """A level tifffile decodes whole on first read (palette mapped to RGB, min-is-white inverted)."""
    page = level.keyframe
    width, height = int(page.imagewidth), int(page.imagelength)
    miniswhite = int(page.photometric) == 0
    colormap = page.colormap if int(page.photometric) == _PHOTOMETRIC_PALETTE else None

    def load() -> np.ndarray:
        check_whole_image(path, width, height)
        arr = _series_level_array(level)
        if colormap is not None:  # palette image: indices -> RGB
            arr = np.moveaxis(np.asarray(colormap)[:, arr.squeeze()], 0, -1)
        return to_rgb8(arr, miniswhite=miniswhite)

    return ArrayLevel(width, height, load)


def _properties(tif, page0) -> dict[str, str]:
    props = {"tifffile.series-axes": tif.series[0].axes, "tifffile.compression": str(page0.compression.name)}
    for name in ("XResolution", "YResolution", "ResolutionUnit", "Software"):
        tag = page0.tags.get(name)
        if tag is not None:
            props[f"tiff.{name}"] = str(tag.value)
    if page0.description:
        props["tiff.ImageDescription"] = page0.description[:2000]
    return props


def open_with_tifffile(path: Path, cache: TileCache) -> Slide:
    import tifffile

    tif = tifffile.TiffFile(str(path))
    closers: list[Callable[[], None]] = [tif.close]
    try:
        if not tif.series or not tif.series[0].levels:
            raise ValueError("no image in the TIFF")
        series = tif.series[0]
        reader: FileReader | None = None
        levels: list[LevelReader] = []
        for index, level in enumerate(series.levels):
            if "Y" not in level.axes or "X" not in level.axes:
                raise ValueError(f"series axes {level.axes!r} have no Y/X plane")
            direct: LevelReader | None = None
            if _chunky(level):
                try:
                    if reader is None:
                        reader = FileReader(path)
                        closers.append(reader.close)
                    direct = SegmentLevel(level.keyframe, reader, cache, key=index)
                except TruncatedError:
                    raise
                except Exception:
                    direct = None  # a layout the segment reader does not take: tifffile decodes it whole
            levels.append(direct or _whole_level(path, level))
        levels.sort(key=lambda lv: -lv.width * lv.height)
        page0 = series.levels[0].keyframe
        associated = sorted({s.name.lower() for s in tif.series[1:] if s.name and s.name.lower() in _ASSOCIATED})
        return Slide(path=path, backend="tifffile", format="ome-tiff" if tif.is_ome else "tiff",
                     vendor=None, levels=levels, mpp=tifffile_mpp(tif, page0),
                     associated_images=associated, properties=_properties(tif, page0),
                     closers=closers, cache=cache)
    except BaseException:
        for closer in reversed(closers):
            closer()
        raise
