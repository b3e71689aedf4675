"""From tile scores to a slide: scores, heatmaps, overlays, QuPath GeoJSON, per-object results."""

from __future__ import annotations

from .outputs import (COLORMAP, OVERLAY_FLOOR, heatmap_rgba, heatmap_picture, tile_values, mask_outline,
    overlay_image, overlay_scale, overlay_picture, overlay_png, gallery_png, png_bytes, CLASS_COLOURS,
    class_colour, geojson_collection)
from .objects import (object_suspicion, object_best_tile, object_counts, object_heatmap, object_geojson,
    calibrated, calibration_for, aggregate_objects)
from .aggregate import (METHODS, SUMMARY_NAME, VERSION_PACKAGES, AggregateConfig, AggregateResult,
    tile_suspicion, slide_score, heatmap_grid, package_versions, write_atomic, output_names, read_summary,
    aggregate_store)

__all__ = ['COLORMAP', 'OVERLAY_FLOOR', 'heatmap_rgba', 'heatmap_picture', 'tile_values', 'mask_outline',
    'overlay_image', 'overlay_scale', 'overlay_picture', 'overlay_png', 'gallery_png', 'png_bytes',
    'CLASS_COLOURS', 'class_colour', 'geojson_collection', 'object_suspicion', 'object_best_tile',
    'object_counts', 'object_heatmap', 'object_geojson', 'calibrated', 'calibration_for',
    'aggregate_objects', 'METHODS', 'SUMMARY_NAME', 'VERSION_PACKAGES', 'AggregateConfig', 'AggregateResult',
    'tile_suspicion', 'slide_score', 'heatmap_grid', 'package_versions', 'write_atomic', 'output_names',
    'read_summary', 'aggregate_store']
