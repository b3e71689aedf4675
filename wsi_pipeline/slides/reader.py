"""Opening a slide: the three backends tried in order (OpenSlide, tifffile, Pillow), the file
and header checks that make a bad input one line, ``slide_info`` and ``fingerprint``."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
from pathlib import Path

from ..errors import OptionError, SlideError
from .image_backend import open_with_pillow
from .limits import check_claimed_size
from .openslide_backend import open_with_openslide
from .pixel_size import PixelSize
from .slide import Slide, short_reason
from .tiff_backend import open_with_tifffile
from .tiff_tiles import DEFAULT_TILE_CACHE_BYTES, TileCache

__all__ = ["open_slide", "slide_info", "fingerprint"]

_MIB = 1024 * 1024


def open_slide(path: str | Path, mpp: float | None = None, *, fast: bool = True,
               tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES) -> Slide:
    """Open a slide or field of view with the first backend that reads it.

    ``mpp`` overrides the pixel size (source ``user``); ``fast=False`` reads every level
    through OpenSlide's renderer (for comparison)."""
    shown = str(path)
    path = Path(path)
    if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise OptionError("mpp", f"must be a positive number of um/px, got {mpp}")
    size = _readable_file_size(path, shown)
    with _quiet_tifffile():  # its complaints about a damaged file would break the one-line error
        slide = _open_with_first_backend(path, shown, fast, TileCache(tile_cache_bytes))
    try:
        check_claimed_size(shown, path, size, slide.level_dimensions)
    except SlideError:
        slide.close()
        raise
    if mpp is not None:
        slide.mpp = PixelSize(float(mpp), float(mpp), "user")
    return slide


def _readable_file_size(path: Path, shown: str) -> int:
    """The size of a non-empty regular file we may read, else a one-line SlideError saying why not."""
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
    return size


@contextlib.contextmanager
def _quiet_tifffile():
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _open_with_first_backend(path: Path, shown: str, fast: bool, cache: TileCache) -> Slide:
    """OpenSlide, then tifffile, then Pillow; the reason of each refusal goes into the error."""
    backends = (("openslide", lambda: open_with_openslide(path, fast, cache)),
                ("tifffile", lambda: open_with_tifffile(path, cache)),
                ("pillow", lambda: open_with_pillow(path)))
    reasons: list[str] = []
    for name, attempt in backends:
        try:
            slide = attempt()
        except Exception as exc:
            reasons.append(f"{name}: {short_reason(exc, str(path))}")
            continue
        if slide is not None:
            return slide
        reasons.append(f"{name}: deferred to tifffile (SubIFD pyramid or OME-TIFF)")
    raise SlideError(f"{shown}: not a readable slide ({'; '.join(reasons)})")


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
