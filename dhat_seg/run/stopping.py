"""Stopping at a safe point on SIGINT/SIGTERM, and the run scope.

No module state: a stop request is held by a :class:`GracefulStop` object; the
orchestration layer enters it once per run (:func:`run_scope`) and hands the stop object
to the work that polls it."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, ContextManager, Iterator

import torch

from dhat_seg.errors import Interrupted
from dhat_seg.run.determinism import deterministic_kernels


class GracefulStop:
    """SIGINT/SIGTERM as a stop request, held by this object (``with GracefulStop() as stop``).

    Within the block, SIGINT (Ctrl-C) and SIGTERM only record a stop request
    (:meth:`requested`), which the work honours at its next safe point (the trainer after
    a batch, a mask build after a batch, both discarding only unfinished work); a second
    signal stops at once (:class:`~dhat_seg.errors.Interrupted`; everything on disk is
    written atomically). The previous handlers are restored when the block ends; a no-op
    outside the main thread (the stop is then never requested).

    Entered once, by the outermost caller (:func:`run_scope`); nested work is handed the
    entered object (:func:`stop_scope`) instead of installing handlers again. An object
    that is never entered is a stop that is never requested."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] | None = None
        self._active = False

    def requested(self) -> int | None:
        """The signal number of a pending stop request, else None."""
        return self.signum

    def __enter__(self) -> "GracefulStop":
        if self._active:
            raise RuntimeError("this GracefulStop is installed already: hand it down instead of entering it again")
        self.signum, self._active = None, True
        if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
            self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                for s in self._previous:
                    signal.signal(s, self._handle)
            except BaseException:
                self._restore()
                raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, h in (self._previous or {}).items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous, self._active, self.signum = None, False, None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum, f"{signal.Signals(signum).name} received a second time; stopped at once "
                                      "(checkpoints and cache chunks on disk are complete: they are written atomically)")
        self.signum = signum
        try:  # a raw write: print() here could re-enter a stream the interrupted code is writing
            os.write(2, f"\n{signal.Signals(signum).name} received: stopping at the next safe point (the end of the "
                        "current batch); send it again to stop at once\n".encode())
        except OSError:
            pass


def stop_scope(stop: GracefulStop | None) -> ContextManager[GracefulStop]:
    """``stop``, the entered GracefulStop of an enclosing block, as it is (nothing installed
    again), or (None) a new GracefulStop to enter."""
    return contextlib.nullcontext(stop) if stop is not None else GracefulStop()


@contextlib.contextmanager
def run_scope(device: torch.device, stop: GracefulStop | None = None) -> Iterator[GracefulStop]:
    """What a run needs of the process for its whole length, entered once by the
    orchestration layer: SIGINT/SIGTERM as a stop request (yielded, to be handed to the
    work that polls it) and :func:`deterministic_kernels`. Given ``stop``, the GracefulStop
    of an enclosing run scope (whose kernels hold already), it enters nothing."""
    if stop is not None:
        yield stop
        return
    with GracefulStop() as stop, deterministic_kernels(device):
        yield stop


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of DataLoader workers: SIGINT/SIGTERM are the main process's to
    handle (a Ctrl-C reaches the whole process group; a worker killed by it would make
    the main process's safe stop fail); the main process shuts its workers down."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
