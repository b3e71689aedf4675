"""What a pathologist looks at: the HTML triage report and the local slide viewer."""

from __future__ import annotations

from .report import (STATUS_COLOURS, score_meaning, render_report, write_report)
from .viewer import (ViewerSlide, SlideDeepZoom, ViewerApp, ViewerServer, find_view_slides, make_server,
    serve, ASSETS, DEFAULT_PORT, TILE_SIZE, TILE_OVERLAP)

__all__ = ['STATUS_COLOURS', 'score_meaning', 'render_report', 'write_report', 'ViewerSlide', 'SlideDeepZoom', 'ViewerApp',
    'ViewerServer', 'find_view_slides', 'make_server', 'serve', 'ASSETS', 'DEFAULT_PORT', 'TILE_SIZE',
    'TILE_OVERLAP']
