"""One slide's tiling under a memory and a time budget, in a child process.

A damaged or hostile slide file can claim a huge image; a decoder may then allocate gigabytes, or
hang inside C code where no Python check runs. A batch therefore tiles each slide in a child
process forked from multiprocessing's fork server (which has the tiler imported once, so a child
starts in tens of milliseconds), with ``RLIMIT_DATA`` set to the budget and a wall-clock deadline
enforced by killing the child. ``RLIMIT_DATA`` bounds the private writable memory (heap and
anonymous mappings: what decoded pixels occupy); unlike ``RLIMIT_AS`` it does not count shared
libraries or address space merely reserved, so the limit means memory, not address-space layout.
A slide over either budget ends as a one-line :class:`~wsi_pipeline.errors.SlideError`; the
batch process (model, scores) never holds a slide's pixels. A killed child leaves a store that the
next run resumes, like any interrupted tiling. Messages travel back as JSON, never pickled.

A script that calls this (e.g. through ``run_batch``) must guard its top level with
``if __name__ == "__main__":``, as for any multiprocessing start method other than fork.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_contracts import tilestore as tile_store

from . import errors as _errors
from .errors import OptionError, SlideError, UnknownMppError, UserError, environment_error
from .progress import Progress
from .slides import open_slide, read_budget
from .tiling import TileResult, TilerConfig, tile_slide

__all__ = ["UnreadableSlideError", "SlideBudget", "parse_memory", "default_memory", "tile_checked",
           "tile_within_budget", "KILL_GRACE_SECONDS"]

#: the child is killed this long after its time budget (its own check stops it cleanly first)
KILL_GRACE_SECONDS = 10.0
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_OFF = ("0", "off", "none", "unlimited")
_DEFAULT_CAP = 8 * 2**30


class UnreadableSlideError(SlideError):
    """The file cannot even be opened as a slide (not a slide, empty, a directory, a broken link)."""


def default_memory() -> int:
    """8 GiB, or half the machine's physical memory when that is less."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return _DEFAULT_CAP
    return min(_DEFAULT_CAP, physical // 2)


def parse_memory(value: int | str | None) -> int | None:
    """Bytes from ``8G``, ``512M``, ``1.5g``, ``2GiB`` or an int; ``0``/``off``/``none``: None (no budget).

    ``None`` in, ``None`` out is left to the caller (a batch then uses :func:`default_memory`)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        text = str(value).strip().lower()
        if text in _OFF:
            return None
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text)
        if not match:
            raise OptionError("slide_memory", f"must be a size such as 8G or 512M (or 0 for none), got {value!r}")
        number = int(float(match.group(1)) * _UNITS[match.group(2)])
    if number == 0:
        return None
    if number < 0:
        raise OptionError("slide_memory", f"must be a size such as 8G or 512M (or 0 for none), got {value!r}")
    return number


def _size_text(n: int) -> str:
    for unit, factor in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= factor:
            return f"{n / factor:.3g}{unit}"
    return f"{n} B"


@dataclass(frozen=True)
class SlideBudget:
    """The limits of one slide's tiling: private memory in bytes, and seconds (None: no limit)."""

    memory: int
    seconds: float | None = None


def _opens(slide: Path, mpp: float | None) -> bool:
    try:
        with open_slide(slide, mpp=mpp):
            return True
    except SlideError:
        return False


def tile_checked(slide: Path, out: Path, config: TilerConfig, *, mpp: float | None, workers: int | None,
                 seconds: float | None, progress: Progress | None = None) -> TileResult:
    """:func:`tile_slide` within a reading-time budget; a file that cannot even be opened as a slide
    raises :class:`UnreadableSlideError` (told apart after the failure, so a good slide pays nothing)."""
    try:
        with read_budget(seconds):
            return tile_slide(slide, out, config, mpp=mpp, workers=workers, progress=progress)
    except SlideError as exc:
        if isinstance(exc, (UnknownMppError, UnreadableSlideError)) or _opens(slide, mpp):
            raise
        raise UnreadableSlideError(str(exc)) from None


# --------------------------------------------------------------------------- the child


def _child(conn, slide: str, out: str, config: TilerConfig, mpp: float | None, workers: int | None,
           memory: int, seconds: float | None) -> None:
    """Entry point of the child: set the limit, tile, send JSON messages, exit."""
    send_lock = threading.Lock()

    def send(kind: str, **payload: Any) -> None:
        with send_lock:
            conn.send_bytes(json.dumps({"kind": kind, **payload}).encode())

    def progress(stage: str, done: int, total: int) -> None:
        send("progress", stage=stage, done=done, total=total)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops this child
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = memory if hard == resource.RLIM_INFINITY else min(memory, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        r = tile_checked(Path(slide), Path(out), config, mpp=mpp, workers=workers, seconds=seconds,
                         progress=progress)
        send("result", path=str(r.path), n_tiles=r.n_tiles, n_grid=r.n_grid, reused=r.reused,
             shards_written=r.shards_written, seconds=r.seconds, empty_reason=r.empty_reason, peak=_peak_bytes())
    except MemoryError:
        send("memory")
    except UserError as exc:
        send("error", type=type(exc).__name__, message=str(exc))
    except OSError as exc:
        error = environment_error(exc)
        if error is None:
            send("unexpected", type=type(exc).__name__, message=_unexpected(slide, exc))
        else:
            send("error", type=type(error).__name__, message=str(error))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which records it as a bug
        send("unexpected", type=type(exc).__name__, message=_unexpected(slide, exc))
    finally:
        conn.close()


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _unexpected(slide: str, exc: BaseException) -> str:
    import traceback

    last = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{slide}: unexpected {type(exc).__name__}: {exc} (at {Path(last.filename).name}:{last.lineno})"


# --------------------------------------------------------------------------- the parent


class ChildCrash(RuntimeError):
    """The child hit a bug (an exception that is no user error); the message names it and where."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


#: imported once by the fork server, so that no child imports them again (the readers load lazily)
_PRELOAD = [__name__, "openslide", "tifffile", "PIL.Image", "PIL.PngImagePlugin", "PIL.JpegImagePlugin",
            "PIL.TiffImagePlugin"]


@functools.lru_cache(maxsize=None)
def _context():
    """The fork-server context, its server preloading the tiler (started once per process, on first use)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _error_class(name: str) -> type[UserError]:
    cls = UnreadableSlideError if name == "UnreadableSlideError" else getattr(_errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, UserError) else SlideError


def _raise_error(message: dict[str, Any], budget: SlideBudget) -> None:
    """The child's user error again, with its class; one that speaks of memory (a reader turns a
    MemoryError into its own message) also names the budget that caused it."""
    text = message["message"]
    if "memory" in text.lower():
        text += f" (per-slide memory budget {_size_text(budget.memory)}, --slide-memory)"
    raise _error_class(message["type"])(text) from None


def _signal_name(code: int | None) -> str:
    if code is None or code >= 0:
        return f"exit code {code}"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def tile_within_budget(slide: Path, out: Path, config: TilerConfig, budget: SlideBudget, *,
                       mpp: float | None = None, workers: int | None = None,
                       progress: Progress | None = None) -> tuple[TileResult, int]:
    """:func:`tile_checked` in a child process under ``budget``; (the result, the child's peak RSS in bytes).

    Over the memory budget, past the time budget (plus :data:`KILL_GRACE_SECONDS`, then killed),
    or a child that dies (a decoder's abort or crash): a one-line :class:`SlideError` naming the
    slide and the budget. A user error in the child is raised again here with its own class."""
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, name=f"wsi-triage tile {slide.name}", daemon=True,
                        args=(send, str(slide), str(out), config, mpp, workers, budget.memory, budget.seconds))
    child.start()
    send.close()
    deadline = None if budget.seconds is None else time.monotonic() + budget.seconds + KILL_GRACE_SECONDS
    try:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not receive.poll(wait):
                raise SlideError(f"{slide}: reading took longer than the per-slide budget of {budget.seconds:g} s "
                                 "(--slide-timeout) and was stopped; damaged or unusually large slide")
            try:
                message = json.loads(receive.recv_bytes())
            except EOFError:
                child.join()
                raise SlideError(f"{slide}: reading the slide ended abnormally ({_signal_name(child.exitcode)}); "
                                 f"damaged slide, or over the per-slide memory budget of {_size_text(budget.memory)} "
                                 "(--slide-memory)") from None
            kind = message["kind"]
            if kind == "progress":
                if progress is not None:
                    progress(message["stage"], message["done"], message["total"])
            elif kind == "result":
                peak = int(message.pop("peak"))
                del message["kind"]
                path = Path(message.pop("path"))
                meta = tile_store.read_store_meta(tile_store.open_store(path))  # the store the child finished
                return TileResult(path=path, meta=meta, **message), peak
            elif kind == "memory":
                raise SlideError(f"{slide}: needs more memory than the per-slide budget of "
                                 f"{_size_text(budget.memory)} (--slide-memory); damaged or unusually large slide")
            elif kind == "error":
                _raise_error(message, budget)
            else:
                raise ChildCrash(message["type"], message["message"])
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
