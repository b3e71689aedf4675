"""Cytology-aware foreground detection, tile foreground fractions and focus scores.

Why not the histology recipe: tissue tools threshold a greyscale thumbnail at ~8 um/px with Otsu
and drop regions below a minimum area. A cytology smear is sparse cells (8-20 um) on a pale
background, so at 8 um/px a cell is one or two blended pixels, Otsu has no second mode to find and
the area filter deletes what survives. Here the mask is computed at ~2 um/px (``WORKING_MPP``) in
optical-density (OD) and saturation space relative to a background estimated per image, with all
morphology sizes given in micrometres and converted with the image's mpp, so the same call works
on a slide thumbnail (2-4 um/px) and on a native-resolution field (0.07-0.5 um/px).

Artefacts removed before the decision: pen ink (:func:`pen_mask`: red, green/blue, black),
glass edges and dark borders (dark, colourless pixels), and dust (objects smaller than the
preset's ``min_object_um``). The glass is estimated per image as its brightest dominant colour
mode, tinted or not (an off scanner white balance, yellowed or bluish glass), and stain and ink are
judged relative to it per channel, so a uniform cast cancels. Uneven illumination is handled by
fitting a smooth (separable quadratic) surface to the glass-coloured pixels instead of a fixed 220
cut. See docs/foreground.md for the method and the figures measured on real data.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .nuclei import (CELL_RADIUS_UM, MIN_DENSITY, MIN_RELATIVE_CONTRAST, NUCLEUS_MAX_UM, Nuclei, centre_pixels,
    label_nuclei, nucleus_pixels, tophat_halo)
from .stain import STAINS, StainDecision, classify_stain, sheet_share
from .colour_codes import _DARK, _SEED, _code_index, _codes, _lookup
from .glass import _fit_background, _subsample_step
from .ink import _FAR_FROM_NUCLEI_UM, _ink_regions, _near_nuclei, _stroke_density
from .morphology import _block_mean, _clean_banded, _dilate_local, _erode, _grow, _remove_small, _upsample
from .parallel import _BAND_ROWS, _Serial, _bands, _pool
from .pixels import _LOG10_U8, _as_rgb
from .presets import StainPreset, get_preset

__all__ = ["WORKING_MPP", "pen_mask", "ForegroundResult", "detect_foreground", "foreground_mask", "decide_stain"]

# 2 um/px: the smallest cells that matter (lymphocytes, red cells, ~7-8 um) still span ~4 px, so
# they survive denoising and the dust filter, while a 20 x 20 mm smear area is a 10k x 10k px
# thumbnail at most (typical scanned areas: <= 5000 px a side). 4 um/px would leave 2 px per cell,
# and the ~8 um/px of histology tools leaves one blended pixel (see otsu_baseline_mask).
WORKING_MPP: float = 2.0

# Finer inputs are block-averaged down to about this pixel size before thresholding: cells are
# >= 2 um, so nothing is lost, noise is averaged out and a 640x480 field at 0.07 um/px costs a few ms.
_FINEST_MPP = 0.5
# Margin removed around dark, colourless pixels (glass edges, borders), um.
_DARK_MARGIN_UM = 2.0


def pen_mask(rgb: np.ndarray, mpp: float | None = None) -> np.ndarray:
    """Pixels covered by marker ink (red, green/blue, black); bool, same H x W as ``rgb``.

    Marker ink is purer than any stain. Red ink is scarlet (hue 348-12 deg, green and blue both
    low and about equal) where eosin, Romanowsky pink and red cells in H&E keep blue well above
    green (hue 320-345). Green/blue ink has green >= red (cyan to blue), which hematoxylin and
    Romanowsky/Pap nuclei (purple, red > green) never have, and is far more saturated than pale
    blue cytoplasm. Black ink is dark and colourless. Confident ink pixels seed a region that
    grows into the paler fringe and the darker, overdrawn core of the same stroke (hysteresis),
    because pen strokes are thick, out of focus and layered.

    With ``mpp`` given, ink-coloured regions smaller than a 60 um disc are dropped: a marker
    stroke is a fraction of a millimetre wide, while the occasional bright-red cell cluster in
    H&E that meets a colour rule is small.

    Colour only proposes: a proposed region is ink only if it also looks like ink (no nuclei,
    uniform; see :func:`_ink_regions`), so blue-green Pap cytoplasm around its nuclei is never
    called ink. Without ``mpp``, nuclei are sized as if the image were at 0.5 um/px.
    """
    rgb = _as_rgb(rgb)
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        return np.zeros((h, w), dtype=bool)
    if mpp is None:
        return _ink_at_unknown_scale(rgb)
    return detect_foreground(rgb, mpp, "pap").ink


def _ink_at_unknown_scale(rgb: np.ndarray) -> np.ndarray:
    """Ink of an image of unknown pixel size: no stroke-size test, nuclei sized at 0.5 um/px."""
    mpp = _FINEST_MPP
    stained, codes, pixels, _ = _pixel_pass(rgb, mpp, get_preset("pap"), _fit_background(rgb))
    nuclei = label_nuclei(pixels & stained & ((codes & _DARK) == 0), mpp)
    return _ink_regions(codes, nuclei, mpp, size_filter=False)[0]


def _stain_test(band: np.ndarray, surface, preset: StainPreset, sigma: float) -> np.ndarray:
    """Stained pixels of a uint8 RGB ``band``; ``surface(c)`` is the log10 glass of channel ``c``
    on the band's grid. Smoothed by ``sigma`` px when that is at least half a pixel.

    Per channel, d = log10(I0) - log10(I) is the optical density above the glass. Stained: the
    mean of max(d, 0) over R, G, B reaches ``od_threshold``, or the background-normalised
    saturation 1 - Tmin/Tmax = 1 - 10^-(dmax - dmin) reaches ``saturation_threshold``
    (compared in the OD domain, so no power is taken per pixel).
    """
    return _stain_tests(band, surface, (preset,), sigma) != 0


def _stain_tests(band: np.ndarray, surface, presets: tuple[StainPreset, ...], sigma: float) -> np.ndarray:
    """:func:`_stain_test` of several presets from one smoothing: uint8, bit ``i`` set where
    ``presets[i]`` finds the pixel stained (at most 8 presets)."""
    od = np.zeros(band.shape[:2], dtype=np.float32)
    dmax = np.full(band.shape[:2], -np.inf, dtype=np.float32)
    dmin = np.full(band.shape[:2], np.inf, dtype=np.float32)
    for c in range(3):
        d = surface(c)
        d -= _LOG10_U8[band[..., c]]
        np.maximum(dmax, d, out=dmax)
        np.minimum(dmin, d, out=dmin)
        np.maximum(d, 0.0, out=d)
        od += d
    od /= 3.0
    spread = dmax - dmin
    if sigma >= 0.5:
        od = ndi.gaussian_filter(od, sigma)
        spread = ndi.gaussian_filter(spread, sigma)
    out = np.zeros(band.shape[:2], dtype=np.uint8)
    for i, preset in enumerate(presets):
        spread_thr = np.float32(-np.log10(max(1e-6, 1.0 - preset.saturation_threshold)))
        out |= ((od >= preset.od_threshold) | (spread >= spread_thr)).view(np.uint8) << np.uint8(i)
    return out


def _smoothing_halo(sigma: float) -> int:
    """Context rows a band needs so that :func:`_stain_test`'s smoothing is exact in it."""
    return int(np.ceil(4 * sigma)) if sigma >= 0.5 else 0


