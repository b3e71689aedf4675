"""User-facing errors of ``distill``.

``distill`` shares only the file formats with the pipeline (``wsi_contracts``); its errors derive from
the same :class:`~wsi_contracts.errors.UserError`, so every tool prints them the same way.
"""

from __future__ import annotations

from wsi_contracts.errors import UserError

__all__ = ["DistillError"]


class DistillError(UserError, ValueError):
    """An error caused by the user's input (bad config, missing file, bad checkpoint).

    The CLI prints ``error: <message>`` on one line and exits with ``exit_code`` (2).
    """
