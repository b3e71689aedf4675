"""Stain presets: the thresholds of the foreground rules per stain (Pap, Romanowsky, H&E)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import WsiTriageError

__all__ = ["StainPreset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class StainPreset:
    """Thresholds for one stain family.

    ``od_threshold``: mean optical density above the local background (-log10(I/I0), averaged
    over R, G, B) above which a pixel is stained. ``saturation_threshold``: chroma
    (max-min)/max of the background-normalised colour above which a pixel is stained even if
    pale (pale cytoplasm is coloured before it is dark). ``min_object_um``: smallest object kept
    (diameter, um); smaller specks are dust. ``min_foreground``: default minimum tile foreground
    fraction for the tiler (and the whole-image keep/reject cut). ``max_hole_um``: holes up to
    this diameter inside objects are filled (red-cell central pallor, vacuoles). ``close_um``:
    radius of the closing that joins the faint rim of a cell to its body. ``reject_pen``: remove
    marker ink (:func:`pen_mask`) and a ``pen_margin_um`` band around it (the blurred fringe of
    an out-of-focus stroke is otherwise read as pale stain).
    """

    name: str
    od_threshold: float
    saturation_threshold: float
    min_object_um: float
    min_foreground: float
    max_hole_um: float = 6.0
    close_um: float = 0.5
    reject_pen: bool = True
    pen_margin_um: float = 20.0


# Thresholds: glass pixels scatter around OD ~0.01 and saturation ~0.02-0.03 after the background
# correction (JPEG noise, measured on the smear fields); the thresholds sit 4-6x above that, just
# low enough for pale Romanowsky red cells (median OD ~0.04, rims 0.06-0.09).
PRESETS: dict[str, StainPreset] = {
    # Papanicolaou: cyanophilic (blue-green) and orangeophilic cytoplasm can be very pale; nuclei
    # are dark. The smallest relevant object is a bare nucleus or a lymphocyte (~5 um).
    "pap": StainPreset("pap", od_threshold=0.05, saturation_threshold=0.08, min_object_um=5.0,
                       min_foreground=0.05),
    # Romanowsky (Diff-Quik, May-Gruenwald-Giemsa, Wright-Giemsa): red cells are pale pink-grey,
    # barely darker than the glass; platelets (2-3 um) are dust-sized and are not tiled for.
    "romanowsky": StainPreset("romanowsky", od_threshold=0.04, saturation_threshold=0.06,
                              min_object_um=4.0, min_foreground=0.05),
    # H&E (cell blocks, tissue fragments): eosin makes everything pink and fairly saturated.
    "he": StainPreset("he", od_threshold=0.06, saturation_threshold=0.10, min_object_um=6.0,
                      min_foreground=0.10),
}


def get_preset(stain: str | StainPreset) -> StainPreset:
    """Return the preset named ``stain`` (a :class:`StainPreset` is returned unchanged)."""
    if isinstance(stain, StainPreset):
        return stain
    key = str(stain).strip().lower()
    if key not in PRESETS:
        raise WsiTriageError(
            f"unknown stain preset {stain!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]
