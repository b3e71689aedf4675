"""Synthetic smears and Pap fields with their ground truth: the project's test bed (not a stage)."""

from __future__ import annotations

from .fields import blob_field
from .truth import RENDERER_VERSION, cell_box_mask, made_with
from .smear import (BLOCK, CHUNK, DEFAULT_SUSPICIOUS, IMAGE_SUFFIXES, NOISE_SIZE, PBC_MPP, SHIPPED_CELLS,
    TRUTH_FORMAT, CellPool, SynthConfig, SynthResult, cut_out_cell, cut_out_red_cells, PEN_INKS, STAINS,
    glass_colour, list_cells, pap_field, parse_size, pen_stroke_mask, pyramid_sizes, read_cell_list,
    segment_cells, synthesize, transmittance, truth_paths)

__all__ = ['blob_field', 'cell_box_mask', 'made_with', 'RENDERER_VERSION', 'BLOCK', 'CHUNK', 'DEFAULT_SUSPICIOUS', 'IMAGE_SUFFIXES', 'NOISE_SIZE', 'PBC_MPP',
    'SHIPPED_CELLS', 'TRUTH_FORMAT', 'CellPool', 'SynthConfig', 'SynthResult', 'cut_out_cell',
    'cut_out_red_cells', 'PEN_INKS', 'STAINS', 'glass_colour', 'list_cells', 'pap_field', 'parse_size',
    'pen_stroke_mask', 'pyramid_sizes', 'read_cell_list', 'segment_cells', 'synthesize', 'transmittance',
    'truth_paths']
