"""Papanicolaou (Pap) stain for synthetic smears: real cells recoloured with the Pap dyes.

The shipped cells are May-Gruenwald-Giemsa (Romanowsky) blood cells. For ``--stain pap`` each cut-out
cell is turned back into optical density against its own glass (Beer-Lambert,
``OD_c = -log10(I_c / I0_c)``), split into a nuclear (chromatin) part and a cytoplasm part, and
rendered again as the sum of Pap dye densities, ``OD = c_H * v_H + c_cyt * v_cyt``, ``T = 10^-OD``:
hematoxylin for the nucleus, Light Green SF (cyanophilic, blue-green) for most cytoplasm, Orange G
or eosin Y (orangeophilic / eosinophilic) for a share of the cells, chosen per source cell from the
seed. Red cells become pale orange-red (eosin Y + Orange G).

Why the nucleus is split off by density, not by colour deconvolution: in these images the OD
direction of MGG nuclei (~(0.50, 0.80, 0.20)) and of MGG cytoplasm (~(0.18, 0.28, 0.08)) are a
few degrees apart, so deconvolution against Romanowsky vectors is ill-conditioned; their OD
magnitudes differ three- to five-fold (nuclei ~1.5, cytoplasm ~0.3-0.6 summed over R, G, B), so a
per-cell Otsu threshold on the summed OD, with a soft ramp, separates them (``nuclear_weight``).

Epithelial cells (thyroid follicular cells) have far more cytoplasm than blood cells, so every
nucleated cell except lymphocytes and platelets gets a cytoplasm body of 14-19 um around its real
nucleus (a smooth, slightly irregular ellipse with fine texture and a denser rim); in the layout's
clusters these bodies touch and overlap, which makes the cohesive, blue-green cell groups the pen
rule must not take for ink.

Dye OD vectors (RGB, unit length) are derived here, not copied: each dye's absorbance spectrum is
modelled as Gaussian bands at its published absorption maxima, and averaged over Gaussian camera
channel sensitivities (R 600 nm, G 535 nm, B 455 nm; FWHM 90, 90, 80 nm) in the low-density
(linear) limit. Absorption maxima (Conn's Biological Stains, 10th ed., and the Sigma-Aldrich
product data):

===================  =================================================  =======================
dye                  bands used (peak nm, FWHM nm, relative height)     OD vector (R, G, B)
===================  =================================================  =======================
hematoxylin (Al)     575 / 160 / 1 (hemalum lake: broad, max 560-600)   (0.716, 0.661, 0.225)
Light Green SF       630 / 70 / 1 and 422 / 60 / 0.3 (max 630, 422)      (0.950, 0.183, 0.252)
Orange G             478 / 90 / 1 (max 478)                              (0.069, 0.509, 0.858)
eosin Y              517 / 36 / 1 and 490 / 40 / 0.3 (max 517, sh. 490)  (0.116, 0.897, 0.427)
===================  =================================================  =======================

A check against a measurement: Ruifrok and Johnston (Anal Quant Cytol Histol 23:291, 2001)
measured hematoxylin as (0.650, 0.704, 0.286) and eosin as (0.072, 0.990, 0.105) on an RGB
camera; the vectors derived here lie 6 and 19 degrees from those (``tests/test_synth_pap.py``
checks < 10 and < 25 degrees). Light Green at a peak OD of 0.32-0.6 renders as (111, 201, 191) to
(58, 178, 161) on glass of 232: blue-green with saturation 0.45-0.67.
Part of ``wsi_pipeline.synth``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CAMERA_BANDS", "DYES", "Dye", "EOSIN_Y", "HEMATOXYLIN", "LIGHT_GREEN", "ORANGE_G", "RED_CELL_DYE",
    "dye_od_vector", "nuclear_weight", "nucleus_centre", "pap_cell", "pap_red_cell",
]


@dataclass(frozen=True)
class Dye:
    """A dye's absorbance spectrum as Gaussian bands: ((peak nm, FWHM nm, relative height), ...)."""

    name: str
    bands: tuple[tuple[float, float, float], ...]


# Camera channels as (centre nm, FWHM nm): a typical RGB Bayer sensor behind an IR cut filter.
CAMERA_BANDS = {"R": (600.0, 90.0), "G": (535.0, 90.0), "B": (455.0, 80.0)}
DYES = {
    "hematoxylin": Dye("hematoxylin", ((575.0, 160.0, 1.0),)),
    "light_green_sf": Dye("light_green_sf", ((630.0, 70.0, 1.0), (422.0, 60.0, 0.3))),
    "orange_g": Dye("orange_g", ((478.0, 90.0, 1.0),)),
    "eosin_y": Dye("eosin_y", ((517.0, 36.0, 1.0), (490.0, 40.0, 0.3))),
}


