"""distill: MDKD teacher-to-student distillation for wsi-triage."""

__version__ = "0.1.0"
