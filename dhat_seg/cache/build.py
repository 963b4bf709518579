"""Building a mask cache: chunked, locked, resumable, byte-identical after a resume.

Faults: two processes building the same cache take turns on its lock (the second waits,
then reuses the finished cache); SIGINT/SIGTERM stop after the current batch, dropping
only the unfinished chunk; a chunk or ``meta.json`` that cannot be written (full disk,
read-only file system) is a :class:`~dhat_seg.errors.WriteError` that keeps every
finished chunk. In each case the same command later resumes at the first missing chunk.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dhat_seg.attention import validate_attention
from dhat_seg.run.checkpoint import atomic_write_text, write_atomic
from dhat_seg.errors import Interrupted, PluginError, UserError, write_error
from dhat_seg.run.locks import directory_lock
from dhat_seg.run.stopping import GracefulStop, ignore_stop_signals, signal_name, stop_scope
from dhat_seg.cache.key import _jsonable, sha256_file
from dhat_seg.cache.key import CHUNK_SIZE, FORMAT, META, check_key, key_hash
from dhat_seg.cache.store import MaskCache, _chunk_name, _chunk_ok, read_meta
# ---------------------------------------------------------------------------------
# Building a cache
# ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock(directory: Path, log: Callable[[str], None]) -> Iterator[bool]:
    """Exclusive lock on ``directory/.lock`` (POSIX flock; a no-op elsewhere): two
    processes never build the same cache at once, the second waits and then reuses.
    Yields whether it waited."""
    def waiting(pid: str) -> None:
        log(f"mask cache: another process (pid {pid}) is building {directory}; waiting for it")

    with directory_lock(directory, wait=True, busy="mask cache directory", on_wait=waiting) as waited:
        yield waited


class _Unaugmented(Dataset):
    """(image, label) of samples [lo, hi) without any transform."""

    def __init__(self, dataset, lo: int, hi: int):
        self.dataset, self.lo, self.hi = dataset, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int):
        index = self.lo + i
        if hasattr(self.dataset, "load_image"):
            return self.dataset.load_image(index), int(self.dataset.labels[index])
        image, label = self.dataset[index][:2]
        return image, int(label)


def _encode(result: Tensor, storage: str) -> np.ndarray:
    """B x 1 x H x W bool / float -> B x row_bytes uint8."""
    flat = result.detach().flatten(1).cpu()
    if storage == "bits":
        return np.packbits(flat.numpy().astype(np.uint8), axis=1)
    return flat.float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _write_npy(path: Path, array: np.ndarray) -> str:
    """Write atomically (an OSError leaves no partial file); return the file's SHA-256."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    write_atomic(path, buffer.getvalue())
    return sha256_file(path)


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@dataclass
class Threshold:
    """Threshold settings used for the coverage reported by a build (not part of the key)."""

    policy: str = "fixed"
    omega: float = 0.1
    quantile: float = 0.5


def build_masks(
    fn: Callable[[Tensor, Tensor], Tensor],
    dataset,
    directory: str | Path,
    key: Mapping[str, Any],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    chunk_size: int = CHUNK_SIZE,
    num_workers: int = 0,
    threshold: Threshold | None = None,
    rebuild: bool = False,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    method_name: str | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    locked: bool = False,
    stop: GracefulStop | None = None,
) -> MaskCache:
    """Compute (or finish computing) the masks of every sample of ``dataset`` into
    ``directory`` and return the verified cache.

    ``fn(images, labels)`` follows the attention contract (B x 3 x H x W in [0, 1] on
    ``device`` -> bool or [0, 1] float B x 1 x H x W); it sees un-augmented images in
    index order. Chunks already recorded in ``meta.json`` with a matching SHA-256 are
    not recomputed; a stale temporary file of an interrupted write is discarded. Each
    chunk runs under its own seed (forked RNG, the caller's generators untouched).
    ``rebuild`` discards whatever the directory holds first; without it a directory
    holding a cache of another key is an error. Several processes building one cache
    together (the ranks of a torchrun job): :func:`dhat_seg.cache.sharded.build_sharded`.

    ``locked``: the caller holds ``directory``'s lock already (it has checked, after any
    wait, whether another process finished the cache), so none is taken here. ``stop``:
    the GracefulStop of the enclosing run, polled after each batch; None: SIGINT/SIGTERM
    handling is installed for the build.
    """
    directory = Path(directory)
    device = torch.device(device)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    threshold = threshold or Threshold()
    method_name = method_name or str(key.get("method", {}).get("name", "attention"))
    if batch_size < 1 or chunk_size < 1:
        raise UserError(f"mask batch size {batch_size} / chunk size {chunk_size} is invalid; expected positive integers")
    with (contextlib.nullcontext(False) if locked else _build_lock(directory, log)) as waited, stop_scope(stop) as stop:
        if rebuild and not waited:  # after a wait, the other process has just rebuilt it
            _clear(directory)
        meta = read_meta(directory)
        if meta is not None:
            check_key(directory, meta["key"], key)
            if meta.get("complete"):
                if waited:
                    log(f"mask cache: {directory} was finished by the other process; reusing it")
                return MaskCache.open(directory, key)
        for stale in directory.glob(".chunk_*.tmp*"):
            stale.unlink()
        n = len(dataset)
        if n == 0:
            raise UserError("cannot build a mask cache of an empty dataset")
        if meta is None:
            meta = _new_meta(key, dataset, chunk_size, extra_meta)
        chunk_size = int(meta["chunk_size"])
        n_chunks = math.ceil(n / chunk_size)
        todo = [k for k in range(n_chunks) if not _chunk_ok(directory, _chunk_name(k), meta["chunks"].get(_chunk_name(k)))]
        stale_records = [k for k in todo if meta["chunks"].get(_chunk_name(k))]
        if stale_records:
            log(f"mask cache: {len(stale_records)} recorded chunk(s) of {directory} are damaged and are recomputed")
        from tqdm import tqdm

        remaining = sum(min(n, (k + 1) * chunk_size) - k * chunk_size for k in todo)
        bar = tqdm(total=remaining, desc=f"masks [{method_name}]", unit="img", leave=False, file=sys.stderr,
                   disable=not progress or None, dynamic_ncols=True)
        try:
            for k in todo:
                lo, hi = k * chunk_size, min(n, (k + 1) * chunk_size)
                t0 = time.time()
                rows, storage = _compute_chunk(fn, dataset, lo, hi, k, device, batch_size, num_workers, meta["storage"],
                                               method_name, bar, _stopper(stop, directory, k, n_chunks, meta))
                meta["storage"] = storage
                name = _chunk_name(k)
                with _kept_on_failure(directory / name, meta, n_chunks):
                    meta["chunks"][name] = {"sha256": _write_npy(directory / name, rows), "samples": [lo, hi]}
                    meta["build_seconds"] = round(float(meta.get("build_seconds", 0.0)) + time.time() - t0, 3)
                    atomic_write_text(directory / META, json.dumps(meta, indent=1, sort_keys=True))
        finally:
            bar.close()
        _complete(directory, meta, threshold, n_chunks)
    return MaskCache.open(directory, key)