def _gauss(wl: np.ndarray, centre: float, fwhm: float) -> np.ndarray:
    return np.exp(-0.5 * ((wl - centre) / (fwhm / 2.3548)) ** 2)


def dye_od_vector(dye: Dye) -> np.ndarray:
    """The dye's RGB optical-density direction (unit length, float32) from its absorbance bands."""
    wl = np.arange(380.0, 721.0, 1.0)
    absorb = sum(h * _gauss(wl, c, f) for c, f, h in dye.bands)
    v = np.array([(_gauss(wl, *CAMERA_BANDS[ch]) * absorb).sum() / _gauss(wl, *CAMERA_BANDS[ch]).sum()
                  for ch in "RGB"])
    return (v / np.linalg.norm(v)).astype(np.float32)


HEMATOXYLIN = dye_od_vector(DYES["hematoxylin"])
LIGHT_GREEN = dye_od_vector(DYES["light_green_sf"])
ORANGE_G = dye_od_vector(DYES["orange_g"])
EOSIN_Y = dye_od_vector(DYES["eosin_y"])
# Red cells in Pap smears: orange-red to pale, eosin Y and Orange G together.
RED_CELL_DYE = (0.35 * EOSIN_Y + 0.65 * ORANGE_G) / np.linalg.norm(0.35 * EOSIN_Y + 0.65 * ORANGE_G)

# Cytoplasm dyes: (share of cells, dye OD direction, range of the peak-channel OD of the cytoplasm).
# Light Green at peak OD 0.32-0.6 is blue-green with saturation 0.45-0.7 over glass: the
# saturated cyanophilic cytoplasm of well-stained Pap smears.
_CYTO_DYES = (
    (0.80, LIGHT_GREEN, (0.32, 0.60)),
    (0.10, (0.75 * ORANGE_G + 0.25 * EOSIN_Y), (0.20, 0.40)),  # orangeophilic
    (0.10, (0.85 * EOSIN_Y + 0.15 * ORANGE_G), (0.20, 0.40)),  # eosinophilic (pink)
)
_EPITHELIAL_DIAMETER_UM = (14.0, 19.0)


def _otsu(values: np.ndarray) -> float | None:
    from skimage.filters import threshold_otsu

    if values.size < 4 or np.ptp(values) < 1e-3:
        return None
    return float(threshold_otsu(values))


def nuclear_weight(od: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-pixel share (0..1) of a cell's optical density that belongs to its nucleus.

    ``od`` is (h, w, 3) log10 optical density against the cell's glass. The summed OD is
    thresholded per cell (Otsu inside ``mask``) with a soft ramp from 0.75 to 1.25 x the
    threshold; a cell whose densities do not split (threshold < 0.4) has no nucleus.
    """
    d = od.sum(axis=2)
    t = _otsu(d[mask])
    if t is None or t < 0.4:
        return np.zeros(d.shape, np.float32)
    x = np.clip((d - 0.75 * t) / (0.5 * t), 0.0, 1.0)
    return (x * x * (3.0 - 2.0 * x) * mask).astype(np.float32)


def nucleus_centre(weight: np.ndarray) -> tuple[float, float] | None:
    """(row, col) centroid of a nuclear weight map, or None without a nucleus."""
    s = float(weight.sum())
    if s < 4.0:
        return None
    rows, cols = np.mgrid[:weight.shape[0], :weight.shape[1]]
    return float((rows * weight).sum() / s), float((cols * weight).sum() / s)


def _od(k: np.ndarray) -> np.ndarray:
    return -np.log10(np.maximum(k.astype(np.float32) / 255.0, 1e-3))


def _to_sprite(od: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(255.0 * 10.0 ** (-od)), 0, 255).astype(np.uint8)


def _cell_body(shape: tuple[int, int], radius: float, rng: np.random.Generator, mpp: float) -> np.ndarray:
    """Soft alpha (0..1) of a slightly irregular ellipse of mean radius ``radius`` px at the centre."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    yy -= h // 2
    xx -= w // 2
    q, ang = rng.uniform(0.78, 1.0), rng.uniform(0, np.pi)
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = (-xx * np.sin(ang) + yy * np.cos(ang)) / q
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)
    edge = np.ones_like(r)
    for n in (2, 3, 5):  # low-order wobble of the outline
        edge += rng.uniform(0.0, 0.06) * np.cos(n * phi + rng.uniform(0, 2 * np.pi))
    soft = max(0.6, 0.4 / mpp)
    return np.clip((radius * edge - r) / soft + 0.5, 0.0, 1.0)


