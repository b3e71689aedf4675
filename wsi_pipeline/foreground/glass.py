"""The glass (background) estimate: its dominant bright colour mode, tinted or not, and a smooth
illumination surface fitted to the glass-coloured pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .pixels import _LOG10_U8

__all__ = []

# The fitted glass surface stays within this factor of the global glass colour (a guard against
# extrapolating into areas without glass; microscope vignetting reaches ~30-40 % in the corners).
_BG_RANGE = 1.5
# Fallback background (per channel, 0..255) for images with no visible glass (fully covered).
_DEFAULT_BACKGROUND = np.array([240.0, 240.0, 240.0], dtype=np.float32)
# Glass estimate (see _glass_seed): colour histogram bits per channel, share of the largest bright
# mode a glass mode must reach, and the casts accepted as tinted glass (saturation; magenta or
# green deviation of log G from the mean of log R and log B, in log10 units).
_HIST_BITS = 5
_GLASS_PEAK_SHARE = 0.2
_GLASS_MAX_SAT = 0.35
# Darkest grey level (0..255) a glass mode may have: under-exposed camera fields (the Pap LBC
# fields) have glass at 110-130.
_GLASS_MIN_GREY = 95.0
_GLASS_MAX_MAGENTA = 0.04
# Chromaticity tolerance (log10, per channel) of the pixels the illumination surface is fitted to.
_GLASS_CHROMA = 0.03
# Pixels sampled (evenly spread) for the glass colour and the illumination fit.
_BG_SAMPLES = 250_000
# Grey-level band (log10) around the glass colour / surface of the pixels taken as glass: 6 %.
_GLASS_BAND = float(np.log10(1.06))


# --------------------------------------------------------------------------- background

@dataclass(frozen=True)
class _Background:
    """log10 glass intensity per channel, separable: ``ly[c](y) + lx[c](x)``, clipped."""

    ly: np.ndarray  # (H, 3)
    lx: np.ndarray  # (W, 3)
    log_global: np.ndarray  # (3,)

    def surface(self, ry, rx, c: int) -> np.ndarray:
        """log10 background of channel ``c`` on rows ``ry`` x columns ``rx`` (slices or index
        arrays of the image the background was fitted on), float32."""
        lim = np.float32(np.log10(_BG_RANGE))
        surf = self.ly[ry, c][:, None] + self.lx[rx, c][None, :]
        return np.clip(surf, self.log_global[c] - lim, self.log_global[c] + lim)

    def rows(self, lo: int, hi: int, c: int) -> np.ndarray:
        """log10 background of channel ``c`` for rows lo..hi, (hi-lo, W) float32."""
        return self.surface(slice(lo, hi), slice(None), c)


def _glass_seed(sub: np.ndarray) -> np.ndarray | None:
    """RGB of the glass: the brightest dominant colour mode that a light source can tint.

    A 3-D colour histogram (8 grey levels a bin, lightly smoothed) of the subsampled image is
    searched for modes holding at least ``_GLASS_PEAK_SHARE`` of the largest bright mode; the
    brightest of them is the glass (stain only absorbs, so the glass is the brightest large
    cluster). Its saturation is not required to be low, because scanners with an off white
    balance, yellowed mounting media and aged slides give a tinted glass (the synthetic smears of
    ``wsi_pipeline.synth`` used a peach one) and a colourless-only rule then finds no glass and
    calls every pixel stained. Only the casts that light and glass produce qualify: from yellow /
    orange to blue, saturation up to ``_GLASS_MAX_SAT``, green neither far above nor far below the
    mean of red and blue. Pink and magenta (eosin, red cells) and green-dominant modes are stain,
    so a field covered by pale eosin is not mistaken for glass. ``None``: no glass in view.
    """
    q = sub >> np.uint8(8 - _HIST_BITS)
    n = 1 << _HIST_BITS
    idx = (q[..., 0].astype(np.int32) << (2 * _HIST_BITS)) | (q[..., 1].astype(np.int32) << _HIST_BITS) | q[..., 2]
    hist = np.bincount(idx.ravel(), minlength=n ** 3).reshape(n, n, n).astype(np.float32)
    hist = ndi.gaussian_filter(hist, 0.7, mode="constant", truncate=2.5)
    centre = (np.arange(n, dtype=np.float32) + 0.5) * (256.0 / n)
    r, g, b = np.meshgrid(centre, centre, centre, indexing="ij")
    grey = (r + g + b) / 3.0
    mx = np.maximum(np.maximum(r, g), b)
    sat = 1.0 - np.minimum(np.minimum(r, g), b) / mx
    lr, lg, lb = np.log10(r), np.log10(g), np.log10(b)
    magenta = 0.5 * (lr + lb) - lg  # > 0: pink / magenta, < 0: green
    bright = grey > 100.0
    peak = float(hist[bright].max()) if bright.any() else 0.0
    if peak <= 0:
        return None
    ok = ((hist >= _GLASS_PEAK_SHARE * peak) & (grey >= _GLASS_MIN_GREY) & (sat <= _GLASS_MAX_SAT)
          & (np.abs(magenta) <= _GLASS_MAX_MAGENTA))
    if not ok.any():
        return None
    i = np.flatnonzero(ok.ravel())[np.argmax(grey.ravel()[ok.ravel()])]
    return np.array([r.ravel()[i], g.ravel()[i], b.ravel()[i]], dtype=np.float32)


def _subsample_step(h: int, w: int) -> int:
    """Pixel step that leaves <= ``_BG_SAMPLES`` pixels for the background estimate."""
    return max(1, int(np.ceil(np.sqrt(h * w / _BG_SAMPLES))))


def _glass_colour(sub: np.ndarray):
    """(log10 glass RGB, log10 image, pixels near the glass colour) or None without glass.

    The glass colour is the median of the pixels within 6 % of :func:`_glass_seed` in every
    channel.
    """
    seed = _glass_seed(sub)
    if seed is None:
        return None
    logs = [_LOG10_U8[sub[..., c]] for c in range(3)]  # log10 per channel, (h, w) float32 each
    band = np.float32(_GLASS_BAND)
    near = np.abs(logs[0] - np.float32(np.log10(seed[0]))) < band
    for c in (1, 2):
        near &= np.abs(logs[c] - np.float32(np.log10(seed[c]))) < band
    if near.sum() < 50:
        return None
    return np.log10(np.median(sub[near].astype(np.float32), axis=0)).astype(np.float32), logs, near


def _fit_background(img: np.ndarray) -> _Background:
    """Glass colour and illumination of a uint8 image.

    The glass colour comes from :func:`_glass_seed` and is refined as the median of the pixels
    within 6 % of it in every channel. A separable quadratic in log intensity
    (a + b x + c x^2 + d y + e y^2, per channel) is then fitted to the pixels whose colour is
    close to the current surface (grey level within 6 %, chromaticity within ``_GLASS_CHROMA``),
    starting from the flat glass colour and re-selecting around each fit, so it walks down a
    gradient of vignetting or uneven illumination that a single brightness band would cut off;
    pixels well below a fit (pale cell interiors) are dropped before refitting. The surface is
    held within ``_BG_RANGE`` of the global glass colour. With no glass in view (a fully covered
    field) a default white is used. Everything is relative to the glass per channel, so a uniform
    tint of the light or the glass cancels.
    """
    H, W = img.shape[:2]
    yn_all = (np.arange(H, dtype=np.float32) / max(H - 1, 1) - 0.5)
    xn_all = (np.arange(W, dtype=np.float32) / max(W - 1, 1) - 0.5)

    def flat(log_rgb: np.ndarray) -> _Background:
        log_rgb = np.asarray(log_rgb, dtype=np.float32)
        return _Background(np.broadcast_to(log_rgb, (H, 3)).copy(), np.zeros((W, 3), np.float32), log_rgb)

    step = _subsample_step(H, W)
    sub8 = img[::step, ::step]
    found = _glass_colour(sub8)
    if found is None:
        return flat(np.log10(_DEFAULT_BACKGROUND))
    log_global, logs, near = found
    band = np.float32(_GLASS_BAND)

    sy = yn_all[np.minimum(np.arange(sub8.shape[0]) * step, H - 1)]
    sx = xn_all[np.minimum(np.arange(sub8.shape[1]) * step, W - 1)]
    rng = np.random.default_rng(0)
    coef = None
    for _ in range(4):
        ys, xs = np.nonzero(near)
        if len(ys) < 50:
            break
        if len(ys) > 4000:
            pick = rng.choice(len(ys), 4000, replace=False)
            ys, xs = ys[pick], xs[pick]
        yn, xn = sy[ys], sx[xs]
        A = np.stack([np.ones_like(xn), xn, xn * xn, yn, yn * yn], axis=1)
        vals = np.stack([lc[ys, xs] for lc in logs], axis=1)
        ok = np.ones(len(ys), dtype=bool)
        for _ in range(2):  # refit without pixels well below the surface (pale cell interiors)
            Ak = A[ok]  # normal equations: a 5 x 5 solve
            coef = np.linalg.solve(Ak.T @ Ak + 1e-6 * np.eye(5, dtype=np.float32), Ak.T @ vals[ok])
            ok = (A @ coef - vals).max(axis=1) < 0.015
            if ok.sum() < 30:
                break
        # deviation of every subsampled pixel from the per-channel surfaces: grey and chroma
        c32 = coef.astype(np.float32)
        dev = [logs[c] - (c32[0, c] + sy * c32[3, c] + sy * sy * c32[4, c])[:, None]
               - (sx * c32[1, c] + sx * sx * c32[2, c])[None, :] for c in range(3)]
        dgrey = (dev[0] + dev[1] + dev[2]) / np.float32(3.0)
        near = np.abs(dgrey) < band
        for d in dev:
            d -= dgrey
            near &= np.abs(d) < np.float32(_GLASS_CHROMA)
    if coef is None:
        return flat(log_global)
    coef = coef.astype(np.float32)
    lx = xn_all[:, None] * coef[1] + (xn_all * xn_all)[:, None] * coef[2]
    ly = coef[0] + yn_all[:, None] * coef[3] + (yn_all * yn_all)[:, None] * coef[4]
    return _Background(ly.astype(np.float32), lx.astype(np.float32), log_global)
