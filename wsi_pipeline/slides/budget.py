"""Per-slide read budget: a batch gives each slide a deadline, checked on every region read, so a
header that makes reading endless ends in a recorded error instead of a hung batch."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from ..errors import SlideError

__all__ = ["read_budget", "check_budget"]

_BUDGET: dict[str, float | None] = {"deadline": None, "seconds": None}


@contextlib.contextmanager
def read_budget(seconds: float | None):
    """Within the block, any slide read after ``seconds`` raises :class:`SlideError` (None: no limit)."""
    previous = dict(_BUDGET)
    _BUDGET.update(deadline=None if seconds is None else time.monotonic() + seconds, seconds=seconds)
    try:
        yield
    finally:
        _BUDGET.update(previous)


def check_budget(path: Path) -> None:
    deadline = _BUDGET["deadline"]
    if deadline is not None and time.monotonic() > deadline:
        raise SlideError(f"{path}: reading took longer than the per-slide budget of {_BUDGET['seconds']:g} s "
                         "(--slide-timeout); damaged or unusually large slide")
