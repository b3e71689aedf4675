"""User-facing errors of ``distill`` (kept separate from wsi_pipeline on purpose: the two
packages share only file formats)."""

from __future__ import annotations


class DistillError(Exception):
    """An error caused by the user's input (bad config, missing file, bad checkpoint).

    The CLI prints ``error: <message>`` on one line and exits with ``exit_code``.
    """

    exit_code = 2
