"""Benchmark and example scripts behave as a ``wsi-triage`` command does.

The scripts under ``benchmarks/``, ``examples/`` and ``docs/img/`` are plain argparse programs.
:func:`run_script` gives each the command line's conventions in one place: a user mistake
(:class:`~wsi_contracts.errors.UserError`) is one line ``error: <message>`` on stderr and exit code
2, never a traceback; ``--json FILE`` writes the figures atomically, its folder checked before the
work starts rather than after an hour of it; ``--json -`` prints the JSON alone on stdout and
sends what the work prints to stderr, so a pipe gets only JSON.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

from wsi_contracts.errors import UserError

from .errors import OptionError, OutputError
from .names import printable

__all__ = ["run_script", "at_least"]


def at_least(flag: str, value: int | float | None, minimum: int | float = 1) -> None:
    """Refuse ``value`` below ``minimum`` (``None``: not given, accepted) as an :class:`OptionError`."""
    if value is not None and value < minimum:
        raise OptionError(flag, f"must be >= {minimum}, got {value}")


def run_script(work: Callable[[], Any], json_out: str | None = None) -> int:
    """Run a script's ``work`` and return its exit code (0, or the :class:`UserError`'s code).

    With ``json_out`` the value ``work`` returns is written as JSON: ``"-"`` prints it on stdout
    (anything ``work`` prints goes to stderr meanwhile), a path writes the file atomically."""
    try:
        if json_out and json_out != "-" and not Path(json_out).absolute().parent.is_dir():
            raise OutputError(f"{json_out}: its folder does not exist (--json)")
        with contextlib.redirect_stdout(sys.stderr) if json_out == "-" else contextlib.nullcontext():
            result = work()
        if json_out:
            text = json.dumps(result, indent=2)
            if json_out == "-":
                print(text)
            else:
                from .aggregation import write_atomic  # zarr and friends: only when a file is written

                write_atomic(Path(json_out), (text + "\n").encode())
    except UserError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    return 0