def _texture(shape: tuple[int, int], rng: np.random.Generator, mpp: float) -> np.ndarray:
    """Fine cytoplasm texture, mean 1, about +-12 %."""
    from scipy import ndimage as ndi

    n = ndi.gaussian_filter(rng.standard_normal(shape), max(0.8, 0.8 / mpp))
    return (1.0 + 0.12 * n / (n.std() + 1e-6)).astype(np.float32)


def pap_cell(k: np.ndarray, mask: np.ndarray, mpp: float, rng: np.random.Generator,
             epithelial: bool = True) -> tuple[np.ndarray, np.ndarray, tuple[float, float] | None]:
    """A cut-out Romanowsky cell re-rendered as Pap-stained.

    ``k`` is the attenuation sprite (uint8, 255 = clear, transmittance against the cell's own
    glass, before any white-balance correction), ``mask`` its cell mask, ``mpp`` the sprite's
    pixel size. Returns (sprite, mask, nucleus centre (row, col) or None); the sprite keeps its
    centre at index (h // 2, w // 2), so an epithelial body larger than the source pads it evenly.
    """
    from scipy import ndimage as ndi

    od = _od(k)
    wn = nuclear_weight(od, mask)
    d = od.sum(axis=2)
    h0, w0 = mask.shape
    if epithelial:
        radius = 0.5 * rng.uniform(*_EPITHELIAL_DIAMETER_UM) / mpp
        half = int(np.ceil(1.2 * radius)) + 3
        py, px = max(0, half - h0 // 2), max(0, half - w0 // 2)
        od = np.pad(od, ((py, py), (px, px), (0, 0)))
        wn, d = np.pad(wn, ((py, py), (px, px))), np.pad(d, ((py, py), (px, px)))
        mask = np.pad(mask, ((py, py), (px, px)))
        body = _cell_body(mask.shape, radius, rng, mpp)
        yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
        rim = 1.0 + 0.25 * np.clip(np.hypot(yy - mask.shape[0] // 2, xx - mask.shape[1] // 2) / radius, 0, 1) ** 4
    else:
        body = np.zeros(mask.shape, np.float32)
        rim = 1.0
    alpha = np.maximum(body, ndi.gaussian_filter(mask.astype(np.float32), 0.7))
    # Cytoplasm dye: its amount from the cell's draw, its texture from the source cytoplasm and noise.
    u = rng.random()
    cum = np.cumsum([s for s, _, _ in _CYTO_DYES])
    _, vec, (lo, hi) = _CYTO_DYES[min(int(np.searchsorted(cum, u, side="right")), len(_CYTO_DYES) - 1)]
    vec = np.asarray(vec, np.float32) / np.linalg.norm(vec)
    peak = rng.uniform(lo, hi)
    src = (1.0 - wn) * d * mask
    med = float(np.median(src[mask & (wn < 0.5)])) if (mask & (wn < 0.5)).any() else 0.0
    src_tex = np.where(mask, np.clip(src / med, 0.6, 1.6), 1.0) if med > 0.02 else 1.0
    c_cyt = alpha * rim * _texture(mask.shape, rng, mpp) * src_tex * (peak / float(vec.max()))
    # Nucleus: hematoxylin in proportion to the source chromatin density (its texture kept).
    gain = rng.uniform(0.6, 0.85)
    c_h = wn * d * gain / float(HEMATOXYLIN.sum())
    out = c_h[..., None] * HEMATOXYLIN + c_cyt[..., None] * vec
    new_mask = (alpha >= 0.5) | mask
    return _to_sprite(out), new_mask, nucleus_centre(wn)


def pap_red_cell(k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A Romanowsky red-cell sprite re-rendered pale orange-red (eosin Y + Orange G), same shape."""
    d = _od(k).sum(axis=2)
    c = d * rng.uniform(0.45, 0.7) / float(RED_CELL_DYE.sum())
    return _to_sprite(c[..., None] * RED_CELL_DYE)
