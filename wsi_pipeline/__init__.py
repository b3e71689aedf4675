"""wsi-triage: cytology whole-slide triage pipeline."""

__version__ = "0.1.0"
