"""The ``wsi-triage`` command line: thin click commands over library functions.

Every command turns a :class:`~wsi_pipeline.errors.WsiTriageError` into one line on stderr and
a non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .errors import WsiTriageError


def user_errors(func):
    """Turn user-caused errors into ``error: ...`` and an exit code instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except WsiTriageError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group()
@click.version_option(__version__, prog_name="wsi-triage")
def main() -> None:
    """Triage cytology whole-slide images: tile, score, rank, and export for QuPath."""


# Commands are defined below, one block per command, each calling a library function.