# --------------------------------------------------------------------------- foreground

@dataclass(frozen=True)
class ForegroundResult:
    """Everything the foreground stage decides on one image (all on the input grid).

    ``nuclei``: (n, 2) row, col centres of the nuclei found (see :mod:`wsi_pipeline.foreground.nuclei`);
    ``ink``: pixels removed as marker ink, with the margin around each stroke;
    ``ink_spared``: ink-coloured pixels kept because their region holds nuclei or texture (Pap
    cytoplasm, not ink); ``nuclei_in_ink``: nuclei lying in an ink-coloured region that was
    removed as ink (the cell around each is kept, but a user should know); ``ink_opaque``: the
    parts of ``ink`` too dense to find a nucleus through (see :func:`_opaque_ink`).
    """

    mask: np.ndarray
    nuclei: np.ndarray
    ink: np.ndarray
    ink_spared: np.ndarray
    nuclei_in_ink: int
    stain: str
    ink_opaque: np.ndarray | None = None

    @property
    def ink_share(self) -> float:
        """Share of the foreground-or-ink area that was removed as ink."""
        total = int(np.count_nonzero(self.mask | self.ink))
        return float(np.count_nonzero(self.ink)) / total if total else 0.0


def detect_foreground(rgb: np.ndarray, mpp: float, stain: str | StainPreset = "pap",
                      workers: int | None = None, *, pen_filter: bool = True) -> ForegroundResult:
    """Foreground mask, nuclei and marker ink of an RGB image of pixel size ``mpp`` (um).

    Every morphological size is in um and converted with ``mpp``. Works for slide thumbnails
    (~2-4 um/px) and native fields (0.07-0.5 um/px; these are block-averaged to ~0.5 um/px first
    and the mask is expanded back with edges redrawn at native resolution). A pixel is
    foreground when its optical density above the local background or its background-normalised
    saturation passes the preset's threshold, it is not ink / a dark edge, and it belongs to an
    object of at least ``min_object_um``; a nucleus is always foreground. ``pen_filter=False``
    keeps ink-coloured regions (an escape hatch for stains the ink rule misjudges).

    Large images are processed in row bands by ``workers`` threads (default: the CPU count, at
    most 4); bands carry enough context rows that the result equals the single-band one.
    """
    preset = get_preset(stain)
    work = _working_image(rgb, mpp, workers)
    if work.img is None:
        empty = np.zeros(work.rgb.shape[:2], dtype=bool)
        return ForegroundResult(empty, np.zeros((0, 2)), empty, empty, 0, preset.name, empty)
    with _pool(work.workers) as pool:
        st, _ = _stained_and_artefacts(work.img, work.mpp, preset, pool, work.bg, pen_filter=pen_filter)
        fg = _clean_banded(st.stained & ~st.artefact, work.mpp, preset, pool) & ~st.artefact
    return _result(work, st, fg, preset)


