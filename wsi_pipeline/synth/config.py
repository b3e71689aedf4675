"""What a synthetic smear is made from: its settings, their checks and the seed's random streams.

Part of ``wsi_pipeline.synth`` (the public entry point, which re-exports these names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OptionError
from .cells import PBC_MPP

__all__ = ['DEFAULT_SUSPICIOUS', 'STAINS', 'PEN_INKS', 'SynthConfig', 'seeded_rng', 'parse_size', 'validate']

DEFAULT_SUSPICIOUS = ("erythroblast", "ig")
STAINS = ("romanowsky", "pap")  # romanowsky: the cells as imaged (MGG); pap: recoloured (synth_pap)
# Pen ink: "random" draws blue, green or black from the seed (as before red was added); "none": no mark.
PEN_INKS = ("random", "blue", "green", "black", "red", "none")

# Random streams: each independent part of the slide draws from its own generator, seeded by
# (seed, stream, *keys), so that any part can be made without drawing the others first.
S_GLOBAL, S_CANDIDATES, S_RBC, S_DEBRIS, S_REGIONS, S_PLANT, S_BANK, S_GLASS, S_PAP, S_PAP_RED = range(1, 11)


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
    stain: str = "romanowsky"  # one of STAINS
    pen_ink: str = "random"  # one of PEN_INKS


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """The generator of one random stream (``S_*``, then e.g. a block's row and column)."""
    return np.random.default_rng([seed, *keys])


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
        raise OptionError("size", f"{text!r}: expected WIDTHxHEIGHT in px, e.g. 8192x8192") from None
    return w, h


def validate(cfg: SynthConfig) -> None:
    """Raise :class:`OptionError` (naming the field) if ``cfg`` cannot be synthesised."""
    for name in ("width", "height"):
        if not 256 <= getattr(cfg, name) <= 2**31 - 1:
            raise OptionError(name, f"must be between 256 and {2**31 - 1} px, got {getattr(cfg, name)}")
    if not (0.05 <= cfg.mpp <= 10.0):
        raise OptionError("mpp", f"must be a pixel size between 0.05 and 10 um/px, got {cfg.mpp}")
    scale = cfg.cells_mpp / cfg.mpp
    if not (0.05 <= scale <= 8.0):
        raise OptionError("mpp", f"{cfg.mpp}: cells at {cfg.cells_mpp} um/px would be scaled by {scale:.3g} "
                                 "(0.05..8 allowed)")
    if not (0.0 <= cfg.fraction <= 1.0):
        raise OptionError("fraction", f"must be between 0 and 1, got {cfg.fraction}")
    if cfg.seed < 0:
        raise OptionError("seed", f"must be a non-negative integer, got {cfg.seed}")
    if cfg.tile % 16 or cfg.tile < 16:
        raise OptionError("tile", f"must be a positive multiple of 16, got {cfg.tile}")
    if not (1 <= cfg.quality <= 100):
        raise OptionError("quality", f"must be in 1..100, got {cfg.quality}")
    if cfg.stain not in STAINS:
        raise OptionError("stain", f"must be one of {', '.join(STAINS)}, got {cfg.stain!r}")
    if cfg.pen_ink not in PEN_INKS:
        raise OptionError("pen_ink", f"must be one of {', '.join(PEN_INKS)}, got {cfg.pen_ink!r}")
    if cfg.regions is not None and cfg.regions < 0:
        raise OptionError("regions", f"must be >= 0, got {cfg.regions}")
