"""Pixel size (um/px) of a slide and where it came from: vendor metadata, TIFF resolution tags,
OME physical sizes, or an estimate from the objective power."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

__all__ = ["MPP_SOURCES", "MAX_PLAUSIBLE_TIFF_MPP", "PixelSize", "UNKNOWN_MPP", "openslide_mpp", "tifffile_mpp"]

MPP_SOURCES = ("metadata", "tiff-resolution", "objective-power", "user", "unknown")
# A TIFF resolution coarser than this is a print/screen DPI (72, 96, 300 dpi ...), not the
# pixel size of a microscope image (even a 1x overview is ~10 um/px).
MAX_PLAUSIBLE_TIFF_MPP = 25.0
_UNIT_TO_UM = {"um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "micron": 1.0, "microns": 1.0,
               "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}
_TIFF_UNIT_UM = {2: 25400.0, 3: 10000.0}  # ResolutionUnit: inch, centimetre


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


def openslide_mpp(props: dict[str, str], vendor: str | None) -> PixelSize:
    """From OpenSlide's properties: its mpp (a TIFF-resolution one only if plausible), else the objective."""
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
    um_per_unit = _TIFF_UNIT_UM.get(unit)
    if um_per_unit is None or not xres or not yres:
        return UNKNOWN_MPP
    return _plausible_tiff_mpp(um_per_unit / xres, um_per_unit / yres)


def _ome_mpp(xml: str | None) -> PixelSize:
    """PhysicalSizeX/Y of the first OME ``Pixels`` element, in any length unit OME allows."""
    if not xml:
        return UNKNOWN_MPP
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return UNKNOWN_MPP
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return UNKNOWN_MPP
    sizes = []
    for axis in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{axis}")
        factor = _UNIT_TO_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if value is None or factor is None:
            return UNKNOWN_MPP
        sizes.append(float(value) * factor)
    return PixelSize(sizes[0], sizes[1], "metadata") if all(s > 0 for s in sizes) else UNKNOWN_MPP


def _imagej_mpp(tif, page) -> PixelSize:
    meta = tif.imagej_metadata or {}
    if str(meta.get("unit", "")).lower() in ("micron", "microns", "um", "µm", "\\u00B5m"):
        try:
            xres, yres = page.resolution
            return PixelSize(1.0 / xres, 1.0 / yres, "metadata")
        except Exception:
            pass
    return UNKNOWN_MPP


def _svs_mpp(page) -> PixelSize:
    """Aperio: ``MPP =`` in the description, else the resolution tags, else ``AppMag =``."""
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


def tifffile_mpp(tif, page) -> PixelSize:
    """From a ``tifffile.TiffFile`` and its level-0 page: OME, ImageJ or Aperio metadata, else the resolution tags."""
    if tif.is_ome:
        found = _ome_mpp(tif.ome_metadata)
        if found.known:
            return found
    if tif.is_imagej:
        found = _imagej_mpp(tif, page)
        if found.known:
            return found
    if tif.is_svs:
        return _svs_mpp(page)
    return _tiff_resolution_mpp(page)
