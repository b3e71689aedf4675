"""Tile a slide into its zarr tile store: plan from a low-resolution mask, then read only kept tiles.

The grid lives in physical units (target mpp, tile size, overlap). Foreground is decided on a
thumbnail at about :data:`~wsi_pipeline.foreground.WORKING_MPP`, so tiles the mask rules out are
never read or decoded at full resolution. Kept tiles are grouped in row-major shards; each
shard is read, QC'd and written whole by one worker thread, then flagged done, so memory is
bounded by ``workers`` shards and a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import objects as cell_objects
from wsi_contracts import tilestore as tile_store
from wsi_contracts.tilestore import StoreMeta
from ..errors import OptionError, OutputError, SlideError, StoreError
from ..progress import Counter, Progress
from ..foreground import (WORKING_MPP, ForegroundResult, blur_scores, decide_stain, detect_foreground,
    get_preset, tile_fractions)
from ..foreground import INK_TILE_SHARE, count_in_boxes, ink_tiles
from ..slides import Slide, fingerprint, open_slide

__all__ = ['log', 'MASK_PX_PER_TILE', 'MAX_MASK_SIDE', 'MPP_TOLERANCE', 'TILINGS', 'FOREGROUND_VERSION', 'INK_WARN_SHARE',
           'INK_TILE_SHARE', 'TilerConfig', 'TilePlan', 'TileResult', 'mask_mpp_for', 'plan_tiles', 'shard_size_for', 'read_tile', 'tile_slide']

log = logging.getLogger(__name__)

#: at least this many mask pixels across one tile, so small fields still get a usable mask
MASK_PX_PER_TILE = 8
#: the mask thumbnail's long side never exceeds this (bounds memory on huge slides)
MAX_MASK_SIDE = 8192
#: resample only when the read level's mpp differs from the target by more than this
MPP_TOLERANCE = 0.02
#: tile placements: a fixed grid over the foreground, or one tile per nucleated object (objects.py)
TILINGS = ("grid", "cells")
#: bumped when the foreground stage decides differently for the same settings (stores made
#: before are rebuilt): 2 = ink judged by context, nuclei kept, stain auto; 3 = red cells seen
#: through a stroke are not nuclei, tiles mostly on ink without a nucleus are dropped; 4 = opaque
#: (black) ink counts like any ink for that rule; 5 = --stain auto re-tuned (synthetic Romanowsky
#: smears were called Pap), "near a nucleus" is a disc, not a square, in the ink rules
FOREGROUND_VERSION = 5
#: warn when marker ink removes more than this share of the foreground
INK_WARN_SHARE = 0.03


@dataclass(frozen=True)
class TilerConfig:
    """How a slide is cut into tiles. Everything here shapes the store's content (and its hash)."""

    target_mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0
    min_foreground: float | None = None  # None: the stain preset's default
    stain: str = "auto"  # auto | pap | romanowsky | he (auto: decided from the overview, see stain.py)
    pen_filter: bool = True  # remove marker ink (decided by colour and context, see foreground.py)
    codec: str = "jpeg"
    jpeg_quality: int = 90
    max_tiles_per_shard: int = 128
    mask_mpp: float = WORKING_MPP
    tiling: str = "grid"  # grid | cells: where tiles go (see TILINGS)

    def resolved(self) -> "TilerConfig":
        """Validate, and fill the stain preset's default minimum foreground fraction.

        With ``stain="auto"`` the minimum foreground stays None until the stain is decided
        (:func:`plan_tiles`); every preset's default is then its own."""
        preset = None if self.stain == "auto" else get_preset(self.stain)
        if not (math.isfinite(self.target_mpp) and self.target_mpp > 0):
            raise OptionError("target_mpp", f"must be a positive pixel size in um/px, got {self.target_mpp}")
        if self.tile_size < 8:
            raise OptionError("tile_size", f"must be at least 8 px, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise OptionError("overlap", f"must be in [0, tile size), got {self.overlap}")
        if self.codec not in tile_store.CODECS:
            raise OptionError("codec", f"must be one of {', '.join(tile_store.CODECS)}, got {self.codec!r}")
        if self.tiling not in TILINGS:
            raise OptionError("tiling", f"must be one of {', '.join(TILINGS)}, got {self.tiling!r}")
        if self.min_foreground is None:
            return dataclasses.replace(self, min_foreground=preset.min_foreground if preset else None)
        min_fg = float(self.min_foreground)
        if not 0 <= min_fg <= 1:
            raise OptionError("min_foreground", f"must be in [0, 1], got {min_fg}")
        return dataclasses.replace(self, min_foreground=min_fg)

    def hash(self, slide_mpp: float) -> str:
        """Hash of the resolved configuration plus the slide mpp it was applied with."""
        payload = json.dumps({**dataclasses.asdict(self.resolved()), "slide_mpp": round(slide_mpp, 6),
                              "foreground_version": FOREGROUND_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class TilePlan:
    """The tile grid and which cells of it are kept."""

    coords: np.ndarray  # (N, 4) level-0 x, y, w, h of kept tiles
    grid: np.ndarray  # (N, 2) row, col
    foreground: np.ndarray  # (N,)
    grid_meta: dict
    thumbnail: np.ndarray
    mask: np.ndarray
    thumbnail_downsample: float
    thumbnail_mpp: float
    n_grid: int
    placement: cell_objects.Placement | None = None  # tiling "cells": the objects and each tile's object
    nuclei: np.ndarray | None = None  # (N,) nuclei found in each kept tile
    foreground_info: dict = field(default_factory=dict)  # stain decision, preset, ink, warnings


@dataclass
class TileResult:
    path: Path
    n_tiles: int
    n_grid: int
    reused: bool
    shards_written: int
    seconds: float
    empty_reason: str | None = None
    meta: StoreMeta | None = None  # the store's attributes

    @property
    def tiles_per_second(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else float("inf")


def mask_mpp_for(slide: Slide, config: TilerConfig, slide_mpp: float) -> float:
    """Working mpp of the foreground mask: ~WORKING_MPP, finer for tiny tiles, coarser for huge slides."""
    tile_um = config.tile_size * config.target_mpp
    mpp = min(config.mask_mpp, tile_um / MASK_PX_PER_TILE)
    long_side_um = max(slide.dimensions) * slide_mpp
    return max(mpp, long_side_um / MAX_MASK_SIDE, slide_mpp)


def plan_tiles(slide: Slide, config: TilerConfig, slide_mpp: float, workers: int | None = None) -> TilePlan:
    """Compute the grid, the foreground mask and the kept tiles, reading only a thumbnail."""
    config = config.resolved()
    workers = workers or os.cpu_count() or 1
    thumb_mpp = mask_mpp_for(slide, config, slide_mpp)
    thumbnail, downsample = slide.thumbnail(thumb_mpp, workers=workers)
    actual_mpp = slide_mpp * downsample
    fg, stain_info = _foreground(thumbnail, actual_mpp, config, workers)
    mask = fg.mask
    preset = get_preset(fg.stain)
    min_fg = preset.min_foreground if config.min_foreground is None else config.min_foreground

    width0, height0 = slide.dimensions
    tile0 = config.tile_size * config.target_mpp / slide_mpp
    stride0 = (config.tile_size - config.overlap) * config.target_mpp / slide_mpp
    cols = max(1, math.ceil((width0 - tile0) / stride0) + 1) if width0 > tile0 else 1
    rows = max(1, math.ceil((height0 - tile0) / stride0) + 1) if height0 > tile0 else 1
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    size0 = int(round(tile0))
    boxes = np.stack(
        [np.round(cc * stride0), np.round(rr * stride0), np.full(cc.shape, size0), np.full(cc.shape, size0)], axis=1
    ).astype(np.int64)
    grid_meta = {
        "origin": [0, 0],
        "stride": [float(stride0), float(stride0)],
        "shape": [int(rows), int(cols)],
        "tile_level0": [size0, size0],
    }
    info = _foreground_info(fg, stain_info, config, min_fg)
    # the cells placement is for smears of separate cells; tissue sheets (H&E) have no isolated
    # objects to centre on (the nuclei are packed), so such a slide is tiled on the grid
    cells = config.tiling == "cells" and fg.stain != "he"
    if config.tiling == "cells" and not cells:
        info["warnings"].append("the slide is tissue (stain 'he'), not a smear of separate cells: tiled on the "
                                "grid instead of the cells placement")
    info["placement"] = "cells" if cells else "grid"
    if cells:
        centres = fg.nuclei
        del fg  # its ink planes are not needed by the objects stage: freed before it
        plan = _cells_plan(thumbnail, mask, float(downsample), float(actual_mpp), slide.dimensions, config,
                           tile0, stride0, grid_meta, int(rows * cols))
        return dataclasses.replace(plan, nuclei=count_in_boxes(centres, downsample, plan.coords),
                                   foreground_info=info)
    fractions = tile_fractions(mask, downsample, boxes)
    nuclei = count_in_boxes(fg.nuclei, downsample, boxes)
    keep = fractions >= min_fg
    if min_fg == 0:
        keep = fractions > 0
    if fg.ink.any():  # a tile mostly on ink, without a nucleus, is dropped (foreground.ink_tiles)
        on_ink = ink_tiles(fg.ink, downsample, boxes, nuclei)
        info["ink_tiles_dropped"] = int(np.count_nonzero(keep & on_ink))
        keep &= ~on_ink
    keep |= nuclei > 0  # a tile holding a nucleus is kept whatever its foreground fraction
    return TilePlan(
        coords=boxes[keep],
        grid=np.stack([rr[keep], cc[keep]], axis=1).astype(np.int32),
        foreground=fractions[keep].astype(np.float32),
        grid_meta=grid_meta,
        thumbnail=thumbnail,
        mask=mask,
        thumbnail_downsample=float(downsample),
        thumbnail_mpp=float(actual_mpp),
        n_grid=int(rows * cols),
        nuclei=nuclei[keep],
        foreground_info=info,
    )


def _foreground(thumbnail: np.ndarray, mpp: float, config: TilerConfig, workers: int):
    """The overview's foreground with the configured (or, for ``auto``, the decided) stain."""
    if config.stain == "auto":
        decision, fg = decide_stain(thumbnail, mpp, workers, pen_filter=config.pen_filter)
        return fg, {"requested": "auto", **decision.as_dict()}
    fg = detect_foreground(thumbnail, mpp, config.stain, workers, pen_filter=config.pen_filter)
    return fg, {"requested": config.stain, "stain": config.stain, "reason": "given", "evidence": {}}


def _foreground_info(fg: ForegroundResult, stain_info: dict, config: TilerConfig, min_fg: float) -> dict:
    """What the store records about the foreground decision, with warnings for the user."""
    preset = get_preset(fg.stain)
    warnings = []
    if fg.ink_share > INK_WARN_SHARE:
        warnings.append(f"the pen-ink rule removed {100 * fg.ink_share:.1f} % of the foreground; if the slide "
                        "has no marker ink, rerun with pen_filter off (--no-pen-filter)")
    if fg.nuclei_in_ink:
        warnings.append(f"{fg.nuclei_in_ink} nuclei lie in regions removed as ink (the cells around them are "
                        "kept); check the slide for ink over cells")
    return {
        "stain": stain_info,
        "preset": {**dataclasses.asdict(preset), "min_foreground": min_fg},
        "pen_filter": config.pen_filter,
        "ink_share": round(fg.ink_share, 5),
        "ink_spared_px": int(np.count_nonzero(fg.ink_spared)),
        "nuclei_in_ink": int(fg.nuclei_in_ink),
        "n_nuclei": int(len(fg.nuclei)),
        "ink_tiles_dropped": 0,  # grid tiles that passed the foreground fraction but lie on ink (plan_tiles)
        "warnings": warnings,
    }


# --------------------------------------------------------------------------- placement "cells"


def _cells_plan(thumbnail, mask, downsample, thumb_mpp, dimensions, config, tile0, stride0, grid_meta,
                n_grid) -> TilePlan:
    """Tiles on the nucleated objects (wsi_pipeline.tiling.objects); ``grid`` holds each tile's grid cell (by its centre)."""
    placement = cell_objects.plan_cells(thumbnail, mask, thumb_mpp, downsample, dimensions, tile0,
                                        config.tile_size * config.target_mpp)
    coords = placement.coords
    rows, cols = grid_meta["shape"]
    centre = coords[:, :2] + coords[:, 2:] / 2.0
    grid = np.stack([np.clip(centre[:, 1] // stride0, 0, rows - 1), np.clip(centre[:, 0] // stride0, 0, cols - 1)],
                    axis=1).astype(np.int32)
    return TilePlan(coords=coords, grid=grid.reshape(-1, 2),
                    foreground=tile_fractions(mask, downsample, coords).astype(np.float32),
                    grid_meta=grid_meta, thumbnail=thumbnail, mask=mask, thumbnail_downsample=float(downsample),
                    thumbnail_mpp=float(thumb_mpp), n_grid=n_grid, placement=placement)


def shard_size_for(n_tiles: int, max_tiles_per_shard: int) -> int:
    """Shards of up to ``max_tiles_per_shard`` tiles, but at least ~8 shards so workers share the work."""
    return int(np.clip(math.ceil(n_tiles / 8), 1, max_tiles_per_shard))


def read_tile(slide: Slide, box: np.ndarray, config: TilerConfig, level: int, level_scale: float) -> np.ndarray:
    """One tile at the target mpp; direct level read when the level is already at that mpp."""
    x, y, w0, h0 = (int(v) for v in box)
    size = config.tile_size
    if abs(level_scale - 1.0) <= MPP_TOLERANCE:
        return slide.read_region(level, x, y, size, size)
    return slide.read_region_mpp(x, y, w0, h0, config.target_mpp, out_size=(size, size))


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".wsi-triage-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot write output ({exc.strerror or exc})") from None


def _existing_store_state(path: Path, slide_fp: str, config_hash: str) -> str:
    """'complete', 'resumable', or 'stale' (absent, foreign, or for another slide/configuration)."""
    if not path.exists():
        return "stale"
    try:
        group = tile_store.open_store(path)
    except StoreError:
        return "stale"
    meta = tile_store.read_store_meta(group)
    if meta.slide_fingerprint != slide_fp or meta.tiler_config_hash != config_hash:
        return "stale"
    try:
        tile_store.check_layout(group)
    except StoreError:
        return "stale"  # a node is missing: tile afresh
    if tile_store.unflag_damaged_shards(path):
        return "resumable"  # repair: re-tile only the damaged shards from the (same) slide
    return "complete" if meta.complete else "resumable"


def tile_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    config: TilerConfig = TilerConfig(),
    *,
    mpp: float | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> TileResult:
    """Tile ``slide_path`` into ``<out_dir>/<stem>.zarr``, reusing or resuming an existing store.

    ``progress("tiling", tiles_done, n_tiles)`` (:mod:`wsi_pipeline.progress`) reports the plan once
    it is known, then each finished shard. Raises one-line :class:`WsiTriageError` subclasses.
    """
    counter = Counter(progress, "tiling")
    start = time.perf_counter()
    config = config.resolved()
    slide_path = Path(slide_path)
    out_dir = Path(out_dir)
    with open_slide(slide_path, mpp=mpp) as slide:
        pixel = slide.require_mpp()
        slide_mpp = float(pixel.mean)
        _check_writable(out_dir)
        path = tile_store.store_path(out_dir, slide_path)
        slide_fp = fingerprint(slide_path)
        config_hash = config.hash(slide_mpp)
        state = _existing_store_state(path, slide_fp, config_hash)
        if state == "complete":
            group = tile_store.open_store(path)
            meta = tile_store.read_store_meta(group)
            counter.plan(meta.n_tiles, meta.n_tiles)
            return TileResult(path, meta.n_tiles, meta.n_grid, True, 0,
                              time.perf_counter() - start, meta.empty_reason, meta)
        if state == "resumable" and config.tiling == "cells":
            group = tile_store.open_store(path)
            used = (tile_store.read_store_meta(group).foreground or {}).get("placement", "cells")
            if used == "cells" and not cell_objects.has_objects(group):
                state = "stale"  # killed before its object table was written: plan again
        if state == "resumable":
            group = tile_store.open_store(path, mode="r+")
        else:
            plan = plan_tiles(slide, config, slide_mpp, workers)
            n = len(plan.coords)
            empty_reason = None
            stain, min_fg = plan.foreground_info["stain"]["stain"], plan.foreground_info["preset"]["min_foreground"]
            if n == 0 and plan.foreground_info["placement"] == "cells":
                empty_reason = (f"no nucleated object found (stain preset '{stain}'; "
                                f"{plan.n_grid} grid tiles' area examined)")
            elif n == 0:
                empty_reason = (f"no tile reached the minimum foreground fraction {min_fg:g} "
                                f"(stain preset '{stain}'; {plan.n_grid} grid tiles examined)")
            meta = {
                "slide_path": str(slide_path.resolve()),
                "slide_fingerprint": slide_fp,
                "slide_mpp": {"x": pixel.x, "y": pixel.y, "source": pixel.source},
                "slide_dimensions": list(slide.dimensions),
                "tiler_config": dataclasses.asdict(config),
                "tiler_config_hash": config_hash,
                "grid": plan.grid_meta,
                "n_grid": plan.n_grid,
                "foreground": plan.foreground_info,
            }
            group = tile_store.create_store(
                path,
                coords=plan.coords,
                grid=plan.grid,
                foreground=plan.foreground,
                thumbnail=plan.thumbnail,
                mask=plan.mask,
                nuclei=plan.nuclei,
                thumbnail_downsample=plan.thumbnail_downsample,
                thumbnail_mpp=plan.thumbnail_mpp,
                tile_size=config.tile_size,
                tiles_per_shard=shard_size_for(n, config.max_tiles_per_shard),
                codec=config.codec,
                jpeg_quality=config.jpeg_quality,
                meta=meta,
            )
            if plan.placement is not None:
                cell_objects.write_objects(group, plan.placement, tile_store.read_store_meta(group).tiles_per_shard)
            if empty_reason:
                tile_store.update_meta(group, empty_reason=empty_reason)
        meta = tile_store.read_store_meta(group)
        n_tiles = meta.n_tiles
        per_shard = meta.tiles_per_shard
        pending = tile_store.pending_shards(group)
        done_tiles = n_tiles - sum(_shard_len(i, n_tiles, per_shard) for i in pending)
        counter.plan(n_tiles, done_tiles)
        _write_shards(slide, group, config, slide_mpp, pending, workers, counter)
        tile_store.update_meta(group, complete=True)
        meta = tile_store.read_store_meta(group)
    return TileResult(path, n_tiles, meta.n_grid, False, len(pending),
                      time.perf_counter() - start, meta.empty_reason, meta)


def _shard_len(index: int, n_tiles: int, per_shard: int) -> int:
    sl = tile_store.shard_slice(index, n_tiles, per_shard)
    return sl.stop - sl.start


def _write_shards(slide, group, config, slide_mpp, pending, workers, counter: Counter) -> None:
    if not pending:
        return
    meta = tile_store.read_store_meta(group)
    n_tiles, per_shard = meta.n_tiles, meta.tiles_per_shard
    coords = np.asarray(group["coords"][:])
    level = slide.best_level_for_mpp(config.target_mpp)
    level_scale = slide.level_mpp(level) / config.target_mpp
    workers = workers or min(len(pending), os.cpu_count() or 1)

    def work(index: int) -> int:
        sl = tile_store.shard_slice(index, n_tiles, per_shard)
        tiles = np.empty((sl.stop - sl.start, config.tile_size, config.tile_size, 3), dtype=np.uint8)
        for j, box in enumerate(coords[sl]):
            try:
                tiles[j] = read_tile(slide, box, config, level, level_scale)
            except SlideError:
                raise
            except Exception as exc:  # a decoder error in the middle of a slide is a slide problem
                raise SlideError(f"{slide.path}: cannot read the region at level-0 ({box[0]}, {box[1]}): {exc}") from None
        tile_store.write_shard(group, index, tiles, blur_scores(tiles))
        counter.add(len(tiles))
        return len(tiles)

    if workers <= 1:
        for index in pending:
            work(index)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tiler") as pool:
        for _ in pool.map(work, pending):
            pass
