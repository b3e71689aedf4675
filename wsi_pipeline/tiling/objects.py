"""Nucleated objects (single cells and cell groups) on a low-resolution image, and tiles placed on them.

Cytology models are trained on patches centred on a cell or a cell group, so the ``cells``
placement puts tiles where the nucleated objects are instead of on a fixed grid. Objects are
found on the tiler's overview image (about 1-2 um/px) inside its foreground mask:

1. nuclear stain: a pixel is nuclear when both its red and green optical densities relative to
   the glass exceed ``nuclear_od`` (haematoxylin, Romanowsky/Giemsa nuclei and Pap nuclei absorb
   red and green; red cells, eosinophil granules and cyanophilic cytoplasm each pass one of the
   two), and it lies inside the foreground mask (which already excludes pen ink and dark debris);
2. nuclei smaller than ``min_nucleus_um`` are dropped (platelets, specks), nuclear pixels closer
   than ``join_um`` are joined (lobes of one nucleus, cells of one group);
3. each joined component is split by a watershed of its distance transform, seeded at the
   distance peaks, where it holds nuclei more than ``split_um`` apart and the whole fits in a
   tile (touching single cells each get their own centred tile); a larger component stays one
   *group* and counts its peaks as ``n_nuclei``;
4. the cell body is the foreground within ``body_um`` of the nuclei: its area and bounding box
   are the object's; its centre is the centroid of the nuclear pixels;
5. nuclear-coloured regions wider than any nucleus (``max_nucleus_um``) or long and thin like a
   marker stroke (blue/violet ink, stain deposit) are not objects, and an object whose centred tile would be more than ``max_ink_share`` dark and colourless (black
   or grey marker ink, dark artefacts) is skipped.

No separate nucleus detector is used here (``wsi_pipeline.foreground.nuclei`` did not exist when this was
written); the nuclear-stain test above is this module's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

__all__ = ["ObjectConfig", "ObjectTable", "nuclear_mask", "ink_mask", "detect_objects", "Placement", "place_tiles",
           "merge_near_duplicates", "plan_cells", "write_objects", "has_objects", "read_objects"]


@dataclass(frozen=True)
class ObjectConfig:
    """Sizes in micrometres (converted with the image's mpp), optical densities in log10 units."""

    nuclear_od: float = 0.04  # red optical density above the glass
    nuclear_hue: float = 0.06  # red OD minus blue OD: > 0 blue-purple (nuclei), < 0 pink-red (red cells, eosin)
    seed_hue: float = 0.09  # a nucleus reaches this somewhere
    min_nucleus_um: float = 3.5  # equivalent diameter; platelets (2-3 um) and specks fall below
    join_um: float = 2.0  # nuclear pixels closer than this form one component
    split_um: float = 9.0  # nuclei at least this far apart inside a tile-sized component are separate cells
    body_um: float = 4.0  # cytoplasm counted around the nuclei (inside the foreground mask)
    # an object whose centred tile is more than this share dark and colourless (marker ink, a dark
    # artefact) is skipped: the model has never seen ink, and on the synthetic smears such tiles
    # were the negatives' most "suspicious" ones
    max_ink_share: float = 0.1
    # nuclear-coloured regions wider than this (inscribed diameter) are not nuclei, nor touching
    # nuclei: blue/violet marker ink or stain deposit (the largest nuclei are about 24 um across)
    max_nucleus_um: float = 24.0
    ink_od: float = 0.12  # mean OD above the glass of a dark pixel ...
    ink_spread: float = 0.35  # ... whose channel ODs differ by less than this share of their mean


@dataclass(frozen=True)
class ObjectTable:
    """Objects in level-0 pixels. ``centre`` (M, 2) x, y; ``bbox`` (M, 4) x, y, w, h; ``area`` um^2."""

    centre: np.ndarray
    area: np.ndarray
    bbox: np.ndarray
    n_nuclei: np.ndarray

    def __len__(self) -> int:
        return int(len(self.centre))

    @staticmethod
    def empty() -> "ObjectTable":
        return ObjectTable(np.zeros((0, 2)), np.zeros(0, np.float32), np.zeros((0, 4), np.int64),
                           np.zeros(0, np.int32))

    def take(self, index: np.ndarray) -> "ObjectTable":
        return ObjectTable(self.centre[index], self.area[index], self.bbox[index], self.n_nuclei[index])


def _glass_rgb(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Glass colour: upper quartile of the non-foreground pixels (sampled; their median is pulled down by
    cell fringes in dense fields), or the image's 95th percentile when there are none."""
    step = max(1, int(math.sqrt(rgb.shape[0] * rgb.shape[1] / 250_000)))
    sub, sub_mask = rgb[::step, ::step], mask[::step, ::step]
    glass = sub[~sub_mask]
    if len(glass) >= 16:
        return np.percentile(glass, 75, axis=0).astype(np.float64)
    return np.percentile(sub.reshape(-1, 3), 95, axis=0).astype(np.float64)


_LOG = np.log10(np.maximum(np.arange(256, dtype=np.float32), 1.0))
_BAND = 1024


def nuclear_mask(rgb: np.ndarray, mask: np.ndarray, config: ObjectConfig = ObjectConfig(),
                 min_px: float = 0.0) -> np.ndarray:
    """Nuclear-stained pixels inside ``mask``, relative to the glass: blue-purple (red OD above blue OD by
    ``nuclear_hue``) and absorbing red (red OD >= ``nuclear_od``); a connected region is kept only if
    it reaches ``seed_hue`` somewhere (hysteresis: pale lobes join a nucleus, pale debris does not)
    and has at least ``min_px`` pixels. Computed in row bands (no float image of the whole overview)."""
    glass = np.log10(np.maximum(_glass_rgb(rgb, mask), 1.0))
    weak = np.zeros(mask.shape, dtype=bool)
    strong = np.zeros(mask.shape, dtype=bool)
    for y0 in range(0, mask.shape[0], _BAND):
        band = rgb[y0:y0 + _BAND]
        od_r = glass[0] - _LOG[band[..., 0]]
        hue = od_r - (glass[2] - _LOG[band[..., 2]])
        w = (od_r >= config.nuclear_od) & (hue >= config.nuclear_hue) & mask[y0:y0 + _BAND]
        weak[y0:y0 + _BAND] = w
        strong[y0:y0 + _BAND] = w & (hue >= config.seed_hue)
    labels, n = ndi.label(weak, structure=np.ones((3, 3), bool))
    if n == 0:
        return weak
    # looked up at the weak pixels only (a few per cent of an overview): no whole-image int64 copy
    where = np.flatnonzero(weak)
    ids = labels.ravel()[where]
    del labels
    seeded = np.zeros(n + 1, dtype=bool)
    seeded[np.unique(ids[strong.ravel()[where]])] = True
    if min_px > 0:
        seeded &= np.bincount(ids, minlength=n + 1) >= min_px
    seeded[0] = False
    out = np.zeros(weak.shape, dtype=bool)
    out.ravel()[where] = seeded[ids]
    return out


def ink_mask(rgb: np.ndarray, glass_rgb: np.ndarray, config: ObjectConfig = ObjectConfig()) -> np.ndarray:
    """Dark, colourless pixels (black/grey marker ink, dark artefacts); stained cells are coloured.

    Each channel's OD is looked up in a per-channel table (float64) and the three are combined in
    the order a mean over the channel axis adds them ((R + G) + B, / 3), row band by row band: no
    float image of the whole overview."""
    od_of = np.log10(np.maximum(glass_rgb, 1.0))[None, :] - _LOG[:, None].astype(np.float64)  # (256, 3)
    out = np.zeros(rgb.shape[:2], dtype=bool)
    for y0 in range(0, rgb.shape[0], _INK_BAND):
        band = rgb[y0:y0 + _INK_BAND]
        r, g, b = od_of[band[..., 0], 0], od_of[band[..., 1], 1], od_of[band[..., 2], 2]
        mean = r + g
        mean += b
        mean /= 3
        spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
        out[y0:y0 + _INK_BAND] = (mean > config.ink_od) & (spread < config.ink_spread * mean)
    return out


#: a nuclear-coloured region longer than this (um, major axis) and this many times longer than wide
#: is a pen stroke, not a chain of nuclei
STROKE_MIN_UM = 60.0
STROKE_ELONGATION = 4.0

# rows per band of ink_mask: five float64 planes of the band (a 7,500 px overview: ~40 MB at 128 rows)
_INK_BAND = 128


def _ink_shares(rgb: np.ndarray, glass_rgb: np.ndarray, rows: np.ndarray, cols: np.ndarray, half: int,
                config: ObjectConfig) -> np.ndarray:
    """Share of :func:`ink_mask` pixels in the (2 * half + 1)^2 window around each (row, col), clipped to
    the image. The dark, colourless test is per pixel, so it is made once on the image and the
    windows count it."""
    h, w = rgb.shape[:2]
    ink = ink_mask(rgb, glass_rgb, config)
    out = np.zeros(len(rows), np.float64)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        window = ink[max(r - half, 0):min(r + half + 1, h), max(c - half, 0):min(c + half + 1, w)]
        out[i] = np.count_nonzero(window) / window.size if window.size else 0.0
    return out


def _stroke(region: np.ndarray, mpp: float) -> bool:
    """Whether ``region`` is long and thin like a marker stroke (axes from its second moments)."""
    ys, xs = np.nonzero(region)
    if len(ys) < 3:
        return False
    evals = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)))
    major, minor = 4.0 * np.sqrt(max(evals[1], 0.0)), 4.0 * np.sqrt(max(evals[0], 1e-9))
    return major * mpp > STROKE_MIN_UM and major / max(minor, 1.0) > STROKE_ELONGATION


