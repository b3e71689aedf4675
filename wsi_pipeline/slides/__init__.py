"""Slide reading: backends (OpenSlide, tifffile, plain images), pixel size, the tiled-TIFF reader."""

from __future__ import annotations

from .reader import (MPP_SOURCES, MAX_PLAUSIBLE_TIFF_MPP, DEFAULT_TILE_CACHE_BYTES, MAX_LEVEL_SIDE,
    MAX_SLIDE_MM, MAX_WHOLE_IMAGE_PIXELS, MIN_BYTES_PER_PIXEL, MULTI_FILE_SUFFIXES, PixelSize, UNKNOWN_MPP,
    read_budget, Slide, EXIF_ORIENTED_FORMATS, open_slide, slide_info, fingerprint)

__all__ = ['MPP_SOURCES', 'MAX_PLAUSIBLE_TIFF_MPP', 'DEFAULT_TILE_CACHE_BYTES', 'MAX_LEVEL_SIDE',
    'MAX_SLIDE_MM', 'MAX_WHOLE_IMAGE_PIXELS', 'MIN_BYTES_PER_PIXEL', 'MULTI_FILE_SUFFIXES', 'PixelSize',
    'UNKNOWN_MPP', 'read_budget', 'Slide', 'EXIF_ORIENTED_FORMATS', 'open_slide', 'slide_info',
    'fingerprint']
