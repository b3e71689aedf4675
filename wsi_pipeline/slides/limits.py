"""What a plausible slide is: headers claiming more are damaged or hostile and are refused
before any pixel is decoded (issue 12)."""

from __future__ import annotations

from pathlib import Path

from ..errors import SlideError

__all__ = ["MAX_LEVEL_SIDE", "MAX_SLIDE_MM", "MAX_WHOLE_IMAGE_PIXELS", "MIN_BYTES_PER_PIXEL",
           "MULTI_FILE_SUFFIXES", "check_whole_image", "check_claimed_size"]

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


def check_whole_image(path: Path, width: int, height: int) -> None:
    """Refuse, before decoding, an image that would be decoded whole into more than the pixel cap."""
    if width * height > MAX_WHOLE_IMAGE_PIXELS:
        raise SlideError(f"{path}: a {width} x {height} px image stored without tiles would be decoded whole "
                         f"({width * height / 1e6:.0f} Mpx > {MAX_WHOLE_IMAGE_PIXELS / 1e6:.0f} Mpx); "
                         "convert it to a tiled pyramidal TIFF")


def check_claimed_size(shown: str, path: Path, file_size: int, level_dimensions: list[tuple[int, int]]) -> None:
    """Refuse a header claiming a level beyond any scanner, or a gigapixel image in too few bytes."""
    dims = level_dimensions[0]
    pixels = dims[0] * dims[1]
    if max(max(d) for d in level_dimensions) > MAX_LEVEL_SIDE or min(dims) < 1:
        raise SlideError(f"{shown}: header claims a {dims[0]} x {dims[1]} px image, beyond any scanner "
                         f"(max {MAX_LEVEL_SIDE} px a side): damaged or hostile file")
    if (pixels > 1e9 and path.suffix.lower() not in MULTI_FILE_SUFFIXES
            and file_size < pixels * MIN_BYTES_PER_PIXEL):
        raise SlideError(f"{shown}: header claims a {dims[0]} x {dims[1]} px image ({pixels / 1e9:.0f} Gpx) stored "
                         f"in {file_size / 1e6:.1f} MB: damaged or hostile file")
