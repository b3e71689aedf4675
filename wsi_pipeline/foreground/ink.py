"""Pen-ink rules: which coloured regions are marker ink and not stain, decided by shape and by the
absence of nuclei (docs/foreground.md, issue #9)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .nuclei import (CELL_RADIUS_UM, MIN_CONTRAST, MIN_DENSITY, Nuclei, centre_pixels, keep_nuclei,
    nuclear_density, own_density)
from .colour_codes import _LOOSE, _SEED
from .morphology import _dilate_local, _remove_small
from .parallel import _boxes
from .tile_measures import tile_fractions

__all__ = ["INK_TILE_SHARE", "ink_tiles"]

#: a tile with at least this share of its area removed as ink (on the mask grid, with the
#: stroke's margin) and no nucleus is dropped, whatever its foreground fraction: what passes the
#: fraction there is red cells and debris beside or under the stroke. Ink too dense to see a
#: nucleus through (ForegroundResult.ink_opaque: black marker) counts like any other: a cell
#: under it cannot be seen by the model either, so such a tile is dropped unless a nucleus is
#: found in its part off the ink (issue #9; the tiler records the count as ink_tiles_dropped)
INK_TILE_SHARE = 0.6


def ink_tiles(ink: np.ndarray, downsample: float, boxes: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Which tiles (``boxes``: level-0 x, y, w, h) lie on marker ink and are dropped: at least
    :data:`INK_TILE_SHARE` of the tile on ink (``ink``, on the mask grid of ``downsample`` level-0
    px per pixel) and no nucleus (``nuclei``: count per tile).

    Opaque ink (ForegroundResult.ink_opaque, a part of ``ink``) is judged like see-through ink. Under see-through
    ink a missing nucleus shows there is none; under opaque ink nothing of the cells is visible,
    to the nucleus finder or to the model, so scoring the tile can only add noise. A nucleus is
    never on ink (the ink rule leaves every nucleus's cell out of it), so a tile's count is the
    nuclei found in its part off the ink, and a tile holding one is kept."""
    return (tile_fractions(ink, downsample, boxes) >= INK_TILE_SHARE) & (nuclei == 0)


# Smallest marker stroke (diameter of an equivalent disc, um); see pen_mask.
_PEN_MIN_UM = 60.0
# Minimum share of confident ink pixels in an ink region (see _pen_from_codes).
_PEN_MIN_SEED_FRACTION = 0.1


# --------------------------------------------------------------------------- pen marks

def _pen_from_codes(codes: np.ndarray, mpp: float | None) -> np.ndarray:
    """Ink regions: connected ink-coloured pixels holding a confident seed (one labelling)."""
    seed = (codes & (_SEED[0] | _SEED[1] | _SEED[2])) != 0
    if not seed.any():
        return np.zeros(codes.shape, dtype=bool)
    allowed = (codes & (_LOOSE[0] | _LOOSE[1] | _LOOSE[2])) != 0  # loose includes seeds
    lab, n = ndi.label(allowed, structure=np.ones((3, 3), bool))
    # ink-coloured pixels are few: count and index only those (not every pixel of the image)
    where = np.flatnonzero(allowed)
    labels = lab.ravel()[where]
    area = np.bincount(labels, minlength=n + 1)
    # a stroke is mostly confidently inked; a stained region reached from a few ink-coloured
    # pixels (a red cell, a black speck) is not
    keep = np.bincount(labels[seed.ravel()[where]], minlength=n + 1) >= _PEN_MIN_SEED_FRACTION * area
    if mpp is not None:  # drop regions smaller than a marker stroke
        keep &= area >= np.pi / 4.0 * (_PEN_MIN_UM / mpp) ** 2
    keep[0] = False
    pen = np.zeros(codes.shape, dtype=bool)
    pen.ravel()[where] = keep[labels]
    return pen


# Ink versus stain (see _ink_regions): an ink-coloured region is Pap cytoplasm, not ink, when
# nuclei cover at least this share of it or it holds this many nuclei per mm^2. Measured (nuclei
# sized at 0.5 um/px): blue-green Pap cell groups of the LBC fields 0.034-0.34 and 510-3700/mm^2;
# marker strokes on glass < 0.001 and < 30/mm^2, strokes over H&E tissue 0.007-0.029, 130-730/mm^2.
_INK_MAX_NUCLEUS_SHARE = 0.03
_INK_MAX_NUCLEI_PER_MM2 = 600.0
# Parts of a nucleated ink-coloured region farther than this (um) from any nucleus are ink when
# they form a stroke-sized blob (see _ink_regions).
_FAR_FROM_NUCLEI_UM = 15.0
# ... and at least this large (diameter of the equivalent disc, um): Pap cytoplasm that far from a
# nucleus comes in pieces far smaller (0 px of ink on the 80 Pap LBC fields), a stroke does not.
_FAR_INK_MIN_UM = 40.0


