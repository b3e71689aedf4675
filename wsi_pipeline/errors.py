"""User-facing errors: one line, naming the file and the problem.

The CLI catches :class:`WsiTriageError`, prints ``error: <message>`` on one line and exits
with the error's ``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno

from wsi_contracts.errors import CheckpointError, ShardError, StoreError, UserError

__all__ = ["WsiTriageError", "UserError", "SlideError", "UnknownMppError", "StoreError", "ShardError",
           "StoreBusyError", "CheckpointError", "OutputError", "OptionError", "ENVIRONMENT_ERRNOS",
           "environment_error"]


class WsiTriageError(UserError):
    """An error of the pipeline caused by the user's input or environment (never a bug).

    The store and checkpoint errors come from :mod:`wsi_contracts.errors` (re-exported here); the
    CLI catches their common base :class:`~wsi_contracts.errors.UserError`.
    """


class SlideError(WsiTriageError, OSError):
    """A slide file is missing, unreadable, unsupported or lacks what the step needs."""


class UnknownMppError(SlideError):
    """The slide's pixel size is unknown and no ``mpp`` was given."""


class StoreBusyError(StoreError):
    """Another process is writing the same tile store (its lock is held)."""


class OutputError(WsiTriageError, OSError):
    """The output location cannot be written."""


class OptionError(WsiTriageError, ValueError):
    """A parameter or configuration value is invalid (found before any work starts).

    ``OptionError(param, problem)`` reads ``"<param> <problem>"`` (e.g. ``top_k must be >= 1, got 0``):
    the library names its own parameter, and a command-line tool that knows which flag set it
    shows the flag instead (``flag_message``). ``OptionError(message)`` is a message without a
    parameter.
    """

    def __init__(self, param: str, problem: str | None = None) -> None:
        if problem is None:
            self.param, self.problem = None, param
            super().__init__(param)
        else:
            self.param, self.problem = param, problem
            super().__init__(f"{param} {problem}")

    def __reduce__(self):  # raised in a dask worker process, it is pickled back to the caller
        return (type(self), (self.param, self.problem) if self.param else (self.problem,))

    def flag_message(self, flag: str) -> str:
        """The message with ``flag`` (e.g. ``--top-k``) in place of the parameter's name."""
        return f"{flag} {self.problem}" if self.param else str(self)


#: OS errors caused by the machine, not by a bug: a full disk, a quota, a read-only or failing device
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENAMETOOLONG)


def environment_error(exc: OSError) -> WsiTriageError | None:
    """The one-line error for an OS error the user's environment caused (full disk, ...), else None."""
    if exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    hint = "; free some space and rerun the same command (finished work is reused)" \
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return OutputError(f"{where}{exc.strerror or exc}{hint}")

