"""Where and how a run computes: device selection, the training passes' autocast dtype,
seeding the global random number generators, deterministic kernels, stopping at a safe
point on SIGINT/SIGTERM, and one process at a time in a directory (``flock``).

No module state: a stop request is held by a :class:`GracefulStop` object and a lock by
its open file; the orchestration layer enters them once per run (:func:`run_scope`,
:func:`directory_lock`) and hands the stop object to the work that polls it."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import numpy as np
import torch

from dhat_seg.errors import Interrupted, UserError, os_reason


def select_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is invalid; expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for but CUDA is not available; use --device cpu or auto")
    return device


def resolve_amp_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the training passes, or None (fp32). Attacks never use it
    (they run in fp32 unless ``attack_precision: autocast``)."""
    if not cfg.amp:
        return None
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if cfg.amp_dtype == "float16":
        if device.type != "cuda":
            raise UserError(f"config option amp_dtype='float16' needs a CUDA device (this run uses {device}); "
                            "expected amp_dtype 'bfloat16' or 'auto' here")
        return torch.float16
    if cfg.amp_dtype == "bfloat16" and not bf16_ok:
        raise UserError(f"config option amp_dtype='bfloat16' is not supported by {device}; expected 'float16' or 'auto'")
    return torch.bfloat16 if bf16_ok else torch.float16


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------
# Deterministic kernels
# ---------------------------------------------------------------------------------


@contextlib.contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the block (the previous settings restored after).

    CPU: nothing to change, torch's CPU kernels give the same bits run after run for the
    same number of threads. CUDA: cuDNN autotuning off, cuDNN's deterministic algorithms,
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an operation without a
    deterministic CUDA kernel warns, naming itself, and runs anyway) and cuBLAS's fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless set; it takes effect for the
    cuBLAS handles created after it, so before a process's first CUDA matmul).
    ``DHAT_SEG_DETERMINISTIC=0`` chooses speed instead: cuDNN autotuning on
    (``cudnn.benchmark``: the fastest convolution algorithms for each input shape, picked on
    the first batches), nondeterministic kernels allowed."""
    if device.type != "cuda":
        yield
        return
    if os.environ.get("DHAT_SEG_DETERMINISTIC", "1") == "0":
        before_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before_benchmark
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn = torch.backends.cudnn
    before = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.benchmark, cudnn.deterministic = False, True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = before[0], before[1]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


# ---------------------------------------------------------------------------------
# Stopping at a safe point on SIGINT / SIGTERM
# ---------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------
# One process at a time in a directory
# ---------------------------------------------------------------------------------

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


#: Most DataLoader workers chosen automatically (``num_workers: -1``).
MAX_AUTO_WORKERS = 8


def worker_count(num_workers: int, device: torch.device, cpus: int | None = None) -> int:
    """``num_workers``, or when -1 (automatic): none on CPU (the loader would take cores
    from training) and ``min(8, cpus - 1)`` on an accelerator."""
    if num_workers >= 0:
        return num_workers
    if device.type == "cpu":
        return 0
    cpus = cpus if cpus is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return max(0, min(MAX_AUTO_WORKERS, cpus - 1))
