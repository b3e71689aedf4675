"""Per-colour codes (confident / loose ink of each colour, dark colourless) from a shipped lookup table.

The table (``data/colour_codes.zlib``) is :func:`_colour_rules` evaluated on every 7-bit RGB colour;
:func:`write_colour_table` regenerates it when the rules change (a test checks it matches)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from .pixels import _hsv

__all__ = ["colour_table", "write_colour_table"]


# --------------------------------------------------------------------------- colour rules

# Bits of the per-colour code (a pure function of RGB, so it is tabulated once, see _codes).
_SEED = (1, 2, 4)      # confident red / green-blue / black ink
_LOOSE = (8, 16, 32)   # the same inks, fringe and overdrawn parts
_DARK = 64             # dark and colourless: glass edges, scanner borders, black debris
_LUT_BITS = 7          # per channel; 2 MB table, thresholds blur by < 1 grey level
_LUT: np.ndarray | None = None
_UNKNOWN = 255         # a table entry not computed yet (real codes use bits 1..64 only)


def _colour_rules(rgb: np.ndarray) -> np.ndarray:
    """Code (uint8 bit set) of each uint8 RGB colour. See :func:`pen_mask` for the reasoning."""
    h, s, v = _hsv(rgb)
    scarlet = (h >= 348.0) | (h <= 12.0)
    # where red is overdrawn: dark, greyer purple; hematoxylin this dark is far more saturated
    dark_ink = (v < 0.55) & (s >= 0.12) & ((h >= 315.0) | (h <= 12.0) | ((h >= 280.0) & (s < 0.3) & (v < 0.5)))
    cyan_blue = (h >= 90.0) & (h <= 250.0) & (rgb[..., 1] >= rgb[..., 0])  # green to blue
    rules = (
        (_SEED[0], scarlet & (s >= 0.45) & (v >= 0.3)),
        (_SEED[1], cyan_blue & (s >= 0.4)),
        (_SEED[2], (v < 0.3) & (s < 0.25)),
        (_LOOSE[0], (scarlet & (s >= 0.12)) | dark_ink),
        (_LOOSE[1], cyan_blue & (s >= 0.12)),
        (_LOOSE[2], (v < 0.35) & (s < 0.25)),
        (_DARK, (v < 0.25) & (s < 0.35)),
    )
    code = np.zeros(rgb.shape[:-1], dtype=np.uint8)
    for bit, rule in rules:
        code |= np.where(rule, np.uint8(bit), np.uint8(0))
    return code


#: the whole table, precomputed (20 KB zlib); tests check it against _colour_rules
_TABLE_FILE = Path(__file__).parents[1] / "data" / "colour_codes.zlib"


def colour_table() -> np.ndarray:
    """Codes of all 2^21 quantised colours, computed from the colour rules (about 0.3 s)."""
    return _colour_rules(_index_colours(np.arange(1 << (3 * _LUT_BITS), dtype=np.int32)))


def write_colour_table(path: Path = _TABLE_FILE) -> None:
    """Regenerate the shipped table after a change to the colour rules."""
    path.write_bytes(zlib.compress(colour_table().tobytes(), 9))


def _load_table() -> np.ndarray:
    """The shipped table when present and whole, else an empty one filled on use.

    Filling lazily costs 0.3-0.8 s in the first mask of a process (a thumbnail holds ~100k of
    the 2M colours); reading the file costs ~2 ms.
    """
    size = 1 << (3 * _LUT_BITS)
    try:
        table = np.frombuffer(zlib.decompress(_TABLE_FILE.read_bytes()), dtype=np.uint8)
        if table.size == size:
            return table.copy()
    except (OSError, zlib.error):
        pass
    return np.full(size, _UNKNOWN, dtype=np.uint8)


def _lookup(idx: np.ndarray) -> np.ndarray:
    """Codes of the quantised colours ``idx``; table entries missing from it are computed on use."""
    global _LUT
    if _LUT is None:
        _LUT = _load_table()
    codes = _LUT[idx]
    missing = codes == _UNKNOWN
    if missing.any():
        todo = idx[missing]
        seen = np.zeros(_LUT.size, dtype=bool)
        seen[todo] = True
        new = np.flatnonzero(seen)
        _LUT[new] = _colour_rules(_index_colours(new))
        codes[missing] = _LUT[todo]
    return codes


def _index_colours(idx: np.ndarray) -> np.ndarray:
    """The uint8 RGB colour each table index stands for, (n, 3)."""
    shift = 8 - _LUT_BITS
    q = np.arange(1 << _LUT_BITS, dtype=np.int32)
    level = ((q << shift) | (q >> (_LUT_BITS - shift))).astype(np.uint8)  # 0..255 spread
    m = (1 << _LUT_BITS) - 1
    return np.stack([level[(idx >> (2 * _LUT_BITS)) & m], level[(idx >> _LUT_BITS) & m], level[idx & m]], axis=-1)


def _code_index(log_glass: np.ndarray | None = None) -> list[np.ndarray]:
    """Per-channel tables from a uint8 level to its share of the colour-code LUT index.

    With ``log_glass`` (log10 glass RGB) each channel is first white-balanced to the glass,
    I_c * mean(glass) / glass_c, so the colour rules judge ink and dark edges relative to the
    glass: a yellow or blue cast of the light does not turn stain into ink or glass into stain.
    Neutral glass leaves the colours (nearly) as they are.
    """
    levels = np.arange(256, dtype=np.float32)
    gain = np.ones(3, np.float32)
    if log_glass is not None:
        glass = 10.0 ** np.asarray(log_glass, dtype=np.float32)
        gain = glass.mean() / glass
    shift = 8 - _LUT_BITS
    return [((np.clip(levels * gain[c] + 0.5, 0, 255).astype(np.int32) >> shift) << ((2 - c) * _LUT_BITS))
            for c in range(3)]


def _codes(rgb: np.ndarray, index: list[np.ndarray] | None = None) -> np.ndarray:
    """Colour codes of a uint8 (h, w, 3) band via a lazily built lookup table."""
    if index is None:
        index = _code_index()
    idx = index[0][rgb[..., 0]]
    idx |= index[1][rgb[..., 1]]
    idx |= index[2][rgb[..., 2]]
    return _lookup(idx)
