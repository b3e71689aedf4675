"""Tile placement (grid or object-centred) and the tiler that writes the per-slide tile store."""

from __future__ import annotations

from .tiler import (log, MASK_PX_PER_TILE, MAX_MASK_SIDE, MPP_TOLERANCE, TILINGS, FOREGROUND_VERSION,
    INK_WARN_SHARE, INK_TILE_SHARE, TilerConfig, TilePlan, TileResult, mask_mpp_for, plan_tiles, shard_size_for, read_tile,
    tile_slide)
from .objects import (ObjectConfig, ObjectTable, nuclear_mask, ink_mask, detect_objects, Placement,
    place_tiles, merge_near_duplicates, plan_cells, write_objects, has_objects, read_objects)

__all__ = ['log', 'MASK_PX_PER_TILE', 'MAX_MASK_SIDE', 'MPP_TOLERANCE', 'TILINGS', 'FOREGROUND_VERSION',
    'INK_WARN_SHARE', 'INK_TILE_SHARE', 'TilerConfig', 'TilePlan', 'TileResult', 'mask_mpp_for', 'plan_tiles',
    'shard_size_for', 'read_tile', 'tile_slide', 'ObjectConfig', 'ObjectTable', 'nuclear_mask', 'ink_mask',
    'detect_objects', 'Placement', 'place_tiles', 'merge_near_duplicates', 'plan_cells', 'write_objects',
    'has_objects', 'read_objects']
