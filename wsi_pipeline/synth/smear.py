"""Synthetic cytology smears with known answers: a test bed for slide-level behaviour.

No licensed thyroid slides exist for this project, so ``synthesize`` composes a whole-slide
image from real single-cell images (an ImageFolder such as the PBC set) and writes, beside it,
where every cell went. Each cell is cut from its own background (the stained object nearest the
image centre, split from touching red cells by a watershed on the distance transform), scaled
from the images' pixel size to the slide's, and laid on bright, near-neutral glass with uneven
illumination, empty areas, sparse fields, dense fields, clusters, debris, a pen mark and an
out-of-focus patch. The source images' own white balance (PBC: peach glass) is taken out of the
cells so that they keep their colours on neutral glass (see ``synth_sprites._neutralise``). Cells
of the suspicious classes are planted only inside a few known rectangles ("planted regions"), at
a chosen fraction of the nucleated cells there; with fraction 0 the same layout holds normal
cells only and the slide is negative.

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

This module is the entry point and re-exports the public names of its parts:

- ``synth_config``: ``SynthConfig``, its checks, the seed's random streams;
- ``synth_cells``: the cell image pool and cutting cells out of their images;
- ``synth_sprites``: the slide-scale sprite bank (cells, red cells, debris, blurred copies);
- ``synth_layout``: where everything goes, block by block;
- ``synth_render``: the pixels of any window of level 0;
- ``synth_tiff``: the pyramidal JPEG TIFF writer;
- ``synth_pap``: the Pap stain (the cells recoloured with the Pap dyes' absorbance spectra);
- ``synth_truth``: the ground truth JSON and GeoJSON.

``pap_field`` renders a small Pap-stained field in memory (no TIFF) with its nucleus centres,
cell groups and pen stroke mask, for fast tests of foreground and pen detection on every machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import OutputError, WsiTriageError
from ..progress import Progress
from .cells import (IMAGE_SUFFIXES, PBC_MPP, SHIPPED_CELLS, CellPool, cut_out_cell, cut_out_red_cells,
    list_cells, read_cell_list, segment_cells, transmittance)
from .config import DEFAULT_SUSPICIOUS, PEN_INKS, STAINS, SynthConfig, parse_size, validate
from .layout import BLOCK, NOISE_SIZE, Layout, glass_colour, pen_stroke_mask
from .render import CHUNK, Renderer
from .sprites import SpriteBank
from .tiff import pyramid_sizes, write_slide
from .truth import TRUTH_FORMAT, truth_document, truth_paths, write_truth

__all__ = [
    "BLOCK", "CHUNK", "DEFAULT_SUSPICIOUS", "IMAGE_SUFFIXES", "NOISE_SIZE", "PBC_MPP", "SHIPPED_CELLS",
    "TRUTH_FORMAT", "CellPool", "SynthConfig", "SynthResult", "cut_out_cell", "cut_out_red_cells",
    "PEN_INKS", "STAINS", "glass_colour", "list_cells", "pap_field", "parse_size", "pen_stroke_mask",
    "pyramid_sizes", "read_cell_list", "segment_cells", "synthesize", "transmittance", "truth_paths",
]

_transmittance = transmittance  # its name before the split into synth_* modules (tests use it)


@dataclass
class SynthResult:
    """What ``synthesize`` wrote: the files, the slide's size and levels, counts and timing."""

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
    stain: str = "romanowsky"
    pen_ink: str = "blue"  # the ink drawn (``--pen-ink random`` resolved)

    @property
    def mpx_per_second(self) -> float:
        return self.width * self.height / 1e6 / max(self.seconds, 1e-9)

    def as_dict(self) -> dict:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        d["levels"] = [list(s) for s in self.levels]
        d["seconds"] = round(self.seconds, 3)
        d["mpx_per_second"] = round(self.mpx_per_second, 2)
        return d


