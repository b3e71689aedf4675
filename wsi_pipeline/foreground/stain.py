"""Which stain family a slide is: Pap, Romanowsky (Diff-Quik, MGG, Giemsa) or H&E.

Decided from the low-resolution overview the tiler already has, in two steps with plain rules
(the evidence is recorded with the decision, so a user can see why):

1. **H&E** when most of the foreground lies in large connected sheets
   (``SHEET_MIN_MM2`` or more each): tissue sections fill the glass, cytology preparations are
   cells and cell groups on it. This needs a slide-scale view; a single camera field is too
   small to show it and is judged by colour alone.
2. **Pap** versus **Romanowsky** by colour in optical density (OD). Pap's Light Green SF
   (cyanophilic cytoplasm) and hematoxylin absorb red strongly; Romanowsky stains make
   pink-purple cells and red cells that absorb green and blue and let red through. Pap when the
   mean OD direction of the stained pixels (less the ink-coloured regions the pen rule spared:
   a blue stroke across a blood smear reads as cyanophilic stain) has a red share of at least
   ``RED_SHARE_PAP`` and either exceeds its blue share by ``RED_MINUS_BLUE_PAP`` or has a blue
   share of at most ``BLUE_SHARE_PAP``; or when the nucleated cells themselves (within
   ``wsi_pipeline.foreground.nuclei.CELL_RADIUS_UM`` of a nucleus) pass green
   (``CELL_GREEN_SHARE_PAP``), which keeps a blood-rich Pap smear Pap. Thresholds set on tuning
   material (even-numbered Pap LBC fields, every 8th BCCD field, synthetic smears of both stains
   with seeds 11-19 of ``benchmarks/eval_foreground.py``), measured on the rest by that script.
   Single PBC cell crops (one MGG cell filling the picture, no red cells) mostly read as Pap
   (13 of 16 sampled): the rule is for slides and fields, not for one-cell images.

Every figure behind a decision is recorded with it (``StainDecision.evidence``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

__all__ = ["StainDecision", "STAINS", "SHEET_MIN_MM2", "RED_SHARE_PAP", "RED_MINUS_BLUE_PAP", "BLUE_SHARE_PAP",
           "CELL_GREEN_SHARE_PAP",
           "classify_stain",
           "sheet_share", "stain_evidence"]

STAINS = ("pap", "romanowsky", "he")
#: a connected foreground component at least this large (mm^2) is a tissue sheet
SHEET_MIN_MM2 = 0.1
#: H&E when at least this share of the foreground is in sheets
SHEET_SHARE_HE = 0.5
#: Pap when the red share of the mean OD direction reaches this (and one of the next two holds).
#: Tuning fields: BCCD red share 0.14-0.25, Pap LBC 0.23-0.53 (0.23: the one Pap field missed,
#: NILM_08); synthetic Romanowsky smears (PBC cells in their own peach white balance) 0.30-0.31,
#: synthetic Pap 0.21-0.34 (blood-rich: the cells' rule below decides them).
RED_SHARE_PAP = 0.26
#: ... and the red share exceeds the blue share by at least this: hematoxylin and Light Green
#: absorb red, Romanowsky red cells absorb blue. Tuning: synthetic Romanowsky smears -0.035 to
#: +0.034 (blue share 0.28-0.33), Pap fields with a blue share above ``BLUE_SHARE_PAP`` +0.065
#: (SCC_12) and more. The previous -0.02 was set when the renderer lit the glass neutral (its MGG
#: smears then read red 0.26-0.29, blue 0.34-0.36); on the current renderer's smears (red - blue
#: up to +0.064 with ink, +0.038 without) it called most synthetic Romanowsky smears Pap (all 80
#: of benchmarks/eval_triage.py).
RED_MINUS_BLUE_PAP = 0.05
#: ... or the blue share is at most this: NILM Pap fields (dense squamous sheets, little blue
#: absorbed) have red - blue of only -0.01 to +0.05 but a blue share of 0.22-0.25; the synthetic
#: Romanowsky smears' blue share is 0.28-0.33 (tuning gap 0.240-0.276; 0.255 near its middle. The
#: held-out synthetic Romanowsky smears reach down to 0.269: a thin margin).
BLUE_SHARE_PAP = 0.255
#: pixels whose summed OD (R+G+B) is below this carry too little colour to judge
MIN_OD_SUM = 0.15
#: ... or when the nucleated cells' own OD (ink-coloured regions included: they hold nuclei) has
#: at most this green share (cyanophilic cells pass green), judged when they cover at least
#: ``MIN_CELL_PX`` coloured pixels: a blood-rich Pap smear is mostly orange-red cells overall, its
#: nucleated cells are not. Tuning: synthetic Pap smears 0.26-0.30, synthetic Romanowsky
#: 0.38-0.43 (0.34 the middle), BCCD 0.47-0.59; real Pap fields 0.32-0.50 (they are decided by
#: the overall colour). The previous 0.40 called the 60,000 px quick-start smear Pap (0.39).
CELL_GREEN_SHARE_PAP = 0.34
MIN_CELL_PX = 200


@dataclass(frozen=True)
class StainDecision:
    """The stain chosen for a slide and the figures it was chosen from."""

    stain: str
    reason: str
    evidence: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"stain": self.stain, "reason": self.reason, "evidence": dict(self.evidence)}


def sheet_share(mask: np.ndarray, mpp: float) -> float:
    """Share of the foreground ``mask`` (pixel size ``mpp`` um) in connected sheets of at least
    ``SHEET_MIN_MM2``. Measure it on the mask itself, not on a subsampled copy (subsampling
    joins the cells of a dense smear into false sheets)."""
    lab, n = ndi.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3), bool))
    if n == 0:
        return 0.0
    # counted in row bands: bincount casts its input to int64 (a 450 MB copy of a 7,500 px overview)
    step = max(1, (1 << 22) // max(lab.shape[1], 1))
    count = np.zeros(n + 1, np.int64)
    for r0 in range(0, lab.shape[0], step):
        count += np.bincount(lab[r0:r0 + step].ravel(), minlength=n + 1)
    area_mm2 = count[1:] * float(mpp) ** 2 * 1e-6
    return float(area_mm2[area_mm2 >= SHEET_MIN_MM2].sum() / max(area_mm2.sum(), 1e-12))


def stain_evidence(od: np.ndarray, mask: np.ndarray, sheets: float, cells: np.ndarray | None = None,
                   ink: np.ndarray | None = None) -> dict:
    """The figures :func:`classify_stain` decides on.

    ``od``: (H, W, 3) optical density above the glass; ``mask``: the foreground on the same grid;
    ``sheets``: :func:`sheet_share` of the foreground; ``cells``: where the nucleated cells are;
    ``ink``: ink-coloured foreground the pen rule kept because it holds nuclei (left out of the
    overall colour, kept in the cells' colour: it is either a cell's cyanophilic cytoplasm or
    ink over a cell, and only the cells' own colour can tell which stain made it).
    Returns the mean OD direction (red, green, blue shares) of the coloured foreground (less
    ``ink``) and of the coloured nucleated cells (None when they hold fewer than ``MIN_CELL_PX``
    such pixels), the share of the foreground in sheets, and the pixel counts behind them.
    """
    mask = np.asarray(mask, dtype=bool)
    ink = np.zeros_like(mask) if ink is None else np.asarray(ink, dtype=bool) & mask
    direction, n_coloured = _mean_direction(od, mask & ~ink)
    cell_direction, n_cell = None, 0
    if cells is not None:
        cell_direction, n_cell = _mean_direction(od, mask & cells)
    return {
        "od_direction": [round(float(x), 4) for x in direction],
        "ink_px_left_out": int(ink.sum()),
        "sheet_share": round(float(sheets), 4),
        "foreground_share": round(float(mask.mean()) if mask.size else 0.0, 4),
        "coloured_px": n_coloured,
        "cell_od_direction": ([round(float(x), 4) for x in cell_direction]
                              if cell_direction is not None and n_cell >= MIN_CELL_PX else None),
        "cell_px": n_cell,
    }


def _mean_direction(od: np.ndarray, where: np.ndarray) -> tuple[np.ndarray, int]:
    v = np.maximum(np.asarray(od, dtype=np.float32)[where], 0.0)
    total = v.sum(axis=1)
    coloured = total >= MIN_OD_SUM
    if not coloured.any():
        return np.full(3, 1.0 / 3.0), 0
    return (v[coloured] / total[coloured, None]).mean(axis=0), int(coloured.sum())


def classify_stain(od: np.ndarray, mask: np.ndarray, sheets: float, cells: np.ndarray | None = None,
                   ink: np.ndarray | None = None) -> StainDecision:
    """Pap, Romanowsky or H&E for an overview with OD ``od``, foreground ``mask``, sheet share
    ``sheets``, nucleated cells ``cells`` and spared ink ``ink`` (see module doc and
    :func:`stain_evidence`)."""
    ev = stain_evidence(od, mask, sheets, cells, ink)
    if ev["coloured_px"] == 0:
        return StainDecision("pap", "no stained pixels to judge; default pap", ev)
    if ev["sheet_share"] >= SHEET_SHARE_HE:
        return StainDecision("he", f"{100 * ev['sheet_share']:.0f} % of the foreground lies in sheets of "
                                   f">= {SHEET_MIN_MM2:g} mm^2 (tissue)", ev)
    red, _, blue = ev["od_direction"]
    if red >= RED_SHARE_PAP and red - blue >= RED_MINUS_BLUE_PAP:
        return StainDecision("pap", f"red share of the stain's optical density {red:.2f} >= {RED_SHARE_PAP} and "
                                    f"above its blue share by {red - blue:.2f} >= {RED_MINUS_BLUE_PAP} "
                                    "(hematoxylin / Light Green absorb red)", ev)
    if red >= RED_SHARE_PAP and blue <= BLUE_SHARE_PAP:
        return StainDecision("pap", f"red share of the stain's optical density {red:.2f} >= {RED_SHARE_PAP} and "
                                    f"blue share {blue:.2f} <= {BLUE_SHARE_PAP} (hematoxylin / Light Green absorb red; "
                                    "Romanowsky red cells absorb blue)", ev)
    cell = ev["cell_od_direction"]
    if cell is not None and cell[1] <= CELL_GREEN_SHARE_PAP:
        return StainDecision("pap", f"green share of the nucleated cells' optical density {cell[1]:.2f} <= "
                                    f"{CELL_GREEN_SHARE_PAP} (cyanophilic cytoplasm passes green; a blood-rich "
                                    "field's red cells outweigh it overall)", ev)
    why = (f"red share of the stain's optical density {red:.2f} < {RED_SHARE_PAP}" if red < RED_SHARE_PAP else
           f"red share {red:.2f} but blue share {blue:.2f} (> {BLUE_SHARE_PAP}, red - blue {red - blue:.2f} "
           f"< {RED_MINUS_BLUE_PAP})")
    cells_why = ("" if cell is None else f", nucleated cells' green share {cell[1]:.2f} > {CELL_GREEN_SHARE_PAP}")
    return StainDecision("romanowsky", f"{why}{cells_why}: pink-purple cells and red cells let red through", ev)
