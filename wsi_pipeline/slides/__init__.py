"""Slide reading: backends (OpenSlide, tifffile, plain images), pixel size, the tiled-TIFF reader.

Modules: ``reader`` (open_slide, slide_info, fingerprint), ``slide`` (the Slide), ``pixel_size``,
``limits`` (hostile-header rules), ``budget`` (per-slide read deadline), the backends
``openslide_backend``, ``tiff_backend``, ``image_backend``, the tiled-TIFF reader ``tiff_tiles``,
and ``levels``/``pixels`` they share.
"""

from __future__ import annotations

from .budget import read_budget
from .image_backend import EXIF_ORIENTED_FORMATS
from .limits import (MAX_LEVEL_SIDE, MAX_SLIDE_MM, MAX_WHOLE_IMAGE_PIXELS, MIN_BYTES_PER_PIXEL,
                     MULTI_FILE_SUFFIXES)
from .pixel_size import MAX_PLAUSIBLE_TIFF_MPP, MPP_SOURCES, UNKNOWN_MPP, PixelSize
from .reader import fingerprint, open_slide, slide_info
from .slide import Slide
from .tiff_tiles import DEFAULT_TILE_CACHE_BYTES

__all__ = ['MPP_SOURCES', 'MAX_PLAUSIBLE_TIFF_MPP', 'DEFAULT_TILE_CACHE_BYTES', 'MAX_LEVEL_SIDE',
    'MAX_SLIDE_MM', 'MAX_WHOLE_IMAGE_PIXELS', 'MIN_BYTES_PER_PIXEL', 'MULTI_FILE_SUFFIXES', 'PixelSize',
    'UNKNOWN_MPP', 'read_budget', 'Slide', 'EXIF_ORIENTED_FORMATS', 'open_slide', 'slide_info',
    'fingerprint']