# Marker strokes are millimetres long (issue #9): an ink-coloured region at least this long (the
# diagonal of its bounding box, um) and at least _STROKE_MIN_ELONGATION times as long as its mean
# width (area / length) has the geometry of a stroke. Only such regions have their nuclei checked
# against the ink under them (see _ink_explained): a cell group is never that long and thin, and
# no Pap LBC field (256 um) holds one.
_STROKE_MIN_LENGTH_UM = 1000.0
_STROKE_MIN_ELONGATION = 3.0
# ... and only strokes whose ink adds nuclear density (the median of min(OD red, OD green) over the
# stroke) of at least a nucleus's least contrast: blue (~0.25), green (~0.17) and black ink can
# make a pale red cell pass for a nucleus, scarlet ink (~0.07: it passes red) cannot.
_INK_MIN_NUCLEAR_DENSITY = MIN_CONTRAST


def _stroke_density(od_rg: np.ndarray, sl: tuple[slice, slice], part: np.ndarray) -> float:
    """The median nuclear density (min of red and green OD) over one ink region (``part`` within
    its box ``sl``): what a layer of that ink adds to everything under it."""
    return float(np.median(nuclear_density(od_rg[(0, *sl)][part], od_rg[(1, *sl)][part])))


def _stroke_shaped(sl: tuple[slice, slice], area_px: float, mpp: float) -> bool:
    length_um = float(np.hypot(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)) * mpp
    width_um = area_px * mpp * mpp / max(length_um, 1e-9)
    return length_um >= _STROKE_MIN_LENGTH_UM and length_um >= _STROKE_MIN_ELONGATION * width_um


def _ink_explained(lab: np.ndarray, n: int, region_of: np.ndarray, area: np.ndarray, nuclei: Nuclei,
                   od_rg: np.ndarray, mpp: float) -> np.ndarray:
    """Nuclei (bool, one per nucleus) that the ink under them explains: in a stroke-shaped region,
    a "nucleus" whose own density (its optical density above the local floor, i.e. with the ink
    under it subtracted; :func:`wsi_pipeline.foreground.nuclei.own_density`) stays below
    ``MIN_DENSITY``.

    Marker ink lies on the coverslip, a transmittance layer: optical densities add. Seen through
    blue or green ink, pale red cells (which absorb red and green a little) reach the nuclear
    density with the ink's own density added, and a dense blood field under a stroke looks like
    thousands of nuclei at 2 um/px. A real nucleus is dense on its own and survives the test.
    """
    out = np.zeros(len(nuclei), dtype=bool)
    boxes = ndi.find_objects(lab)
    for i in range(1, n + 1):
        sl = boxes[i - 1]
        if sl is None or not _stroke_shaped(sl, area[i], mpp):
            continue
        ids = np.flatnonzero(region_of == i)
        if not len(ids):
            continue
        part = lab[sl] == i
        if _stroke_density(od_rg, sl, part) < _INK_MIN_NUCLEAR_DENSITY:
            continue
        out[ids] = own_density(od_rg, nuclei, ids, mpp) < MIN_DENSITY
    return out


def _near_nuclei(nuclei: Nuclei, mpp: float, radius_um: float = CELL_RADIUS_UM,
                 within: np.ndarray | None = None) -> np.ndarray:
    """Within ``radius_um`` of a nucleus (by default its cell: never ink), as a distance: a disc
    around every nucleus pixel, not the square of a separable dilation (whose corners reach
    ``radius_um`` * 1.41 and kept 15-um squares of a stroke around every pale cell under it).

    With ``within`` (bool, same shape), the answer is only needed there: it is computed in the
    boxes covering ``within`` (each with the distance's context), exact wherever ``within`` is
    True and False outside the boxes; an overview holds tens of thousands of nuclei, an ink
    stroke covers a small part of it."""
    if not len(nuclei):
        return np.zeros(nuclei.labels.shape, dtype=bool)
    r = max(1, int(round(radius_um / mpp)))
    if within is None:
        within = _dilate_local(nuclei.mask, r)  # the square holds the disc
    h, w = within.shape
    out = np.zeros((h, w), dtype=bool)
    for r0, r1, c0, c1 in _boxes(within, 2 * r):
        p0, p1, q0, q1 = max(0, r0 - r), min(h, r1 + r), max(0, c0 - r), min(w, c1 + r)
        away = nuclei.labels[p0:p1, q0:q1] == 0
        if away.all():
            continue
        near = ndi.distance_transform_edt(away) <= r
        out[r0:r1, c0:c1] = near[r0 - p0:r1 - p0, c0 - q0:c1 - q0]
    return out


