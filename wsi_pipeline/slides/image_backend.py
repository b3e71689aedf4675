"""The Pillow backend: a camera field or screenshot (PNG, JPEG, ...). The header is read at
open, the pixels on first use, so ``info`` and a missing pixel size cost nothing and a huge
image is refused before decoding."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .levels import ArrayLevel
from .limits import check_whole_image
from .pixel_size import UNKNOWN_MPP
from .pixels import composite_rgba_on_white, to_rgb8
from .slide import Slide

__all__ = ["EXIF_ORIENTED_FORMATS", "open_with_pillow"]

#: formats whose EXIF orientation is applied (PNG's getexif would decode the whole image to look for it)
EXIF_ORIENTED_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP")
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


def _decode_rgb(image) -> np.ndarray:
    """A loaded Pillow image as RGB uint8: 16/32-bit grey scaled down, alpha composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return to_rgb8(np.asarray(image).astype(np.uint16 if image.mode != "I" else np.int32))
    if "A" in image.getbands() or "transparency" in image.info:
        return composite_rgba_on_white(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB"))


def open_with_pillow(path: Path) -> Slide:
    from PIL import Image, ImageOps

    with warnings.catch_warnings():  # our own cap (MAX_WHOLE_IMAGE_PIXELS) decides, in one line
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    with image:
        fmt = (image.format or path.suffix.lstrip(".") or "image").lower()
        info = {f"pillow.{k}": str(v) for k, v in image.info.items()
                if isinstance(v, (str, int, float, tuple)) and len(str(v)) < 200}
        width, height = image.size
        oriented = image.format in EXIF_ORIENTED_FORMATS
        if oriented and image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width

    def load() -> np.ndarray:
        check_whole_image(path, width, height)
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            if oriented:
                image = ImageOps.exif_transpose(image)  # camera JPEGs: show them upright
            arr = np.ascontiguousarray(_decode_rgb(image))
        if arr.shape[:2] != (height, width):
            raise ValueError(f"decoded {arr.shape[1]} x {arr.shape[0]} px, header said {width} x {height}")
        return arr

    return Slide(path=path, backend="pillow", format="jpeg" if fmt == "mpo" else fmt, vendor=None,
                 levels=[ArrayLevel(width, height, load)], mpp=UNKNOWN_MPP, associated_images=[],
                 properties=info)
