"""Which stain family a slide is: Pap, Romanowsky (Diff-Quik, MGG, Giemsa) or H&E.

Decided from the low-resolution overview the tiler already has, in two steps with plain rules
(the evidence is recorded with the decision, so a user can see why):

1. **H&E** when most of the foreground lies in large connected sheets
   (``SHEET_MIN_MM2`` or more each): tissue sections fill the glass, cytology preparations are
   cells and cell groups on it. This needs a slide-scale view; a single camera field is too
   small to show it and is judged by colour alone.
2. **Pap** versus **Romanowsky** by the colour of the nucleated cells (the stained pixels within
   ``CELL_RADIUS_UM`` of a nucleus; all stained pixels when there are too few) in optical density (OD):
   the share of red in the mean OD direction. Pap's Light Green SF (cyanophilic cytoplasm) and
   hematoxylin absorb red strongly; Romanowsky stains and eosin make pink-purple cells and red
   cells that absorb green and blue and let red through. Threshold set on tuning fields (every
   even-numbered Pap LBC field and BCCD smear field, see ``benchmarks/eval_foreground.py``),
   measured on the others.

Ambiguous colour (close to the threshold) keeps ``pap``, the stain this tool is meant for and
the preset whose ink rule is the most careful.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

__all__ = ["StainDecision", "STAINS", "SHEET_MIN_MM2", "RED_SHARE_PAP", "classify_stain", "stain_evidence"]

STAINS = ("pap", "romanowsky", "he")
#: a connected foreground component at least this large (mm^2) is a tissue sheet
SHEET_MIN_MM2 = 0.1
#: H&E when at least this share of the foreground is in sheets
SHEET_SHARE_HE = 0.5
#: Pap when the red share of the mean OD direction reaches this. On the tuning fields (even-numbered
#: Pap LBC and BCCD fields) 0.26 misses 1/40 Pap fields and calls 3/182 Romanowsky fields Pap;
#: 0.27 errs 1 + 1 but misses Pap sooner, and a missed Pap is the costlier error.
#: ``benchmarks/eval_foreground.py`` prints the figures on the other half.
RED_SHARE_PAP = 0.26
#: pixels whose summed OD (R+G+B) is below this carry too little colour to judge
MIN_OD_SUM = 0.15
#: the colour is judged on the nucleated cells when they cover at least this many pixels
MIN_CELL_PX = 200
#: radius (um) around a nucleus taken as its cell
CELL_RADIUS_UM = 8.0


@dataclass(frozen=True)
class StainDecision:
    """The stain chosen for a slide and the figures it was chosen from."""

    stain: str
    reason: str
    evidence: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"stain": self.stain, "reason": self.reason, "evidence": dict(self.evidence)}


def stain_evidence(od: np.ndarray, mask: np.ndarray, mpp: float, cells: np.ndarray | None = None) -> dict:
    """The figures :func:`classify_stain` decides on.

    ``od``: (H, W, 3) optical density above the glass; ``mask``: the foreground; ``mpp``: pixel
    size (um); ``cells``: where the nucleated cells are (the colour is judged there when it holds
    at least ``MIN_CELL_PX`` coloured pixels, so that red cells and blood, common in any
    preparation, do not outvote the cells). Returns the mean OD direction (red, green, blue
    shares), the share of the foreground in sheets, and the pixel counts behind them.
    """
    mask = np.asarray(mask, dtype=bool)
    judged = mask
    if cells is not None and np.count_nonzero(mask & cells) >= MIN_CELL_PX:
        judged = mask & cells
    v = np.maximum(np.asarray(od, dtype=np.float32)[judged], 0.0)
    total = v.sum(axis=1)
    coloured = total >= MIN_OD_SUM
    if coloured.any():
        direction = (v[coloured] / total[coloured, None]).mean(axis=0)
    else:
        direction = np.full(3, 1.0 / 3.0)
    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    sheet_share = 0.0
    if n:
        area_mm2 = np.bincount(lab.ravel())[1:] * float(mpp) ** 2 * 1e-6
        sheet_share = float(area_mm2[area_mm2 >= SHEET_MIN_MM2].sum() / max(area_mm2.sum(), 1e-12))
    return {
        "od_direction": [round(float(x), 4) for x in direction],
        "sheet_share": round(sheet_share, 4),
        "foreground_share": round(float(mask.mean()) if mask.size else 0.0, 4),
        "coloured_px": int(coloured.sum()),
        "judged_on": "cells" if judged is not mask else "foreground",
        "mpp": round(float(mpp), 4),
    }


def classify_stain(od: np.ndarray, mask: np.ndarray, mpp: float, cells: np.ndarray | None = None) -> StainDecision:
    """Pap, Romanowsky or H&E for an overview with OD ``od``, foreground ``mask`` and nucleated
    cells ``cells`` (see module doc and :func:`stain_evidence`)."""
    ev = stain_evidence(od, mask, mpp, cells)
    if ev["coloured_px"] == 0:
        return StainDecision("pap", "no stained pixels to judge; default pap", ev)
    if ev["sheet_share"] >= SHEET_SHARE_HE:
        return StainDecision("he", f"{100 * ev['sheet_share']:.0f} % of the foreground lies in sheets of "
                                   f">= {SHEET_MIN_MM2:g} mm^2 (tissue)", ev)
    red = ev["od_direction"][0]
    if red >= RED_SHARE_PAP:
        return StainDecision("pap", f"red share of the stain's optical density {red:.2f} >= {RED_SHARE_PAP} "
                                    "(hematoxylin / Light Green absorb red)", ev)
    return StainDecision("romanowsky", f"red share of the stain's optical density {red:.2f} < {RED_SHARE_PAP} "
                                       "(pink-purple cells let red through)", ev)