@dataclass(frozen=True)
class _Working:
    """An image prepared for the foreground stage: ``img`` at ``mpp`` (``rgb``, of pixel size
    ``native_mpp``, block-averaged by ``f``; None when the image is empty), its glass ``bg`` and
    the threads to use."""

    rgb: np.ndarray
    native_mpp: float
    img: np.ndarray | None
    f: int
    mpp: float
    workers: int
    bg: "_Background | None"


def _working_image(rgb: np.ndarray, mpp: float, workers: int | None) -> _Working:
    rgb = _as_rgb(rgb)
    if not (isinstance(mpp, (int, float, np.floating, np.integer)) and np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    H, W = rgb.shape[:2]
    if H == 0 or W == 0:
        return _Working(rgb, float(mpp), None, 1, float(mpp), 1, None)
    f = max(1, int(_FINEST_MPP / mpp))
    img = rgb if f == 1 else np.clip(_block_mean(rgb, f) + 0.5, 0, 255).astype(np.uint8)
    workers = max(1, min(4, os.cpu_count() or 1) if workers is None else int(workers))
    if img.shape[0] * img.shape[1] < _PARALLEL_MIN_PX:
        workers = 1
    return _Working(rgb, float(mpp), img, f, float(mpp) * f, workers, _fit_background(img))


def _result(work: _Working, st: "_PixelStage", fg: np.ndarray, preset: StainPreset) -> ForegroundResult:
    """The foreground result from the pixel stage ``st`` and its cleaned foreground ``fg`` (working grid)."""
    rgb, f = work.rgb, work.f
    H, W = rgb.shape[:2]
    nuc = st.nuclei
    if len(nuc):
        fg |= nuc.mask
    in_ink = 0
    if len(nuc) and st.ink.any():
        touching = _dilate_local(st.ink, 1)
        # a centre is in ink when its pixel is (no labelling needed: only "labelled or not" is asked)
        in_ink_px = st.ink | _near_nuclei(nuc, work.mpp, within=touching) & touching
        del touching
        in_ink = int(np.count_nonzero(in_ink_px[centre_pixels(nuc.centres, in_ink_px.shape)]))
        del in_ink_px
    ink, spared, opaque = st.ink, st.ink_spared, st.ink_opaque
    if f > 1:
        fg = _refine_edges(rgb, fg, f, work.bg, preset, work.native_mpp)
        ink = _upsample(ink, f, H, W)
        spared = _upsample(spared, f, H, W)
        opaque = _upsample(opaque, f, H, W)
    centres = (nuc.centres + 0.5) * f - 0.5 if f > 1 else nuc.centres
    return ForegroundResult(fg, centres, ink, spared, in_ink, preset.name, opaque)


def foreground_mask(rgb: np.ndarray, mpp: float, stain: str | StainPreset = "pap",
                    workers: int | None = None, *, pen_filter: bool = True) -> np.ndarray:
    """Boolean foreground (cells / tissue) mask, same H x W as ``rgb``; see :func:`detect_foreground`."""
    return detect_foreground(rgb, mpp, stain, workers, pen_filter=pen_filter).mask


def decide_stain(rgb: np.ndarray, mpp: float, workers: int | None = None, *,
                 pen_filter: bool = True) -> tuple[StainDecision, ForegroundResult]:
    """Choose the stain preset for an overview (:func:`wsi_pipeline.foreground.stain.classify_stain`) and
    return the decision with the foreground found with that preset.

    The decision is made on the ``pap`` preset's foreground (the most inclusive stain test), less
    the ink-coloured regions the pen rule spared, on an evenly subsampled copy of the image (at
    most ~250k pixels), so it costs one extra background fit. The per-pixel pass tests every
    preset at once (one smoothing, :func:`_pixel_pass_presets`); when another preset is chosen
    and its stain test passes the same nucleus pixels as the ``pap`` test (every real field and
    smear measured: nucleus pixels are dark), the ``pap`` stage's nuclei, ink and artefacts are
    its own and only the cleaning is done again; otherwise its stage is made anew. Either way
    the result is :func:`detect_foreground`'s with that preset.
    """
    work = _working_image(rgb, mpp, workers)
    if work.img is None:
        first = detect_foreground(work.rgb, mpp, "pap", workers, pen_filter=pen_filter)
        return classify_stain(np.zeros((0, 0, 3), np.float32), first.mask, 0.0), first
    pap, others = get_preset("pap"), tuple(get_preset(s) for s in STAINS if s != "pap")
    with _pool(work.workers) as pool:
        passes = [_pixel_pass_presets(work.img, work.mpp, (pap, *others), work.bg, pool)]
        stage, same_nuclei = _stained_and_artefacts(work.img, work.mpp, pap, pool, work.bg, pen_filter=pen_filter,
                                                    passes=passes, others=others)
        first = _result(work, stage, _clean_banded(stage.stained & ~stage.artefact, work.mpp, pap, pool)
                        & ~stage.artefact, pap)
        decision = _classify(work.rgb, float(mpp), first)
        if decision.stain == "pap":
            return decision, first
        del first
        preset = get_preset(decision.stain)
        stained = same_nuclei.pop(preset, None)
        if stained is not None:  # the same nuclei, ink and artefacts: only the stain test differs
            stage = dataclasses.replace(stage, stained=np.unpackbits(stained, count=stage.stained.size)
                                        .view(bool).reshape(stage.stained.shape))
        else:  # this preset's stain test passes other nucleus pixels: its own stage, as alone
            del stage
            stage, _ = _stained_and_artefacts(work.img, work.mpp, preset, pool, work.bg, pen_filter=pen_filter)
        del same_nuclei
        fg = _clean_banded(stage.stained & ~stage.artefact, work.mpp, preset, pool) & ~stage.artefact
    return decision, _result(work, stage, fg, preset)


def _classify(rgb: np.ndarray, mpp: float, first: ForegroundResult) -> StainDecision:
    """:func:`classify_stain` of ``rgb`` from its ``pap`` foreground ``first`` (see :func:`decide_stain`)."""
    H, W = rgb.shape[:2]
    step = _subsample_step(H, W)
    sub = np.ascontiguousarray(rgb[::step, ::step])
    bg = _fit_background(sub)
    od = np.stack([bg.rows(0, sub.shape[0], c) - _LOG10_U8[sub[..., c]] for c in range(3)], axis=-1)
    cells = np.zeros(sub.shape[:2], dtype=bool)
    if len(first.nuclei):
        cells[centre_pixels(first.nuclei, cells.shape, step)] = True
        cells = _dilate_local(cells, max(1, int(round(CELL_RADIUS_UM / (mpp * step)))))
    # ink the pen rule spared (its region holds nuclei) is left out of the colour: a blue stroke
    # across a Romanowsky smear otherwise reads as cyanophilic stain
    return classify_stain(od, first.mask[::step, ::step], sheet_share(first.mask, mpp), cells,
                          ink=first.ink_spared[::step, ::step])


# Smoothing (um) of the native-resolution test that places the mask's edges (see _refine_edges).
_EDGE_SIGMA_UM = 0.25


def _refine_edges(rgb: np.ndarray, fg: np.ndarray, f: int, bg: "_Background", preset: StainPreset,
                  mpp: float) -> np.ndarray:
    """Expand a mask made on f x f blocks to the native grid with its edges at native resolution.

    Blocks inside an object (all 8 neighbours foreground) stay whole, so filled holes and pale
    interiors survive; in the one-block-wide rim, a native pixel is kept when it passes the
    preset's stain test itself (lightly smoothed). Without this the edge is blocky by up to f
    native px, which at 0.07 um/px is 7 px of glass marked around every cell.
    """
    H, W = rgb.shape[:2]
    up = np.repeat(np.repeat(fg, f, axis=0), f, axis=1)[:H, :W]
    inner = _erode(fg, 1) if fg.any() else fg
    interior = np.repeat(np.repeat(inner, f, axis=0), f, axis=1)[:H, :W]
    rim = up & ~interior
    if not rim.any():
        return up
    rows = np.flatnonzero(rim.any(axis=1))
    sigma = _EDGE_SIGMA_UM / mpp
    halo = _smoothing_halo(sigma)
    rx = np.minimum(np.arange(W) // f, fg.shape[1] - 1)
    out = interior.copy()
    for lo in range(int(rows[0]), int(rows[-1]) + 1, _BAND_ROWS):  # bands bound the memory
        hi = min(H, lo + _BAND_ROWS)
        p0, p1 = max(0, lo - halo), min(H, hi + halo)
        ry = np.minimum(np.arange(p0, p1) // f, fg.shape[0] - 1)  # the coarse grid's rows
        stained = _stain_test(rgb[p0:p1], lambda c: bg.surface(ry, rx, c), preset, sigma)
        out[lo:hi] |= rim[lo:hi] & stained[lo - p0:hi - p0]
    return out


# Images smaller than this (working pixels) are done in one thread: thread start-up would cost more.
_PARALLEL_MIN_PX = 1 << 21


@dataclass(frozen=True)
class _PixelStage:
    """What the per-pixel stage finds on the working image (see :func:`_stained_and_artefacts`)."""

    stained: np.ndarray  # bool
    artefact: np.ndarray  # bool: ink (with its margin), dark edges
    nuclei: Nuclei
    ink: np.ndarray  # bool: ink regions with their margin (part of artefact)
    ink_spared: np.ndarray  # bool: ink-coloured regions kept because they hold nuclei or texture
    ink_opaque: np.ndarray  # bool: ink too dense to see a nucleus through (see _opaque_ink)


def _stained_and_artefacts(img: np.ndarray, mpp: float, preset: StainPreset, pool=None,
                           bg: "_Background | None" = None, pen_filter: bool = True, *,
                           passes: list | None = None, others: tuple[StainPreset, ...] = ()
                           ) -> tuple[_PixelStage, dict[StainPreset, np.ndarray]]:
    """Band-wise per-pixel stage: stained pixels, artefacts, nuclei and ink of the working image,
    and the presets that share them (empty without ``passes``, below).

    Stained as :func:`_stain_test` decides, after 0.5 um of smoothing; bands run on ``pool``.
    Ink is decided per region by :func:`_ink_regions` (colour, then shape and context).

    ``passes``: a one-item list holding :func:`_pixel_pass_presets` of ``(preset, *others)``,
    emptied here (its planes are freed as they are used, as the plain pass's are; the other
    presets' stain tests are kept bit-packed, 1/8 of a plane). The second item returned, ``same``,
    maps each preset of ``others`` whose stain test passes the same nucleus pixels as ``preset``'s
    (so its nuclei, ink and artefacts are this stage's: they depend on nothing else) to its
    stained plane, bit-packed (:func:`numpy.packbits`).
    """
    h, w = img.shape[:2]
    same: dict[StainPreset, np.ndarray] = {}
    if passes is None:
        bg = _fit_background(img) if bg is None else bg
        stained, codes, pixels, od_rg = _pixel_pass(img, mpp, preset, bg, pool)
    else:
        tests, codes, pixels, od_rg = passes.pop()
        stained = (tests & np.uint8(1)) != 0
        other_bits = {p: np.packbits((tests & np.uint8(1 << i)) != 0) for i, p in enumerate(others, 1)}
        del tests
    use_pen = preset.reject_pen and pen_filter
    if not (use_pen and (codes & (_SEED[0] | _SEED[1] | _SEED[2])).any()):
        od_rg = None  # only the ink decision uses it
    dark = (codes & _DARK) != 0  # dark and colourless: glass edges, borders, dust
    artefact = veto = dark
    edges = None
    if dark.any():  # the blurred grey fringe of a glass edge / border is not stain either
        r_dark = max(1, int(np.ceil(_DARK_MARGIN_UM / mpp)))
        artefact = _dilate_local(dark, r_dark)
        # next to an edge or border (a dark region larger than any nucleus) nothing is a nucleus;
        # next to a dark speck (JPEG noise in a very dark nucleus) a nucleus may be
        edges = _remove_small(dark, np.pi / 4.0 * (NUCLEUS_MAX_UM / mpp) ** 2)
        veto = _dilate_local(edges, r_dark) | dark if edges.any() else dark
    pixels &= ~veto
    if passes is not None:
        # the same nucleus pixels when no candidate lies where the two stain tests disagree; the
        # ink settings must match too (they decide the ink and its margin)
        for p, bits in other_bits.items():
            differ = np.unpackbits(bits, count=stained.size).view(bool).reshape(stained.shape)
            differ ^= stained
            differ &= pixels
            if not differ.any() and (p.reject_pen, p.pen_margin_um) == (preset.reject_pen, preset.pen_margin_um):
                same[p] = bits
            del differ
        del other_bits
    pixels &= stained
    del veto, dark, edges  # whole-overview planes: freed before the labelling and the ink stage
    nuclei = label_nuclei(pixels, mpp)
    del pixels
    if len(nuclei):  # a nucleus is foreground even where a dark speck's margin reaches it
        artefact &= ~nuclei.mask
    ink = spared = opaque = None
    if use_pen:
        # nuclei that are only red cells or debris seen through a stroke are dropped here
        ink, spared, nuclei = _ink_regions(codes, nuclei, mpp, od_rg=od_rg)
        del codes
        if ink.any() and od_rg is not None:
            opaque = _opaque_ink(ink, od_rg)
            grown = _grow(ink, preset.pen_margin_um / mpp) if preset.pen_margin_um > 0 else ink
            # the margin (a stroke's blurred fringe) never reaches into the cells around nuclei
            margin = grown & ~ink
            margin &= ~_near_nuclei(nuclei, mpp, _FAR_FROM_NUCLEI_UM, within=margin)
            ink = ink | margin
            artefact |= ink
    if ink is None:
        ink = spared = np.zeros((h, w), dtype=bool)
    if opaque is None:
        opaque = np.zeros((h, w), dtype=bool)
    return _PixelStage(stained, artefact, nuclei, ink, spared, opaque), same


# Ink whose nuclear density (min of red and green OD; the median over a stroke) reaches this hides
# nuclei: one is found only when it stands out by MIN_RELATIVE_CONTRAST of what lies around it, so
# under such ink a nucleus of the least density found (MIN_DENSITY) is not. Synthetic strokes: black
# ~0.6, blue ~0.25, green ~0.17, red ~0.07.
_OPAQUE_INK_DENSITY = MIN_DENSITY / MIN_RELATIVE_CONTRAST


def _opaque_ink(ink: np.ndarray, od_rg: np.ndarray) -> np.ndarray:
    """The strokes of ``ink`` (connected parts) too dense to see a nucleus through: there, "no
    nucleus found" is no evidence that none is there (the tiler does not drop such tiles)."""
    lab, n = ndi.label(ink, structure=np.ones((3, 3), bool))
    out = np.zeros(ink.shape, dtype=bool)
    for i, sl in enumerate(ndi.find_objects(lab), 1):
        if sl is None:
            continue
        part = lab[sl] == i
        if _stroke_density(od_rg, sl, part) >= _OPAQUE_INK_DENSITY:
            out[sl] |= part
    return out


def _pixel_pass(img: np.ndarray, mpp: float, preset: StainPreset, bg: "_Background", pool=None):
    """(stained, colour codes, nucleus pixels, red and green OD) of the working image, in row bands
    on ``pool``.

    Stained as :func:`_stain_test` decides after 0.5 um of smoothing; nucleus pixels as
    :func:`wsi_pipeline.foreground.nuclei.nucleus_pixels` decides on the red and green OD smoothed alike,
    each band on its own OD with the top-hat's context rows (exact, see :func:`tophat_halo`). The
    OD is returned as a :class:`_NuclearOD`, computed again where it is asked for: two float32
    planes of a 7,500 px overview would hold 450 MB through the ink stage."""
    passes, codes, pixels, od = _pixel_pass_presets(img, mpp, (preset,), bg, pool)
    return passes.view(bool), codes, pixels, od


def _pixel_pass_presets(img: np.ndarray, mpp: float, presets: tuple[StainPreset, ...], bg: "_Background",
                        pool=None):
    """:func:`_pixel_pass` with the stain tests of several ``presets`` (:func:`_stain_tests`: uint8, bit
    ``i`` for ``presets[i]``) in place of one stained plane."""
    h, w = img.shape[:2]
    sigma = 0.5 / mpp  # 0.5 um denoising; only worth it at fine pixel sizes
    od = _NuclearOD(img, bg, sigma)
    passes = np.empty((h, w), dtype=np.uint8)
    codes = np.empty((h, w), dtype=np.uint8)
    pixels = np.empty((h, w), dtype=bool)
    index = _code_index(bg.log_global)  # colour rules relative to the glass
    _lookup(np.zeros(1, dtype=np.int32))  # create the shared table before threads use it
    halo = tophat_halo(mpp)

    def band_work(b) -> None:
        lo, hi, plo, phi = b
        test = _stain_tests(img[plo:phi], lambda c: bg.rows(plo, phi, c), presets, sigma)
        passes[lo:hi] = test[lo - plo:hi - plo]
        del test
        codes[lo:hi] = _codes(img[lo:hi], index)
        c0, c1 = max(0, lo - halo), min(h, hi + halo)  # the top-hat's context
        red, green = od[0, c0:c1], od[1, c0:c1]
        pixels[lo:hi] = nucleus_pixels(red, green, mpp, rows=(lo - c0, hi - c0))

    for _ in (pool or _Serial()).map(band_work, list(_bands(h, _smoothing_halo(sigma)))):
        pass
    return passes, codes, pixels, od


class _NuclearOD:
    """The red and green OD above the glass of a working image, smoothed like the stain test,
    read as ``od[c, rows, cols]`` (channel 0 red or 1 green, slices without step; the one form
    its readers use, which a (2, H, W) array answers alike): each window is computed when asked
    for, with the smoothing's context around it, so it holds exactly the values of the
    whole-image array without keeping it."""

    def __init__(self, img: np.ndarray, bg: "_Background", sigma: float) -> None:
        self.img, self.bg, self.sigma = img, bg, float(sigma)
        self.shape = (2, *img.shape[:2])

    def __getitem__(self, key) -> np.ndarray:
        c, *window = key
        return self.window(c, *window)

    def window(self, c: int, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """OD of channel ``c`` (0 red, 1 green) on ``rows`` x ``cols`` (slices), float32."""
        h, w = self.shape[1:]
        r0, r1, rs = rows.indices(h)
        q0, q1, qs = cols.indices(w)
        if rs != 1 or qs != 1 or c not in (0, 1):
            raise IndexError("the OD is indexed by channel 0 or 1 and row and column slices without step")
        r1, q1 = max(r0, r1), max(q0, q1)
        halo = _smoothing_halo(self.sigma)
        p0, p1, s0, s1 = max(0, r0 - halo), min(h, r1 + halo), max(0, q0 - halo), min(w, q1 + halo)
        d = self.bg.surface(slice(p0, p1), slice(s0, s1), c) - _LOG10_U8[self.img[p0:p1, s0:s1, c]]
        if halo:
            d = ndi.gaussian_filter(d, self.sigma)
        return d[r0 - p0:r1 - p0, q0 - s0:q1 - s0]
