"""Nucleus evidence at low resolution: hematoxylin-dark blobs of plausible nuclear size.

Used by the foreground stage for two decisions that must not depend on colour alone: marker ink
is never called where nuclei are (a Pap cell group's blue-green cytoplasm has the hue of green or
blue ink, its nuclei do not have the shape of a stroke), and a tile that holds a nucleus is kept
whatever its foreground fraction. Works on the optical density (OD) above the glass, so it needs
the glass estimate of :mod:`wsi_pipeline.foreground`; everything here is a pure function of OD
arrays and a pixel size.

The nuclear signal is red and green absorbed together: hematoxylin (and the azure/methylene-blue
nuclei of Romanowsky stains) absorbs red and green about equally, while the Pap counterstains
each spare one of them (Light Green SF absorbs red and passes green, eosin and Orange G absorb
green and blue and pass red). A nucleus is where ``min(OD_red, OD_green)`` is high and where
*both* channels stand out from their surroundings, each by a white top-hat of
``TOPHAT_RADIUS_UM`` (so a uniform dark ink stroke or a dark glass edge, wider than any nucleus,
gives nothing, and a red cell under green ink, which adds green absorption only, is not a
nucleus), by enough relative to the surroundings' own density (the streaks of a dark stroke are
not nuclei), and forms a blob between ``NUCLEUS_MIN_UM`` and ``NUCLEUS_MAX_UM`` across.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .parallel import _boxes

__all__ = [
    "NUCLEUS_MIN_UM", "NUCLEUS_MAX_UM", "TOPHAT_RADIUS_UM", "MIN_CONTRAST", "MIN_DENSITY", "MIN_RELATIVE_CONTRAST",
    "CELL_RADIUS_UM", "Nuclei", "nuclear_density", "tophat_halo", "nucleus_pixels", "label_nuclei",
    "centre_pixels", "count_in_boxes", "own_density", "keep_nuclei",
]

#: smallest and largest nucleus kept (diameter of the equivalent disc, um): a lymphocyte or bare
#: nucleus is ~5 um, a squamous carcinoma or a Hurthle-cell nucleus reaches ~20 um
NUCLEUS_MIN_UM = 3.5
NUCLEUS_MAX_UM = 24.0
#: radius (um) of the background estimate around a nucleus (the top-hat's opening)
TOPHAT_RADIUS_UM = 11.0
#: radius (um) around a nucleus taken as its cell (never ink; the cells the stain is judged on)
CELL_RADIUS_UM = 8.0
#: OD by which a nucleus exceeds its surroundings, and its smallest absolute OD (min of R, G);
#: set on the labelled Pap LBC nuclei (tests/data/pap_nuclei.json: 0.18 finds 75 % of them, 0.25 71 %)
#: and the synthetic Pap fields (76 %, 1.0 detection per true nucleus)
MIN_CONTRAST = 0.12
MIN_DENSITY = 0.18
#: and by at least this share of its surroundings' own OD: a nucleus stands out from the
#: cytoplasm or glass around it, while the streaks of a dark marker stroke vary by a few tens of
#: per cent of the stroke's density
MIN_RELATIVE_CONTRAST = 0.5


@dataclass(frozen=True)
class Nuclei:
    """Nuclei found on one image: label image, centres (row, col in px) and areas (px)."""

    labels: np.ndarray  # uint16 (int32 beyond 65,535 nuclei, see _label_dtype), 0 = none
    centres: np.ndarray  # (n, 2) float64 row, col
    areas: np.ndarray  # (n,) int64 px

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0

    def __len__(self) -> int:
        return len(self.centres)


def nuclear_density(od_red: np.ndarray, od_green: np.ndarray) -> np.ndarray:
    """The nuclear signal ``min(OD_red, OD_green)`` (float32)."""
    return np.minimum(od_red, od_green).astype(np.float32, copy=False)


def _opening_size(mpp: float) -> int:
    return 2 * int(np.ceil(TOPHAT_RADIUS_UM / mpp)) + 1


def tophat_halo(mpp: float) -> int:
    """Context rows a band needs so that :func:`nucleus_pixels` is exact in it."""
    return _opening_size(mpp)


def _opening(a: np.ndarray, size: int) -> np.ndarray:
    """Grey opening of 2-D ``a`` by a ``size`` square, nearest-mode borders.

    The same values as ``ndi.grey_opening(a, size=(size, size), mode="nearest")``: the square's
    minimum and maximum are separable and each 1-D pass is exact, so the passes down the columns
    are run on one transposed copy, where scipy reads contiguous lines (a C-order array's columns
    took twice as long as its rows)."""
    e = ndi.minimum_filter1d(a, size, axis=1, mode="nearest")
    t = ndi.minimum_filter1d(np.ascontiguousarray(e.T), size, axis=1, mode="nearest")
    t = ndi.maximum_filter1d(t, size, axis=1, mode="nearest")
    return ndi.maximum_filter1d(np.ascontiguousarray(t.T), size, axis=1, mode="nearest")


def _tophat_test(od_red: np.ndarray, od_green: np.ndarray, size: int) -> np.ndarray:
    """Both channels stand out from their opening (``size`` px square) as a nucleus does."""
    open_r = _opening(od_red, size)
    open_g = _opening(od_green, size)
    top = np.minimum(od_red - open_r, od_green - open_g)
    background = np.minimum(open_r, open_g)
    return (top >= MIN_CONTRAST) & (top >= MIN_RELATIVE_CONTRAST * background)


def nucleus_pixels(od_red: np.ndarray, od_green: np.ndarray, mpp: float,
                   rows: tuple[int, int] | None = None) -> np.ndarray:
    """Pixels that are darker than their surroundings the way nuclei are (before the size test).

    ``rows=(lo, hi)``: only those rows are judged (the result is (hi - lo, W)), with the context
    the arrays give around them. A pixel below ``MIN_DENSITY`` never passes, so the top-hat is
    computed only in the blocks holding a dense pixel, each with its opening's full context: the
    same pixels as one opening over the whole image, at a fraction of the cost on glass."""
    h, w = od_red.shape
    lo, hi = (0, h) if rows is None else rows
    dense = nuclear_density(od_red[lo:hi], od_green[lo:hi]) >= MIN_DENSITY
    out = np.zeros(dense.shape, dtype=bool)
    size = _opening_size(mpp)
    halo = tophat_halo(mpp)
    for r0, r1, c0, c1 in _boxes(dense, 2 * halo):
        p0, p1 = max(0, lo + r0 - halo), min(h, lo + r1 + halo)
        q0, q1 = max(0, c0 - halo), min(w, c1 + halo)
        test = _tophat_test(od_red[p0:p1, q0:q1], od_green[p0:p1, q0:q1], size)
        out[r0:r1, c0:c1] = test[lo + r0 - p0:lo + r1 - p0, c0 - q0:c1 - q0]
    out &= dense
    return out


def own_density(od_rg: np.ndarray, nuclei: Nuclei, ids: np.ndarray, mpp: float, band_rows: int = 64) -> np.ndarray:
    """Each nucleus ``ids`` (indices into ``nuclei``)'s own density: the mean over its pixels of
    ``min(OD_red - floor_red, OD_green - floor_green)``, the floor being the top-hat's opening of
    :func:`nucleus_pixels` (what lies under and around it: glass, cytoplasm or a layer of ink).

    ``od_rg``: (2, H, W) red and green OD, as :func:`nucleus_pixels` saw them. Computed in row
    bands around the nuclei only (exact: each window has the opening's full context)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros(len(ids), np.float64)
    if not len(ids):
        return out
    size = _opening_size(mpp)
    halo = size
    h, w = nuclei.labels.shape
    boxes = ndi.find_objects(nuclei.labels, max_label=int(ids.max()) + 1)
    top0 = np.array([boxes[i][0].start for i in ids])
    order = np.argsort(top0, kind="stable")
    start = 0
    while start < len(order):
        stop = start + int(np.searchsorted(top0[order[start:]], top0[order[start]] + band_rows, side="left"))
        stop = max(stop, start + 1)
        chunk = order[start:stop]
        sls = [boxes[ids[j]] for j in chunk]
        r0 = max(0, min(s[0].start for s in sls) - halo)
        r1 = min(h, max(s[0].stop for s in sls) + halo)
        c0 = max(0, min(s[1].start for s in sls) - halo)
        c1 = min(w, max(s[1].stop for s in sls) + halo)
        r, g = od_rg[0, r0:r1, c0:c1], od_rg[1, r0:r1, c0:c1]
        top = np.minimum(r - _opening(r, size), g - _opening(g, size))
        out[chunk] = ndi.mean(top, nuclei.labels[r0:r1, c0:c1], ids[chunk] + 1)
        start = stop
    return out


def _label_dtype(n: int) -> np.dtype:
    """Dtype of a label image of ``n`` nuclei: uint16 while the labels fit (a 7,500 px overview's
    label plane is then 107 MB instead of 214 MB), else int32."""
    return np.dtype(np.uint16) if n <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def keep_nuclei(nuclei: Nuclei, keep: np.ndarray) -> Nuclei:
    """The nuclei flagged in ``keep`` (bool, one per nucleus), relabelled 1..k in their order."""
    keep = np.asarray(keep, dtype=bool)
    if keep.all():
        return nuclei
    dtype = _label_dtype(int(keep.sum()))
    table = np.zeros(len(nuclei) + 1, dtype)
    table[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=dtype)
    where = np.flatnonzero(nuclei.labels)  # renumbered at the nuclei's pixels only
    labels = np.zeros(nuclei.labels.shape, dtype)
    labels.ravel()[where] = table[nuclei.labels.ravel()[where]]
    return Nuclei(labels, nuclei.centres[keep], nuclei.areas[keep])


def _split_touching(lab: np.ndarray, big: np.ndarray, mpp: float, where: np.ndarray) -> np.ndarray:
    """Split components flagged in ``big`` (touching nuclei of a crowded group) by a watershed
    of their distance transform, one basin per local maximum at least a small nucleus apart.

    Each component is split inside its own bounding box plus a one-pixel background margin (its
    distance transform and peaks are those of the whole image): the components are few and
    small, the overview is not (the whole-image version took 3.9 of a 40k-px smear's 17 s).
    Measured against the whole-image version: the same peaks and nuclei; where two basins tie on
    a plateau the watershed may give the boundary pixel to the other one.

    Returns the new labels at the flat indices ``where`` (sorted: the labelled pixels), not a
    second whole-image label plane."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    out = lab.ravel()[where]  # int32: labels stay below the pixel count
    width = lab.shape[1]
    # pixels no basin reaches (a part joined to its component only diagonally: the watershed
    # floods 4-connected) join the highest existing label, as the whole-image version did
    unreached = int(lab.max())
    next_label = unreached + 1
    min_distance = max(1, int(round(NUCLEUS_MIN_UM / mpp)))
    boxes = ndi.find_objects(lab)
    for label in np.flatnonzero(big):
        box = boxes[label - 1]
        if box is None:
            continue
        box = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(box, lab.shape))
        region = lab[box] == label
        dist = ndi.distance_transform_edt(region)
        peaks = peak_local_max(dist, min_distance=min_distance, labels=region.astype(np.int32), exclude_border=False)
        markers = np.zeros(region.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
        pieces = watershed(-dist, markers, mask=region)[region].astype(np.int64)
        ry, rx = np.nonzero(region)  # row-major, as the pieces
        at = np.searchsorted(where, (ry + box[0].start) * width + (rx + box[1].start))
        out[at] = np.where(pieces > 0, pieces + next_label - 1, unreached)
        next_label += len(peaks)
    return out


def label_nuclei(pixels: np.ndarray, mpp: float) -> Nuclei:
    """Blobs of nucleus pixels within the plausible size range, labelled 1..n; blobs larger than
    a nucleus (touching nuclei in a group) are first split (:func:`_split_touching`)."""
    lab, n = ndi.label(pixels, structure=np.ones((3, 3), bool))
    if n == 0:
        return Nuclei(np.zeros(lab.shape, _label_dtype(0)), np.zeros((0, 2)), np.zeros(0, np.int64))
    # labels are counted, renumbered and looked up at the labelled pixels only (a few per cent
    # of an overview), in their row-major order, so the centres' sums are those of np.nonzero
    where = np.flatnonzero(lab)
    ids = lab.ravel()[where]
    area = np.bincount(ids, minlength=n + 1)
    px_um2 = float(mpp) ** 2
    lo = np.pi / 4.0 * NUCLEUS_MIN_UM ** 2 / px_um2
    hi = np.pi / 4.0 * NUCLEUS_MAX_UM ** 2 / px_um2
    big = area > hi
    big[0] = False
    if big.any():
        ids = _split_touching(lab, big, mpp, where)  # the labelled pixels stay labelled
        present = np.bincount(ids) > 0
        present[0] = False
        n = int(present.sum())
        table = np.zeros(len(present), np.int64)
        table[present] = np.arange(1, n + 1, dtype=np.int64)
        ids = table[ids]  # renumbered 1..n in their order
        area = np.bincount(ids, minlength=n + 1)
    ok = (area >= max(lo, 1.0)) & (area <= hi)
    ok[0] = False
    k = int(ok.sum())
    dtype = _label_dtype(k)
    new = np.zeros(n + 1, dtype)
    new[ok] = np.arange(1, k + 1, dtype=dtype)
    ids = new[ids]
    shape = lab.shape
    del lab  # the int32 labelling is not needed once its labelled pixels are known
    labels = np.zeros(shape, dtype)
    labels.ravel()[where] = ids
    if k == 0:
        return Nuclei(labels, np.zeros((0, 2)), np.zeros(0, np.int64))
    kept = ids > 0
    ys, xs = np.divmod(where[kept], shape[1])
    ids = ids[kept]
    cnt = np.bincount(ids, minlength=k + 1)[1:]
    cy = np.bincount(ids, weights=ys, minlength=k + 1)[1:] / cnt
    cx = np.bincount(ids, weights=xs, minlength=k + 1)[1:] / cnt
    return Nuclei(labels, np.stack([cy, cx], axis=1), cnt.astype(np.int64))


def centre_pixels(centres: np.ndarray, shape: tuple[int, ...], step: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the pixels holding nucleus ``centres`` on a grid ``step`` times coarser
    than theirs, clipped to ``shape``."""
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2) / step
    return (np.clip(np.round(c[:, 0]).astype(int), 0, shape[0] - 1),
            np.clip(np.round(c[:, 1]).astype(int), 0, shape[1] - 1))


def count_in_boxes(centres: np.ndarray, downsample: float, boxes: np.ndarray) -> np.ndarray:
    """How many nucleus centres (row, col on a grid of ``downsample`` level-0 px) lie in each
    level-0 box ``(x, y, w, h)``; int32, one per box."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros(len(boxes), np.int32)
    if len(centres) == 0 or len(boxes) == 0:
        return out
    pts = (np.asarray(centres, dtype=np.float64) + 0.5) * float(downsample)  # level-0 (y, x)
    order = np.argsort(pts[:, 1], kind="stable")
    xs, ys = pts[order, 1], pts[order, 0]
    lo = np.searchsorted(xs, boxes[:, 0], side="left")
    hi = np.searchsorted(xs, boxes[:, 0] + boxes[:, 2], side="left")
    for i in np.flatnonzero(hi > lo):
        y = ys[lo[i]:hi[i]]
        out[i] = int(np.count_nonzero((y >= boxes[i, 1]) & (y < boxes[i, 1] + boxes[i, 3])))
    return out