def _ink_regions(codes: np.ndarray, nuclei: Nuclei, mpp: float, size_filter: bool = True,
                 od_rg: np.ndarray | None = None):
    """(ink, spared, nuclei): ink-coloured regions that are marker ink, those that are not, and the
    nuclei that remain once those the ink explains are dropped.

    Colour alone cannot tell ink from Pap stain: Light Green SF colours cyanophilic cytoplasm
    blue-green, the hue of green and blue markers. Marker ink lies on the coverslip as wide,
    uniform strokes with no nuclei of its own; stained cells come with nuclei and texture. So a
    region found by the colour rules (:func:`_pen_from_codes`) is ink only when nuclei cover
    less than ``_INK_MAX_NUCLEUS_SHARE`` of it and it holds fewer than ``_INK_MAX_NUCLEI_PER_MM2``
    nuclei.
    Within an accepted stroke, the cell around any nucleus it crosses is still not ink.

    With ``od_rg`` (red and green OD above the glass, (2, H, W)), nuclei in stroke-shaped regions
    that are only red cells or debris seen through the ink (:func:`_ink_explained`) do not count;
    when their region is then judged ink they are dropped from the nuclei returned. In a region
    that stays stain every nucleus counts and is kept, so a cell group is never judged on fewer
    nuclei than it has.
    """
    cand = _pen_from_codes(codes, mpp if size_filter else None)
    if not cand.any():
        return cand, cand, nuclei
    lab, n = ndi.label(cand, structure=np.ones((3, 3), bool))
    where = np.flatnonzero(cand)
    labels = lab.ravel()[where]
    area = np.bincount(labels, minlength=n + 1).astype(np.float64)
    region_of = lab[centre_pixels(nuclei.centres, lab.shape)] if len(nuclei) else np.zeros(0, np.int64)
    explained = np.zeros(len(nuclei), dtype=bool)
    if od_rg is not None and len(nuclei):
        explained = _ink_explained(lab, n, region_of, area, nuclei, od_rg, mpp)
    del lab  # a whole-overview int32 plane (215 MB on a 60k-px slide); ``labels`` holds what is needed
    area_mm2 = area * (float(mpp) ** 2) * 1e-6

    nucleus_at = nuclei.labels.ravel()[where]  # the nucleus (1..n, 0: none) at each ink-coloured pixel

    def judge(counted: np.ndarray, counted_region: np.ndarray) -> np.ndarray:
        """Regions judged ink when only the nuclei flagged in ``counted`` count."""
        nuc_px = np.bincount(labels, weights=np.concatenate([[False], counted])[nucleus_at], minlength=n + 1)
        n_nuc = np.bincount(counted_region, minlength=n + 1)
        ink = ((nuc_px < _INK_MAX_NUCLEUS_SHARE * area)
               & (n_nuc < _INK_MAX_NUCLEI_PER_MM2 * np.maximum(area_mm2, 1e-12)))
        ink[0] = False
        return ink

    if explained.any():
        is_ink = judge(~explained, region_of[~explained])
        # only nuclei of regions judged ink are dropped; a region that stays stain keeps them all
        drop = explained & is_ink[region_of]
        nuclei = keep_nuclei(nuclei, ~drop)
        region_of = region_of[~drop]
    else:
        is_ink = judge(np.ones(len(nuclei), dtype=bool), region_of)
    region_ink = np.zeros(cand.shape, dtype=bool)
    region_ink.ravel()[where] = is_ink[labels]
    if len(nuclei) and not is_ink[1:].all():
        # a stroke that crosses some tissue or cells: its parts far from every nucleus are
        # still ink when they alone are as large as a stroke and mostly of confident ink colour
        # (the far cytoplasm of a large pale squamous cell is neither)
        far = cand & ~region_ink
        far &= ~_near_nuclei(nuclei, mpp, _FAR_FROM_NUCLEI_UM, within=far)
        if far.any():
            far = _remove_small(far, np.pi / 4.0 * (_FAR_INK_MIN_UM / mpp) ** 2 if size_filter else 1.0)
            flab, fn = ndi.label(far, structure=np.ones((3, 3), bool))
            if fn:
                seed = (codes & (_SEED[0] | _SEED[1] | _SEED[2])) != 0
                fw = np.flatnonzero(far)
                fl = flab.ravel()[fw]
                share = (np.bincount(fl, weights=seed.ravel()[fw], minlength=fn + 1)
                         / np.maximum(np.bincount(fl, minlength=fn + 1), 1))
                ok = share >= _PEN_MIN_SEED_FRACTION  # as for a whole ink region
                ok[0] = False
                region_ink.ravel()[fw] |= ok[fl]
    ink = region_ink & ~_near_nuclei(nuclei, mpp, within=region_ink)
    return ink, cand & ~ink, nuclei
