"""``python -m wsi_pipeline`` runs the ``wsi-triage`` command line."""

from .cli import main

main()