def _disk(radius: float) -> np.ndarray:
    r = max(0, int(math.floor(radius)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy) <= radius * radius + 1e-9


def _split(component: np.ndarray, min_distance: int, min_px: float, extent: int | None = None) -> tuple[np.ndarray, int]:
    """Watershed of the distance transform seeded at its peaks: (labels 1..k on the component, k).

    Peaks are the maxima of their (2 * min_distance + 1)^2 neighbourhood (a plateau is one peak);
    scipy filters, not skimage's peak_local_max, whose spacing bookkeeping costs ~2 ms a call.
    ``extent``: the component's bounding box side (at most); when every neighbourhood of one of
    its pixels holds the whole component, the peaks are its global maxima (no filter needed)."""
    dist = _inner_distance(component)
    half = max(1, min_distance)
    if extent is not None and extent <= half + 1:
        top = (dist == dist.max()) & component
    else:
        top = (dist == ndi.maximum_filter(dist, size=2 * half + 1, mode="constant")) & component
    if np.count_nonzero(top) <= 1:  # one peak (or none): nothing to label or split
        return component.astype(np.int32), 1
    markers, k = ndi.label(top, structure=np.ones((3, 3), bool))
    if k <= 1:
        return component.astype(np.int32), 1
    labels = watershed(-dist, markers, mask=component)
    sizes = np.bincount(labels.ravel(), minlength=k + 1)[1:]
    return labels, int(np.sum(sizes >= min_px)) or 1


def _inner_distance(component: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pixel of ``component`` to the nearest pixel outside it, the
    window's border counting as outside (the distance transform of the zero-padded window)."""
    h, w = component.shape
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    padded[1:-1, 1:-1] = component
    return ndi.distance_transform_edt(padded)[1:-1, 1:-1]


def detect_objects(rgb: np.ndarray, mask: np.ndarray, mpp: float, downsample: float, *,
                   tile_um: float | None = None, config: ObjectConfig = ObjectConfig()) -> ObjectTable:
    """Nucleated objects on ``rgb`` (an overview at ``mpp`` um/px, ``downsample`` level-0 px per px).

    ``tile_um``: side of the tiles that will be placed; components that fit in one are split into
    their single cells (see the module docstring), larger ones stay one group. Coordinates are
    returned in level-0 px.
    """
    mask = np.asarray(mask, dtype=bool)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image {rgb.shape[:2]} and mask {mask.shape} differ in size")
    min_px = math.pi * (config.min_nucleus_um / 2.0) ** 2 / (mpp * mpp)
    nuclear = nuclear_mask(rgb, mask, config, min_px)
    if not nuclear.any():
        return ObjectTable.empty()
    join = config.join_um / mpp
    joined = nuclear | ndi.binary_closing(nuclear, structure=_disk(join / 2.0 + 0.5)) if join >= 1 else nuclear
    comp, n = ndi.label(joined, structure=np.ones((3, 3), bool))
    split_px = config.split_um / mpp
    tile_px = (tile_um / mpp) if tile_um else float("inf")
    body_px = config.body_um / mpp
    pad = int(math.ceil(body_px)) + 1
    h, w = mask.shape
    centres, areas, boxes, nuclei = [], [], [], []
    for index, sl in enumerate(ndi.find_objects(comp), start=1):
        if sl is None:
            continue
        y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
        x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
        own = comp[y0:y1, x0:x1] == index
        nuc = own & nuclear[y0:y1, x0:x1]
        extent = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        if extent * mpp > config.max_nucleus_um and (  # small components cannot be ink (checks skipped)
                ndi.distance_transform_edt(np.pad(nuc, 1)).max() * 2 * mpp > config.max_nucleus_um
                or _stroke(nuc, mpp)):
            continue  # too wide for a nucleus, or a long thin stroke: ink or a stain deposit
        if extent <= split_px:  # too small to hold two cells' nuclei: one cell (the common case, no watershed)
            pieces, counts = [nuc], [1]
        elif extent + 2 * body_px <= tile_px:  # fits a tile: separate cells if their nuclei are far enough apart
            parts, k = _split(nuc, max(1, int(round(split_px))), min_px, extent)
            pieces = [nuc]
            if k > 1:
                pieces = [p for p in ((parts == j) for j in range(1, int(parts.max()) + 1)) if p.sum() >= min_px] or pieces
            counts = [1] * len(pieces)
        else:  # a group: one object, its nuclei counted (peaks at least half a cell apart)
            _, k = _split(nuc, max(1, int(round(split_px / 2.0))), min_px, extent)
            pieces, counts = [nuc], [k]
        fg = mask[y0:y1, x0:x1]
        for piece, count in zip(pieces, counts):
            near = ndi.distance_transform_edt(~piece) <= body_px
            body = (near & fg) | piece
            ys, xs = np.nonzero(body)
            ny, nx = np.nonzero(piece)
            centres.append(((x0 + nx.mean() + 0.5) * downsample, (y0 + ny.mean() + 0.5) * downsample))
            areas.append(len(ys) * mpp * mpp)
            bx0, by0 = (x0 + xs.min()) * downsample, (y0 + ys.min()) * downsample
            bx1, by1 = (x0 + xs.max() + 1) * downsample, (y0 + ys.max() + 1) * downsample
            boxes.append((round(bx0), round(by0), round(bx1 - bx0), round(by1 - by0)))
            nuclei.append(count)
    table = ObjectTable(np.asarray(centres, np.float64).reshape(-1, 2), np.asarray(areas, np.float32),
                        np.asarray(boxes, np.int64).reshape(-1, 4), np.asarray(nuclei, np.int32))
    del comp, nuclear, joined  # whole-overview planes, before the ink test's own
    if len(table) and tile_um and config.max_ink_share < 1:
        rows = (table.centre[:, 1] / downsample).astype(np.int64)
        cols = (table.centre[:, 0] / downsample).astype(np.int64)
        share = _ink_shares(rgb, _glass_rgb(rgb, mask), rows, cols, max(1, int(round(tile_px / 2))), config)
        table = table.take(np.flatnonzero(share <= config.max_ink_share))
    return table


# --------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """Tiles placed on objects: ``coords`` (N, 4) level-0 x, y, w, h; ``tile_object`` (N,) object index."""

    objects: ObjectTable
    coords: np.ndarray
    tile_object: np.ndarray


def merge_near_duplicates(objects: ObjectTable, distance: float) -> ObjectTable:
    """Merge objects whose centres lie closer than ``distance`` (level-0 px): their centred tiles would
    nearly coincide. A merged object has the union box, the summed area and nuclei, and the
    area-weighted centre."""
    n = len(objects)
    if n < 2 or distance <= 0:
        return objects
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pairs = cKDTree(objects.centre).query_pairs(distance, output_type="ndarray")
    if len(pairs) == 0:
        return objects
    from scipy.sparse import coo_matrix

    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    m, group = connected_components(graph, directed=False)
    weight = objects.area.astype(np.float64) + 1e-9
    wsum = np.bincount(group, weight, m)
    centre = np.stack([np.bincount(group, objects.centre[:, i] * weight, m) / wsum for i in range(2)], axis=1)
    x0 = np.full(m, np.iinfo(np.int64).max)
    y0 = np.full(m, np.iinfo(np.int64).max)
    x1 = np.full(m, np.iinfo(np.int64).min)
    y1 = np.full(m, np.iinfo(np.int64).min)
    b = objects.bbox
    np.minimum.at(x0, group, b[:, 0])
    np.minimum.at(y0, group, b[:, 1])
    np.maximum.at(x1, group, b[:, 0] + b[:, 2])
    np.maximum.at(y1, group, b[:, 1] + b[:, 3])
    return ObjectTable(centre, np.bincount(group, objects.area, m).astype(np.float32),
                       np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).astype(np.int64),
                       np.bincount(group, objects.n_nuclei, m).astype(np.int32))


def _starts(lo: float, hi: float, tile: float, overlap: float, limit: float) -> list[float]:
    """Fewest tile starts covering [lo, hi) with at least ``overlap`` between neighbours, centred on it."""
    extent = hi - lo
    if extent <= tile:
        return [_clip((lo + hi) / 2.0 - tile / 2.0, limit)]
    n = math.ceil((extent - overlap) / (tile - overlap))
    step = (extent - tile) / (n - 1)  # <= tile - overlap
    return [_clip(lo + i * step, limit) for i in range(n)]


def _clip(start: float, limit: float) -> float:
    """Keep a tile inside the slide (``limit`` = slide side - tile side); a slide smaller than a tile starts at 0."""
    return float(min(max(start, 0.0), max(limit, 0.0)))


def place_tiles(objects: ObjectTable, tile0: float, dimensions: tuple[int, int], *,
                overlap: float = 0.1, merge: float = 0.2) -> Placement:
    """One tile centred on each object that fits in a tile; a larger group covered by the fewest tiles
    aligned to its box with ``overlap`` (share of a tile) between neighbours.

    ``tile0``: tile side in level-0 px. Objects whose centres are closer than ``merge`` tiles are
    merged first (their tiles would nearly coincide). Tiles stay inside the slide. Tiles are
    returned in reading order (top to bottom, then left to right), so shards read nearby tiles.
    """
    objects = merge_near_duplicates(objects, merge * tile0)
    width0, height0 = dimensions
    size = int(round(tile0))
    xs_all, ys_all, owner = [], [], []
    for i in range(len(objects)):
        x, y, w, h = (float(v) for v in objects.bbox[i])
        cx, cy = objects.centre[i]
        if w <= tile0 and h <= tile0:
            xs = [_clip(cx - tile0 / 2.0, width0 - tile0)]
            ys = [_clip(cy - tile0 / 2.0, height0 - tile0)]
        else:
            xs = _starts(x, x + w, tile0, overlap * tile0, width0 - tile0) if w > tile0 else \
                [_clip(cx - tile0 / 2.0, width0 - tile0)]
            ys = _starts(y, y + h, tile0, overlap * tile0, height0 - tile0) if h > tile0 else \
                [_clip(cy - tile0 / 2.0, height0 - tile0)]
        for ty in ys:
            for tx in xs:
                xs_all.append(tx)
                ys_all.append(ty)
                owner.append(i)
    if not owner:
        return Placement(objects, np.zeros((0, 4), np.int64), np.zeros(0, np.int32))
    coords = np.stack([np.round(xs_all), np.round(ys_all), np.full(len(owner), size), np.full(len(owner), size)],
                      axis=1).astype(np.int64)
    owner_arr = np.asarray(owner, np.int32)
    order = np.lexsort((coords[:, 0], coords[:, 1] // max(size, 1)))
    return Placement(objects, coords[order], owner_arr[order])


# --------------------------------------------------------------------------- the tiler's cells plan and the store

#: overview pixel size the objects are found at is the tiler's mask mpp (about 2 um/px); overlap
#: between the tiles covering one group, as a share of a tile; objects closer than this share of a
#: tile are merged (their centred tiles would nearly coincide)
GROUP_OVERLAP = 0.1
MERGE_DISTANCE = 0.2


def plan_cells(thumbnail: np.ndarray, mask: np.ndarray, thumbnail_mpp: float, downsample: float,
               dimensions: tuple[int, int], tile0: float, tile_um: float) -> Placement:
    """The ``cells`` placement of a slide from the tiler's overview and foreground mask."""
    found = detect_objects(thumbnail, mask, thumbnail_mpp, downsample, tile_um=tile_um)
    return place_tiles(found, tile0, dimensions, overlap=GROUP_OVERLAP, merge=MERGE_DISTANCE)


def write_objects(group, placement: Placement, chunk: int) -> None:
    """Store ``objects/{id,centre,area,bbox,n_nuclei}`` and ``tile_object`` (chunked like ``coords``).

    Written right after the store is created and before any tile shard; the ``objects`` group's
    ``complete`` attribute, set last, tells a resumed run that the whole plan is there
    (:func:`has_objects`)."""
    import zarr

    obj = placement.objects
    m = len(obj)
    ochunk = max(1, min(m, 65536))
    with zarr.config.set({"array.write_empty_chunks": True}):  # an all-zero chunk is data here, not "unwritten"
        _write_object_arrays(group, placement, obj, m, ochunk, chunk)
    group["objects"].attrs["complete"] = True


def _write_object_arrays(group, placement: Placement, obj: ObjectTable, m: int, ochunk: int, chunk: int) -> None:
    node = group.create_group("objects")
    node.create_array("id", data=np.arange(m, dtype=np.int32), chunks=(ochunk,))
    node.create_array("centre", data=np.asarray(obj.centre, np.float64).reshape(m, 2), chunks=(ochunk, 2))
    node.create_array("area", data=np.asarray(obj.area, np.float32).reshape(m), chunks=(ochunk,))
    node.create_array("bbox", data=np.asarray(obj.bbox, np.int64).reshape(m, 4), chunks=(ochunk, 4))
    node.create_array("n_nuclei", data=np.asarray(obj.n_nuclei, np.int32).reshape(m), chunks=(ochunk,))
    n = len(placement.tile_object)
    group.create_array("tile_object", data=np.asarray(placement.tile_object, np.int32).reshape(n),
                       chunks=(max(1, min(chunk, max(n, 1))),))


def has_objects(group) -> bool:
    """Whether a store holds the objects table and every tile's object id."""
    try:
        group["tile_object"]
        return bool(group["objects"].attrs.get("complete"))
    except (KeyError, FileNotFoundError):
        return False


def read_objects(group) -> tuple[ObjectTable, np.ndarray] | None:
    """(objects, tile_object) of a ``cells`` store, None for a grid store."""
    if not has_objects(group):
        return None
    table = ObjectTable(np.asarray(group["objects/centre"][:]), np.asarray(group["objects/area"][:]),
                        np.asarray(group["objects/bbox"][:]), np.asarray(group["objects/n_nuclei"][:]))
    return table, np.asarray(group["tile_object"][:])
