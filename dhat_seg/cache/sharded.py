"""A mask cache built by several processes together (the ranks of a torchrun job).

Rank r computes the chunks k with ``k % world == r`` (each chunk under its own seed, as in
a single-process build, so the chunk files are byte-identical to one) and records each
finished chunk in its own ``.shard-<r>.json``; after a barrier rank 0 alone checks every
chunk, writes ``meta.json`` and marks the cache complete, and after a second barrier every
rank opens it. An interrupted sharded build resumes from the shard records (with any
number of processes, or one: the single-process build reads them too only through the
chunks they name, so it simply recomputes unrecorded chunks).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from dhat_seg.run.checkpoint import atomic_write_text
from dhat_seg.errors import PluginError, UserError
from dhat_seg.run.stopping import GracefulStop, stop_scope
from dhat_seg.cache.build import (Threshold, _build_lock, _clear, _complete, _compute_chunk, _kept_on_failure, _new_meta,
                                  _stopper, _write_npy)
from dhat_seg.cache.key import CHUNK_SIZE, check_key
from dhat_seg.cache.store import MaskCache, _chunk_name, _chunk_ok, read_meta

RECORD_GLOB = ".shard-*.json"


@dataclass(frozen=True)
class Shard:
    """This process's part of a build: ``rank`` of ``world``; ``barrier`` waits for all."""

    rank: int
    world: int
    barrier: Callable[[], None]


def _record_path(directory: Path, rank: int) -> Path:
    return directory / f".shard-{rank}.json"


def _read_record(path: Path) -> dict[str, dict[str, Any]]:
    """The chunk records of one shard file ({} when missing or damaged: its chunks are recomputed)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, dict)} if isinstance(found, dict) else {}


def _read_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Chunk records of every shard file."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob(RECORD_GLOB)):
        records.update(_read_record(path))
    return records


def build_sharded(fn, dataset, directory: str | Path, key: Mapping[str, Any], shard: Shard, *, device="cpu",
                  batch_size: int = 128, chunk_size: int = CHUNK_SIZE, num_workers: int = 0,
                  threshold: Threshold | None = None, rebuild: bool = False, log: Callable[[str], None] | None = None,
                  progress: bool = True, method_name: str | None = None,
                  extra_meta: Mapping[str, Any] | None = None, locked: bool = False,
                  stop: GracefulStop | None = None) -> MaskCache:
    """:func:`~dhat_seg.cache.build.build_masks` by ``shard.world`` processes, each calling
    this with its ``shard`` (see the module doc); the same arguments otherwise
    (``locked``: rank 0's caller holds ``directory``'s lock for the whole build)."""
    directory, device = Path(directory), torch.device(device)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    threshold = threshold or Threshold()
    method_name = method_name or str(key.get("method", {}).get("name", "attention"))
    main = shard.rank == 0
    if main:
        directory.mkdir(parents=True, exist_ok=True)
        if rebuild:
            _clear(directory)
            for path in directory.glob(RECORD_GLOB):
                path.unlink()
    shard.barrier()
    meta = read_meta(directory)
    if meta is not None:
        check_key(directory, meta["key"], key)
    if meta is not None and meta.get("complete"):
        if main:
            log(f"mask cache: reusing {directory}")
        shard.barrier()  # every rank has read it before any could change it
        return MaskCache.open(directory, key)
    meta = meta or _new_meta(key, dataset, chunk_size, extra_meta)
    chunk_size = int(meta["chunk_size"])
    n = len(dataset)
    n_chunks = math.ceil(n / chunk_size)
    recorded = {**meta["chunks"], **_read_records(directory)}
    mine = [k for k in range(n_chunks) if k % shard.world == shard.rank
            and not _chunk_ok(directory, _chunk_name(k), recorded.get(_chunk_name(k)))]
    if main:
        log(f"mask cache: building {directory} with {shard.world} processes ({n} masks in {n_chunks} chunks)")
    shard.barrier()  # every rank has read the records before any writes
    own = _read_record(_record_path(directory, shard.rank))  # rewritten whole after each chunk
    storage = meta["storage"]
    from tqdm import tqdm

    remaining = sum(min(n, (k + 1) * chunk_size) - k * chunk_size for k in mine)
    bar = tqdm(total=remaining, desc=f"masks [{method_name}] rank {shard.rank}", unit="img", leave=False, file=sys.stderr,
               disable=not (progress and main) or None, dynamic_ncols=True)
    try:
        with stop_scope(stop) as stop:
            for k in mine:
                lo, hi = k * chunk_size, min(n, (k + 1) * chunk_size)
                rows, storage = _compute_chunk(fn, dataset, lo, hi, k, device, batch_size, num_workers, storage, method_name,
                                               bar, _stopper(stop, directory, k, n_chunks, meta))
                name = _chunk_name(k)
                with _kept_on_failure(directory / name, meta, n_chunks):
                    own[name] = {"sha256": _write_npy(directory / name, rows), "samples": [lo, hi], "storage": storage}
                    atomic_write_text(_record_path(directory, shard.rank), json.dumps(own, sort_keys=True))
    finally:
        bar.close()
    shard.barrier()
    if main:
        with contextlib.nullcontext() if locked else _build_lock(directory, log):
            _finalise(directory, meta, n_chunks, threshold)
    shard.barrier()
    return MaskCache.open(directory, key)


def _finalise(directory: Path, meta: dict, n_chunks: int, threshold: Threshold) -> None:
    """Rank 0: every chunk checked against its record, ``meta.json`` written complete."""
    records = {**meta["chunks"], **_read_records(directory)}
    kinds = {r.get("storage") for r in records.values()} | {meta.get("storage")}
    kinds.discard(None)
    if len(kinds) > 1:
        raise PluginError(f"the processes building {directory} got bool masks in some chunks and soft maps in others; "
                          "a mask cache needs one kind")
    meta["storage"] = kinds.pop() if kinds else meta.get("storage")
    for k in range(n_chunks):
        name = _chunk_name(k)
        record = records.get(name)
        if not _chunk_ok(directory, name, record):
            raise UserError(f"mask cache {str(directory)!r}: chunk {name} is missing or damaged after the sharded build; "
                            "run the same command again to recompute it")
        meta["chunks"][name] = {"sha256": record["sha256"], "samples": record["samples"]}
    _complete(directory, meta, threshold, n_chunks)
    for path in directory.glob(RECORD_GLOB):
        path.unlink()
