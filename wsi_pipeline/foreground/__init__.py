"""Cytology foreground at low resolution: glass versus cells, nuclei, stain decision, pen ink.

``mask`` runs the stage (:func:`detect_foreground`); the other modules hold one rule each (``glass``,
``nuclei``, ``stain``, ``ink``, ``colour_codes``, ``presets``) or shared tools (``morphology``,
``parallel``, ``pixels``, ``tile_measures``, ``baseline``). Underscore names are private to this
package: its modules share them, nothing outside imports them.
"""

from __future__ import annotations

from .baseline import otsu_baseline_mask
from .colour_codes import colour_table, write_colour_table
from .mask import WORKING_MPP, ForegroundResult, decide_stain, detect_foreground, foreground_mask, pen_mask
from .ink import INK_TILE_SHARE, ink_tiles
from .presets import PRESETS, StainPreset, get_preset
from .tile_measures import blur_score, blur_scores, tile_fractions
from .stain import (StainDecision, STAINS, SHEET_MIN_MM2, RED_SHARE_PAP, RED_MINUS_BLUE_PAP,
    CELL_GREEN_SHARE_PAP, classify_stain, sheet_share, stain_evidence)
from .nuclei import (NUCLEUS_MIN_UM, NUCLEUS_MAX_UM, TOPHAT_RADIUS_UM, MIN_CONTRAST, MIN_DENSITY,
    MIN_RELATIVE_CONTRAST, CELL_RADIUS_UM, Nuclei, nuclear_density, tophat_halo, nucleus_pixels,
    label_nuclei, centre_pixels, count_in_boxes)

__all__ = ['WORKING_MPP', 'StainPreset', 'PRESETS', 'get_preset', 'colour_table', 'write_colour_table',
    'pen_mask', 'ForegroundResult', 'detect_foreground', 'foreground_mask', 'decide_stain', 'tile_fractions',
    'blur_score', 'blur_scores', 'otsu_baseline_mask', 'StainDecision', 'STAINS', 'SHEET_MIN_MM2',
    'RED_SHARE_PAP', 'RED_MINUS_BLUE_PAP', 'CELL_GREEN_SHARE_PAP', 'classify_stain', 'sheet_share',
    'stain_evidence', 'NUCLEUS_MIN_UM', 'NUCLEUS_MAX_UM', 'TOPHAT_RADIUS_UM', 'MIN_CONTRAST', 'MIN_DENSITY',
    'MIN_RELATIVE_CONTRAST', 'CELL_RADIUS_UM', 'Nuclei', 'nuclear_density', 'tophat_halo', 'nucleus_pixels',
    'label_nuclei', 'centre_pixels', 'count_in_boxes', 'INK_TILE_SHARE', 'ink_tiles']
