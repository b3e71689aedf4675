"""A per-slide writer lock: ``<out>/<stem>.zarr.lock`` beside the tile store.

Tiling, scoring, aggregating and repairing one slide's store take this lock, so two runs (a
second terminal, two batches over one folder) never write the same store at once: the second
waits, then finds the work done and reuses it. The lock is an ``flock`` on the file, which the
kernel releases when its owner dies, so a lock left by a killed run is stale by construction
and is simply taken over; the file names its owner (pid, host, start time) for the message a
waiting or refused writer prints. The lock is re-entrant within a process (``run`` holds it
while it calls the tiler, the scorer and the aggregator).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import OutputError, StoreBusyError

__all__ = ["lock_path", "store_lock", "lock_owner"]

LOCK_SUFFIX = ".lock"
POLL_SECONDS = 0.2

_HELD: dict[str, list] = {}  # resolved lock path -> [count, fd, owning thread id]
_HELD_LOCK = threading.Lock()
_PATH_LOCKS: dict[str, threading.RLock] = {}


def lock_path(store: str | Path) -> Path:
    """The lock file of a store: beside it, so it survives the store being re-created."""
    store = Path(store)
    return store.with_name(store.name + LOCK_SUFFIX)


def lock_owner(path: str | Path) -> dict:
    """What the lock file says about its holder (may be empty or stale)."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _busy_text(store: Path, owner: dict) -> str:
    who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
    since = f" since {owner['started']}" if owner.get("started") else ""
    return f"{store}: in use by {who}{since}"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on the file at ``path`` now, or None when another holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create the lock file ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:  # a filesystem without locks: say so rather than run unprotected
            os.close(fd)
            raise OutputError(f"{path}: cannot lock ({exc.strerror or exc})") from None
        try:  # the holder we waited on may have unlinked the file: lock the file now at the path
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _write_owner(fd: int) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    with contextlib.suppress(OSError):  # advisory only: a full disk must not fail the lock itself
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)


@contextlib.contextmanager
def store_lock(store: str | Path, *, wait: float | None = None,
               on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the writer lock of ``store`` for the ``with`` block.

    ``wait``: seconds to wait for another holder (None: as long as it takes; 0: not at all),
    after which :class:`StoreBusyError` says who holds it. ``on_wait(message)`` is called once
    when the lock is busy (e.g. to tell the user why nothing happens).
    """
    store = Path(store)
    path = lock_path(store)
    key = str(path.parent.resolve() / path.name) if path.parent.exists() else str(path.absolute())
    with _HELD_LOCK:
        rlock = _PATH_LOCKS.setdefault(key, threading.RLock())
    if not rlock.acquire(timeout=-1 if wait is None else max(wait, 0)):
        raise StoreBusyError(f"{store}: in use by another thread of this process")
    try:
        held = _HELD.get(key)
        if held is not None:  # re-entrant: this thread already holds it
            held[0] += 1
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"{path.parent}: cannot write output ({exc.strerror or exc})") from None
            deadline = None if wait is None else time.monotonic() + wait
            told = False
            while (fd := _try_lock(path)) is None:
                if deadline is not None and time.monotonic() >= deadline:
                    raise StoreBusyError(f"{_busy_text(store, lock_owner(path))}; wait for it to finish, "
                                         "then rerun (its finished work is reused)")
                if on_wait and not told:
                    on_wait(f"waiting: {_busy_text(store, lock_owner(path))}")
                    told = True
                time.sleep(POLL_SECONDS)
            _write_owner(fd)
            _HELD[key] = [1, fd, threading.get_ident()]
        try:
            yield path
        finally:
            held = _HELD[key]
            held[0] -= 1
            if held[0] == 0:
                del _HELD[key]
                with contextlib.suppress(OSError):
                    os.unlink(path)  # before unlocking: a waiter then re-checks the path (see _try_lock)
                os.close(held[1])
    finally:
        rlock.release()
