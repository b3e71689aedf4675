"""Where everything on a synthetic smear goes: the layout, defined block by block from the seed.

The slide is cut into ``BLOCK`` px blocks. A few objects are global and made up front from
coarse grids: the smear density (empty, sparse and dense fields), the illumination (glass colour,
smooth gain, faint noise), the pen mark, the out-of-focus patch and the planted regions with
their cells. Everything else (nucleated cells, clusters, red cells, debris) is anchored in a
block and drawn from that block's own seeded generator, so any band of the slide can be laid
out without the rest; ``Layout.block`` places the sprites of one block, and ``Layout.truth`` and
the counters collect the ground truth as blocks are laid out.
Part of ``wsi_pipeline.synth``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import WsiTriageError
from .cells import CellPool
from .config import S_CANDIDATES, S_DEBRIS, S_GLASS, S_GLOBAL, S_PLANT, S_RBC, S_REGIONS, SynthConfig, seeded_rng
from .sprites import NON_EPITHELIAL, SpriteBank, oriented

__all__ = ['BLOCK', 'NOISE_SIZE', 'PEN_TRUTH_ALPHA', 'BLOOD_FREQ', 'glass_colour', 'slide_glass', 'oriented_point', 'pen_stroke_mask', 'overlap', 'bilinear_patch', 'Layout']

BLOCK = 512  # layout block side, level-0 px
NOISE_SIZE = 509  # prime, so the noise texture never lines up with tiles or blocks

# Relative frequencies of normal nucleated cells (and platelet clumps) in peripheral blood;
# used when every background class is one of these names, otherwise classes are uniform.
BLOOD_FREQ = {"neutrophil": 0.40, "lymphocyte": 0.22, "platelet": 0.20, "monocyte": 0.08,
              "eosinophil": 0.06, "basophil": 0.04}
# Marker ink over the coverslip, as transmittance. Red: scarlet permanent marker (absorbs green and
# blue alike, passes red), as in the red strokes on scanned slides. Green: as saturated as the green
# marker strokes of the shared histolab pen tiles (median HSV saturation 0.46-0.54, hue 169-203 deg);
# it was (0.45, 0.74, 0.52), saturation 0.29, paler than any real marker and than Pap cytoplasm.
_PEN_INKS = {"blue": (0.42, 0.52, 0.86), "green": (0.30, 0.66, 0.55), "black": (0.22, 0.22, 0.26),
             "red": (0.85, 0.30, 0.33)}
_RANDOM_INKS = ("blue", "green", "black")  # what --pen-ink random draws from (red came later)
# Pen stroke ground truth: grid cells whose ink cover (0..1) reaches this count as the stroke.
PEN_TRUTH_ALPHA = 0.5

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


def glass_colour(seed: int) -> np.ndarray:
    """The glass RGB of the slide made with ``seed`` (before the illumination gain): near-neutral."""
    rng = seeded_rng(seed, S_GLASS)
    level = rng.uniform(*_GLASS_LEVEL)
    cast = _GLASS_CAST * rng.uniform(-1.0, 1.0)  # > 0 warm, < 0 cool
    return (level * np.array([1.0 + cast, 1.0, 1.0 - cast])).astype(np.float32)


def slide_glass(seed: int, bank: SpriteBank) -> np.ndarray:
    """The glass RGB the slide's sprites are lit with (one place, so that a tool compositing the
    bank's sprites elsewhere, e.g. benchmarks/diag_cell_tiles.py, lights them alike).

    Romanowsky: ``glass_colour`` in the white balance of the cell images (``bank.tint``; PBC:
    peach), so that glass and cells are lit alike, as any scanner or camera lights them: the
    cells keep exactly the colour they have, relative to their glass, in the images a model was
    trained on. (Re-lighting only the stained pixels for neutral glass, as before, is no white
    balance a real slide has; on such cut-outs the demo student fell from 91 % to 69 % top-1,
    benchmarks/diag_cell_tiles.py.) Brightest channel capped at 252. Pap: the neutral glass.
    """
    glass = glass_colour(seed)
    if bank.stain == "pap":
        return glass
    glass = glass * bank.tint
    return (glass * min(1.0, 252.0 / float(glass.max()))).astype(np.float32)


def oriented_point(row: float, col: float, shape: tuple[int, int], o: int) -> tuple[float, float]:
    """Where pixel (row, col) of an array of ``shape`` goes in ``oriented(array, o)``."""
    h, w = shape
    for _ in range(o & 3):  # np.rot90 by a quarter turn: (r, c) -> (w - 1 - c, r)
        row, col, h, w = w - 1 - col, row, w, h
    if o & 4:
        col = w - 1 - col
    return row, col


def pen_stroke_mask(pen: dict, width: int, height: int, downsample: int = 1) -> np.ndarray:
    """The pen stroke of a truth document's ``artifacts.pen.mask`` as a bool image of the level-0
    size ``width`` x ``height`` divided by ``downsample`` (rounded up); all False without a stroke."""
    gh, gw = pen["grid_shape"]
    flat = np.zeros(gh * gw, bool)
    for start, n in pen["runs"]:
        flat[start:start + n] = True
    grid = flat.reshape(gh, gw)
    g = pen["grid_step"]
    ys = (np.arange(math.ceil(height / downsample)) * downsample + downsample / 2) // g
    xs = (np.arange(math.ceil(width / downsample)) * downsample + downsample / 2) // g
    return grid[np.minimum(ys.astype(np.int64), gh - 1)][:, np.minimum(xs.astype(np.int64), gw - 1)]


def overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two ``[x, y, w, h]`` boxes intersect."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


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


def bilinear_patch(grid: np.ndarray, step: float, y0: int, y1: int, x0: int, x1: int, sub: int = 4) -> np.ndarray:
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
    """A planted region: a rectangle, level-0 px."""

    x: int
    y: int
    w: int
    h: int

    def contains(self, xs: np.ndarray, ys: np.ndarray, margin: float = 0.0) -> np.ndarray:
        return ((xs >= self.x - margin) & (xs < self.x + self.w + margin)
                & (ys >= self.y - margin) & (ys < self.y + self.h + margin))


@dataclass
class _Cells:
    """Nucleated cells: centres, pool image, orientation, radius, region (-1 = none), suspicious,
    cluster (group id, -1 = a single cell)."""

    cx: np.ndarray
    cy: np.ndarray
    image: np.ndarray
    orient: np.ndarray
    radius: np.ndarray
    region: np.ndarray
    suspicious: np.ndarray
    group: np.ndarray

    @staticmethod
    def empty() -> "_Cells":
        z = np.zeros(0, np.int64)
        return _Cells(z, z, z, z, np.zeros(0, np.float64), z, np.zeros(0, bool), z)

    def take(self, sel) -> "_Cells":
        return _Cells(*(getattr(self, f)[sel] for f in _CELL_FIELDS))


_CELL_FIELDS = ("cx", "cy", "image", "orient", "radius", "region", "suspicious", "group")


@dataclass
class _Block:
    """Everything drawn whose anchor lies in one layout block, ready to composite."""

    x0: np.ndarray  # sprite extents, level 0
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    sprites: list  # attenuation arrays (uint8, already oriented / blurred)


class Layout:
    """The whole slide's content, defined block by block from the seed."""

    def __init__(self, cfg: SynthConfig, pool: CellPool, bank: SpriteBank, pen_width_um: float | None = None) -> None:
        from scipy import ndimage as ndi

        self.cfg, self.pool, self.bank = cfg, pool, bank
        W, H, mpp = cfg.width, cfg.height, cfg.mpp
        self.px = lambda um: um / mpp  # noqa: E731 - micrometres to level-0 px
        self.nbx, self.nby = math.ceil(W / BLOCK), math.ceil(H / BLOCK)
        rng = seeded_rng(cfg.seed, S_GLOBAL)

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
        # The ink is drawn whatever --pen-ink says, so every later draw (and the slide) stays the same.
        drawn = _RANDOM_INKS[int(rng.integers(3))]
        self.pen_ink_name = drawn if cfg.pen_ink == "random" else cfg.pen_ink
        self.pen_ink = np.array(_PEN_INKS.get(self.pen_ink_name, (1.0, 1.0, 1.0)), np.float32)
        self.pen, self.pen_bbox, self.pen_line = self._pen(rng, gh, gw, pen_width_um)
        if self.pen_ink_name == "none":
            self.pen = np.zeros_like(self.pen)

        # Out-of-focus patch: an ellipse.
        r = min(0.09 * min(W, H), self.px(1000.0))
        for _ in range(50):
            cx, cy = rng.uniform(0.2 * W, 0.8 * W), rng.uniform(0.2 * H, 0.8 * H)
            bb = (cx - 1.4 * r, cy - r, 2.8 * r, 2 * r)
            if not overlap(bb, self.pen_bbox):
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
        if all(c in BLOOD_FREQ for c in self.background_classes):
            wts = np.array([BLOOD_FREQ[c] for c in self.background_classes])
        else:
            wts = np.ones(len(self.background_classes))
        self.bg_weights = wts / wts.sum()
        epi = self.bg_weights * np.array([c not in NON_EPITHELIAL for c in self.background_classes])
        self.group_cum = np.cumsum(epi / epi.sum() if epi.sum() > 0 else self.bg_weights)
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
        self.truth: list[tuple] = []  # (y, x, w, h, image, suspicious, region, blurred, nucleus, group)
        self.placed: list[tuple[int, int, int, int, int]] = []  # nucleated sprites: (x0, y0, image, orient, group)
        self.n_red = 0
        self.n_debris = 0
        self.debris_boxes: list[list[int]] = []
        self.glass = slide_glass(cfg.seed, bank)
        # Blocks that any cell (red or nucleated, from any block) reaches: the rest is bare glass.
        self.occupied = np.zeros((self.nby, self.nbx), bool)
        self._record(self.region_cells)

    # ---- global objects

    def _pen(self, rng, gh: int, gw: int, width_um: float | None = None):
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
        width = min(0.03 * min(W, H), self.px(600.0)) if width_um is None else self.px(width_um)
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
        rng = seeded_rng(cfg.seed, S_REGIONS)
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
            if any(overlap(bb, a) for a in avoid) or any(overlap(spaced, [r.x, r.y, r.w, r.h]) for r in regions):
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
        rng = seeded_rng(cfg.seed, S_PLANT)
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
                           images, rng.integers(0, 8, n), np.zeros(n), np.full(n, ri), susp, np.full(n, -1))
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
        rng = seeded_rng(cfg.seed, S_CANDIDATES, bi, bj)
        x0, y0 = bj * BLOCK, bi * BLOCK
        bw, bh = min(BLOCK, cfg.width - x0), min(BLOCK, cfg.height - y0)
        area_um2 = bw * bh * cfg.mpp**2
        pts: list[tuple[float, float]] = []
        # Clusters, mostly in dense fields.
        u_block = self.density[bi, bj]
        pap = cfg.stain == "pap"  # Pap (thyroid FNA): more and larger cohesive groups
        if pap:
            p_cluster = 0.9 if u_block > 0.85 else (0.5 if u_block > 0.45 else (0.15 if u_block > _EMPTY_BELOW else 0))
        else:
            p_cluster = 0.35 if u_block > 0.85 else (0.05 if u_block > 0.45 else 0.0)
        p_cluster *= min(1.0, area_um2 / 16000.0)
        if rng.random() < p_cluster:
            ccx, ccy = x0 + rng.uniform(0, bw), y0 + rng.uniform(0, bh)
            n = int(rng.integers(6, 20)) * (3 if pap else 1)
            golden = np.pi * (3 - np.sqrt(5))
            for k in range(n):
                # Pap: nuclei ~12 um apart, so the 14-19 um cytoplasm bodies touch (a cohesive sheet)
                r = (0.45 if pap else 0.62) * self.nuc_min * math.sqrt(k + 0.5) * rng.uniform(0.95, 1.1)
                th = k * golden + rng.uniform(-0.2, 0.2)
                x, y = ccx + r * math.cos(th), ccy + r * math.sin(th)
                if all((x - a) ** 2 + (y - b) ** 2 >= ((0.7 if pap else 0.9) * self.nuc_min) ** 2 for a, b in pts):
                    pts.append((x, y))
        n_grouped = len(pts)
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
            # Pap groups are epithelial: the same draw, among the classes that get a cytoplasm body
            c = min(int(np.searchsorted(self.group_cum if pap and i < n_grouped else cum, draw[i], side="right")),
                    len(self.bg_images) - 1)
            images[i] = self.bg_images[c][int(pick[i] % len(self.bg_images[c]))]
        cx = np.array([p[0] for p in pts], np.int64).reshape(-1)
        cy = np.array([p[1] for p in pts], np.int64).reshape(-1)
        group = np.where(np.arange(m) < n_grouped, bi * self.nbx + bj, -1).astype(np.int64)
        cells = _Cells(cx, cy, images, rng.integers(0, 8, m), np.zeros(m), np.full(m, -1), np.zeros(m, bool), group)
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
            o = int(cells.orient[i])
            m = oriented(mask, o)
            h, w = m.shape
            rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            x0, y0 = int(cells.cx[i]) - w // 2, int(cells.cy[i]) - h // 2
            nuc = self.bank.nuclei.get(int(cells.image[i]))
            if nuc is not None:  # level-0 (x, y) of the nucleus centre
                r, c = oriented_point(nuc[0], nuc[1], mask.shape, o)
                nuc = (round(x0 + c, 1), round(y0 + r, 1))
            self.placed.append((x0, y0, int(cells.image[i]), o, int(cells.group[i])))
            self.truth.append((y0 + int(rows[0]), x0 + int(cols[0]), int(cols[-1] - cols[0] + 1),
                               int(rows[-1] - rows[0] + 1), int(cells.image[i]), bool(cells.suspicious[i]),
                               int(cells.region[i]), bool(blurred[i]), nuc, int(cells.group[i])))

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
        rng = seeded_rng(cfg.seed, S_RBC, bi, bj)
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
                    put(oriented(k, int(orient[i])), xs[i], ys[i])
                self.n_red += int(keep.sum())

        # Debris anywhere, empty fields included.
        rng = seeded_rng(cfg.seed, S_DEBRIS, bi, bj)
        n = int(rng.poisson(1.2 * bw * bh / BLOCK**2))
        for _ in range(n):
            x, y = x0 + rng.uniform(0, bw), y0 + rng.uniform(0, bh)
            d, o = int(rng.integers(len(self.bank.debris))), int(rng.integers(8))
            k = self.bank.debris_f[d]
            if self._in_blur(x, y):
                k = self.bank.blurred(("debris", d), self.bank.debris[d], self.blur_sigma)[0]
            put(oriented(k, o), x, y, cell=False)
            m = oriented(self.bank.debris[d][1], o)
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
                put(oriented(sprite[0], int(cells.orient[i])), cells.cx[i], cells.cy[i])

        blk = _Block(np.array(ex0, np.int64), np.array(ey0, np.int64), np.array(ex1, np.int64),
                     np.array(ey1, np.int64), sprites)
        self._blocks[key] = blk
        return blk

    def cell_masks(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 masks of the nucleated cells laid out so far within [0, width) x [0, height):
        (every cell, the cells of cohesive groups)."""
        cells = np.zeros((height, width), bool)
        grouped = np.zeros((height, width), bool)
        for x0, y0, image, o, group in self.placed:
            m = oriented(self.bank.cell(image)[1], o)
            h, w = m.shape
            a, b = max(y0, 0), min(y0 + h, height)
            c, d = max(x0, 0), min(x0 + w, width)
            if a >= b or c >= d:
                continue
            sub = m[a - y0:b - y0, c - x0:d - x0]
            cells[a:b, c:d] |= sub
            if group >= 0:
                grouped[a:b, c:d] |= sub
        return cells, grouped

    def pen_truth(self) -> dict:
        """The pen stroke as ground truth: ink cover >= ``PEN_TRUTH_ALPHA`` on the coarse grid,
        run-length encoded over the grid (row-major runs of [start, length]); see ``pen_stroke_mask``."""
        g = self.gstep
        on = self.pen >= PEN_TRUTH_ALPHA
        flat = on.ravel()
        edges = np.flatnonzero(np.diff(np.concatenate([[0], flat.view(np.int8), [0]])))
        runs = [[int(a), int(b - a)] for a, b in zip(edges[::2], edges[1::2])]
        # level-0 area: the grid cells, clipped at the slide's right and bottom edges
        cw = np.minimum((np.arange(on.shape[1]) + 1) * g, self.cfg.width) - np.arange(on.shape[1]) * g
        ch = np.minimum((np.arange(on.shape[0]) + 1) * g, self.cfg.height) - np.arange(on.shape[0]) * g
        area = int((on * ch[:, None] * cw[None, :]).sum())
        rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
        bbox = ([int(cols[0] * g), int(rows[0] * g), int(min((cols[-1] + 1) * g, self.cfg.width) - cols[0] * g),
                 int(min((rows[-1] + 1) * g, self.cfg.height) - rows[0] * g)] if rows.size else None)
        return {"grid_step": int(g), "grid_shape": [int(on.shape[0]), int(on.shape[1])],
                "alpha": PEN_TRUTH_ALPHA, "runs": runs, "area_px": area, "bbox": bbox}

    def evict_before(self, bi: int) -> None:
        """Forget what rendering from block row ``bi`` on can no longer need.

        A block needs the final cells of its neighbours, which need the candidates of theirs.
        """
        for cache, first in ((self._blocks, bi), (self._final, bi - 1), (self._cand, bi - 2)):
            for key in [k for k in cache if k[0] < first]:
                del cache[key]
