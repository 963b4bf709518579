"""One process at a time in a directory (``flock``).

No module state: a lock is held by its open file, entered once by the code that owns the
directory (the orchestration layer for a run directory, the provisioning for a mask cache)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

from dhat_seg.errors import UserError, os_reason


LOCK_FILE = ".lock"


@contextlib.contextmanager
def directory_lock(directory: Path, *, wait: bool, busy: str = "directory", hint: str = "",
                   on_wait: Callable[[str], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on ``directory/.lock`` (POSIX ``flock``; a no-op where there
    is none) for the block, creating ``directory``. The kernel drops the lock when the
    process ends, killed or not, so a lock never outlives its holder.

    ``wait=False``: a UserError at once when another process holds it, ``busy`` (e.g.
    "run directory") naming what is in use, with the holder's pid, and ``hint`` (e.g.
    "choose another --out"). ``wait=True``: wait for it, calling ``on_wait(pid)`` first.
    Yields whether it had to wait.

    Not re-entrant: a second block on the same directory inside the first is a
    RuntimeError; code that runs under a lock its caller holds is told so (e.g.
    ``locked=True``) and takes none."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"{busy} {str(directory)!r} cannot be written ({os_reason(exc)}); expected a writable folder"
                        + (f"; {hint}" if hint else "")) from None
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    waited = False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if holder == str(os.getpid()):  # the pid is cleared on release: this process holds it
                    raise RuntimeError(f"{busy} {str(directory)!r} is locked by this process already; a lock is not "
                                       "re-entered: the code holding it hands that down") from None
                if not wait:
                    raise UserError(f"{busy} {str(directory)!r} is in use by another dhat-seg process (pid {holder}); "
                                    f"wait for it to finish" + (f" or {hint}" if hint else "")) from None
                if on_wait is not None:
                    on_wait(holder)
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the holder's pid, for the message of a process that finds it busy
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            except OSError:
                pass  # a full disk: the pid is only informative
        try:
            yield waited
        finally:
            if fcntl is not None:
                try:  # no pid while nobody holds it
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
    finally:
        os.close(fd)  # releases the flock with the last descriptor of this open


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "unknown"
    except (OSError, UnicodeDecodeError):
        return "unknown"