def _new_meta(key: Mapping[str, Any], dataset, chunk_size: int, extra_meta: Mapping[str, Any] | None) -> dict:
    h, w = dataset.image_size
    return {"format": FORMAT, "key": _jsonable(key), "key_hash": key_hash(key), "n": len(dataset), "height": int(h),
            "width": int(w), "storage": None, "chunk_size": int(chunk_size), "chunks": {}, "complete": False,
            "build_seconds": 0.0, **_jsonable(dict(extra_meta or {}))}


def _complete(directory: Path, meta: dict, threshold: Threshold, n_chunks: int) -> None:
    """Mark the cache whose chunks are all recorded in ``meta`` complete (with its coverage)."""
    cache = MaskCache(directory, meta)
    meta["complete"] = True
    meta["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["bytes_per_sample"] = round(cache.bytes_per_sample, 2)
    meta["coverage"] = {"value": round(cache.coverage(threshold.policy, threshold.omega, threshold.quantile), 6),
                        "policy": threshold.policy, "omega": threshold.omega, "quantile": threshold.quantile}
    with _kept_on_failure(directory / META, meta, n_chunks):
        atomic_write_text(directory / META, json.dumps(meta, indent=1, sort_keys=True))


def _finished(meta: dict) -> int:
    return sum(1 for r in meta["chunks"].values() if r)


@contextlib.contextmanager
def _kept_on_failure(path: Path, meta: dict, n_chunks: int) -> Iterator[None]:
    """An OSError while writing ``path`` (full disk, read-only file system) -> a WriteError
    saying that the finished chunks are kept."""
    before = dict(meta["chunks"])
    try:
        yield
    except OSError as exc:
        meta["chunks"] = before
        raise write_error(exc.filename or path, exc, f"the {_finished(meta)} finished chunk(s) of {n_chunks} are kept; "
                          "free space or choose a writable --cache-dir, then run the same command again to finish the "
                          "cache") from None


def _stopper(stop: GracefulStop, directory: Path, k: int, n_chunks: int, meta: dict) -> Callable[[], None]:
    """The safe point of a build (after each batch): Interrupted when SIGINT/SIGTERM asked ``stop`` to stop."""
    def check() -> None:
        signum = stop.requested()
        if signum is not None:
            raise Interrupted(signum, f"{signal_name(signum)} received; stopped building the mask cache {directory} in "
                                      f"chunk {k + 1}/{n_chunks}; the {_finished(meta)} finished chunk(s) are kept and "
                                      "the same command resumes the build from the first missing one")
    return check


def _compute_chunk(fn, dataset, lo, hi, k, device, batch_size, num_workers, storage, method_name, bar,
                   stop: Callable[[], None] = lambda: None):
    from dhat_seg.data.base import derive_seed

    loader = DataLoader(_Unaugmented(dataset, lo, hi), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        worker_init_fn=ignore_stop_signals if num_workers else None)
    parts = []
    with torch.random.fork_rng(devices=_cuda_devices(device)):
        # one seed per chunk: a resumed build equals an uninterrupted one
        torch.manual_seed(derive_seed(0, "mask-chunk", k))
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            result = validate_attention(fn(images, labels), images, method_name)
            kind = "bits" if result.dtype == torch.bool else "uint8"
            if storage is None:
                storage = kind
            elif kind != storage:
                raise PluginError(f"attention method {method_name!r} returned {'bool masks' if kind == 'bits' else 'soft maps'} "
                                  f"for some images and {'bool masks' if storage == 'bits' else 'soft maps'} for others; "
                                  "a mask cache needs one kind")
            parts.append(_encode(result, storage))
            bar.update(images.shape[0])
            stop()
    return np.concatenate(parts, axis=0), storage


def _clear(directory: Path) -> None:
    for path in list(directory.glob("chunk_*.npy")) + list(directory.glob(".chunk_*.tmp*")) + [directory / META]:
        if path.exists():
            path.unlink()


