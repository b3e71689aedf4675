"""The one progress protocol of every stage: ``progress(stage, done, total)``.

A stage (``"tiling"``, ``"scoring"``, ``"synth"``, ...) calls it once when its work is planned
(``done`` counts what an earlier, interrupted run already finished) and again each time a unit of
work is finished; ``done`` only grows and ends at ``total``. Units: tiles for tiling and scoring,
level-0 rows for synth. Library code reports through this and :mod:`logging` only; drawing a bar
is the caller's business (the CLI's bar is one implementation).
"""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = ["Progress", "no_progress", "Counter"]


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None: ...


def no_progress(stage: str, done: int, total: int) -> None:
    """A :class:`Progress` that ignores every report."""


class Counter:
    """Turns finished-unit counts into protocol calls for one stage: ``plan(total, done)``, then
    ``add(n)`` after each finished piece of work (from any thread: calls are serialised)."""

    def __init__(self, progress: Progress | None, stage: str) -> None:
        self.progress, self.stage = progress, stage
        self.done = self.total = 0
        self._lock = threading.Lock()

    def plan(self, total: int, done: int = 0) -> None:
        self.total, self.done = int(total), int(done)
        if self.progress is not None:
            self.progress(self.stage, self.done, self.total)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += int(n)
            if self.progress is not None:
                self.progress(self.stage, self.done, self.total)