def synthesize(out: str | Path, config: SynthConfig = SynthConfig(),
               progress: Progress | None = None) -> SynthResult:
    """Write a synthetic smear to ``out`` (pyramidal JPEG TIFF) and its ground truth beside it.

    ``progress("synth", rows_done, rows_total)`` (:mod:`wsi_pipeline.progress`) reports the level-0
    rows written.
    """
    t_start = time.perf_counter()
    cfg = config
    validate(cfg)
    out = Path(out)
    pool = list_cells(cfg.cells, cfg.cell_list)
    if cfg.fraction > 0:
        absent = [c for c in cfg.suspicious if c not in pool.classes]
        if absent or not cfg.suspicious:
            raise WsiTriageError(f"{pool.root}: suspicious class {absent[0] if absent else '(none)'!r} has no cell "
                                 f"images (classes: {', '.join(pool.classes)})")
    bank = SpriteBank(pool, cfg.cells_mpp / cfg.mpp, cfg.cells_mpp, cfg.mpp, cfg.seed, stain=cfg.stain)
    layout = Layout(cfg, pool, bank)
    renderer = Renderer(layout)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out.parent}: cannot create the output folder ({exc.strerror or exc})") from None
    truth_json, truth_geojson = truth_paths(out)
    W, H = cfg.width, cfg.height
    sizes = pyramid_sizes(W, H)
    write_slide(out, cfg, renderer.band, sizes, truth_json.name, progress)

    # Rendering laid out every block, so the layout now holds the whole slide's ground truth.
    truth = truth_document(out, cfg, pool, layout, sizes)
    write_truth(truth, truth_json, truth_geojson)
    seconds = time.perf_counter() - t_start
    return SynthResult(out, truth_json, truth_geojson, truth["label"], W, H, cfg.mpp, sizes,
                       truth["counts"]["cells"], truth["counts"]["suspicious"], layout.n_red, layout.n_debris,
                       len(layout.regions), out.stat().st_size, seconds, cfg.stain, layout.pen_ink_name)


# A fine permanent marker's line is a few hundred um wide; on a half-millimetre field a 100 um
# stroke still leaves most of the cells clear of it.
_FIELD_PEN_UM = 100.0


def pap_field(seed: int, size: tuple[int, int] = (1024, 1024), mpp: float = 0.5,
              pen_ink: str | None = None, cells: str | Path | None = None) -> tuple["np.ndarray", dict]:
    """A small Pap-stained field rendered in memory: (uint8 RGB (h, w, 3), truth).

    Made like ``synthesize(..., SynthConfig(stain="pap"))`` (real shipped cells, Pap dyes,
    cohesive groups, red cells, debris, an out-of-focus patch), without planted regions and
    without a pen mark unless ``pen_ink`` names one (blue, green, black, red, random; a stroke
    100 um wide along one side, crossing cells and glass). ``truth``:
    ``nuclei`` (level-0 [x, y] of every nucleus centre, blurred ones included), ``cells`` (as in
    the truth JSON), ``groups``, ``blur`` (bbox), ``cell_mask`` and ``group_mask`` (bool (h, w):
    the nucleated cells, and those in cohesive groups) and ``pen``: ``ink``, ``mask`` (bool
    (h, w), the stroke where its ink cover reaches 0.5), ``area_px`` and ``bbox`` (None without a pen).
    """
    import numpy as np

    width, height = size
    cfg = SynthConfig(width=width, height=height, mpp=mpp, seed=seed, cells=Path(cells) if cells else None,
                      fraction=0.0, regions=0, stain="pap", pen_ink=pen_ink or "none")
    validate(cfg)
    pool = list_cells(cfg.cells)
    bank = SpriteBank(pool, cfg.cells_mpp / cfg.mpp, cfg.cells_mpp, cfg.mpp, cfg.seed, stain="pap")
    layout = Layout(cfg, pool, bank, pen_width_um=_FIELD_PEN_UM)
    rgb = Renderer(layout).render(0, height, 0, width)
    doc = truth_document(Path("field"), cfg, pool, layout, [(width, height)])
    pen = doc["artifacts"]["pen"]
    mask = pen_stroke_mask(pen["mask"], width, height)
    cell_mask, group_mask = layout.cell_masks(width, height)
    truth = {
        "stain": "pap", "mpp": mpp, "seed": seed, "width": width, "height": height,
        "glass_rgb": doc["glass_rgb"],
        "nuclei": [c["nucleus"] for c in doc["cells"] if c["nucleus"] is not None],
        "cells": doc["cells"], "groups": doc["groups"], "blur": doc["artifacts"]["blur"],
        "cell_mask": cell_mask, "group_mask": group_mask,
        "pen": {"ink": pen["ink"], "ink_transmittance": pen["ink_transmittance"], "mask": mask,
                "area_px": int(mask.sum()), "bbox": pen["mask"]["bbox"]},
    }
    return np.ascontiguousarray(rgb), truth
