"""Per-sample mask cache: expensive segmenters (SAM, SOLO, ...) run once per image.

DHAT needs a foreground mask of every clean training image in every batch. Computing it
per batch (the authors' code recomputes Grad-CAM for every batch) costs a segmenter
forward pass per image and epoch; this module computes each sample's mask once, on the
*un-augmented* image, stores it on disk, and lets the data loader hand it out with its
image, both augmented by the same random crop and flip (:class:`MaskedDataset`).

Layout of one cache, ``<cache_root>/masks/<dataset>-<split>-<method>-<keyhash>/``::

    meta.json          the key, storage kind, shape, SHA-256 of every chunk, coverage,
                       build time (rewritten atomically after every chunk)
    chunk_00000.npy    samples 0 .. 1023: a numpy array with one row per sample
    chunk_00001.npy    samples 1024 .. 2047, ...
    .lock              held (flock) by the process that builds

What is stored is what the method returns, at the dataset's stored resolution:

* bool masks (SAM, SOLO): storage "bits", ``np.packbits`` of the H*W mask, i.e.
  ceil(H*W / 8) bytes per sample (128 bytes at 32 x 32);
* soft maps in [0, 1] (Grad-CAM, Integrated Gradients): storage "uint8",
  round(255 * map), H*W bytes per sample (8x more). The threshold policy (omega,
  quantile, ...) is applied when a batch is read (:func:`batch_foreground`), so an
  omega ablation needs no rebuild. Quantisation moves a pixel across the threshold
  only when its map value lies within 1/510 of it.

So the threshold settings are not part of the key. The key (:func:`mask_key`) holds
the dataset identity (name, split, size, image size, content ``fingerprint()``), the
method's name, version and resolved options (file-valued options such as
``checkpoint`` by their SHA-256, not their path) and, for methods that read a
classifier, the SHA-256 of its weights ("frozen": the attention model's weights file;
"self": the tensors of the model being trained, with the epoch they were taken at).
The directory name carries a hash of the key, so other settings get another directory
and a cache is never reused for settings it was not built with; ``meta.json`` repeats
the full key, and opening a cache with a different key is refused with a message
naming what differs.

Chunks are written atomically (temporary file + ``os.replace``) and recorded with
their SHA-256 in ``meta.json``: an interrupted build resumes at the first chunk not
recorded. Every chunk is computed under its own seed, so a resumed build is
byte-identical to an uninterrupted one even for stochastic methods. Chunks are
verified against their hashes when a cache is opened and read through memory maps
(``np.load(mmap_mode="r")``), opened lazily in each DataLoader worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dhat_seg.attention import AttentionSpec, foreground_mask, validate_attention
from dhat_seg.checkpoint import atomic_write_text
from dhat_seg.data import split_args, split_for
from dhat_seg.errors import PluginError, UserError
from dhat_seg.models import module_mode

FORMAT = "dhat-seg-masks/1"
META = "meta.json"
CHUNK_SIZE = 1024
STORAGES = ("bits", "uint8")
#: Option names whose (existing-file) values enter the key by content, not by path.
_FILE_OPTION = re.compile(r"checkpoint|weights|path|file", re.IGNORECASE)
#: Said whenever a cache cannot be used as it is.
REBUILD_HINT = "pass --rebuild-masks to `dhat-seg train` or --rebuild to `dhat-seg masks build` to rebuild it"


# ---------------------------------------------------------------------------------
# Hashes and the key
# ---------------------------------------------------------------------------------


def sha256_file(path: str | Path, memo_dir: Path | None = None) -> str:
    """SHA-256 of a file's bytes (hex). With ``memo_dir``, remembered per (path, size,
    mtime) in ``memo_dir/file-hashes.json``, so a multi-GB SAM checkpoint is hashed once."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    ident = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_path = memo_dir / "file-hashes.json" if memo_dir is not None else None
    memo: dict[str, str] = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (json.JSONDecodeError, OSError):
            memo = {}
        if ident in memo:
            return memo[ident]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    if memo_path is not None:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        memo[ident] = digest
        atomic_write_text(memo_path, json.dumps(memo, indent=1))
    return digest


def sha256_state(model: nn.Module) -> str:
    """SHA-256 of a model's state (every parameter and buffer: names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def key_options(options: Mapping[str, Any], memo_dir: Path | None = None) -> dict[str, Any]:
    """A method's resolved options as they enter the key: file-valued options (names
    containing checkpoint / weights / path / file) by content, so that moving a
    checkpoint does not invalidate the cache and replacing it in place does."""
    out: dict[str, Any] = {}
    for name, value in sorted(options.items()):
        if _FILE_OPTION.search(name) and isinstance(value, (str, Path)) and str(value):
            path = Path(value).expanduser()
            if path.is_file():
                value = f"sha256:{sha256_file(path, memo_dir)}"
        out[name] = value
    return _jsonable(out)


def mask_key(
    dataset,
    spec: AttentionSpec,
    options: Mapping[str, Any],
    *,
    classifier_sha256: str | None = None,
    source: str = "frozen",
    weights_epoch: int | None = None,
    memo_dir: Path | None = None,
) -> dict[str, Any]:
    """The key of a mask cache (see the module docstring).

    Args:
        dataset: the (un-augmented) dataset the masks describe.
        spec, options: the attention method and its resolved options.
        classifier_sha256: SHA-256 of the classifier the method reads (None when the
            method reads none).
        source: "frozen" (the separate attention model) or "self" (the model trained).
        weights_epoch: for "self", the epoch the weights were taken at.
    """
    key: dict[str, Any] = {
        "format": FORMAT,
        "dataset": {
            "name": dataset.name,
            "split": dataset.split,
            "size": len(dataset),
            "image_size": list(dataset.image_size),
            "fingerprint": dataset.fingerprint(),
        },
        "method": {"name": spec.name, "version": str(spec.version), "options": key_options(options, memo_dir)},
        "classifier": None,
    }
    if classifier_sha256 is not None:
        key["classifier"] = {"source": source, "sha256": classifier_sha256}
        if source == "self":
            key["classifier"]["epoch"] = weights_epoch
    return key


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def cache_name(key: Mapping[str, Any]) -> str:
    """``<dataset>-<split>-<method>[-self-eNNNN]-<keyhash>``."""
    d, m, c = key["dataset"], key["method"], key.get("classifier")
    parts = [d["name"], d["split"], m["name"]]
    if c and c.get("source") == "self":
        parts.append(f"self-e{int(c.get('epoch') or 0):04d}")
    parts.append(key_hash(key))
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def cache_dir_for(root: Path, key: Mapping[str, Any]) -> Path:
    """Where the cache of ``key`` lives under a cache root."""
    return Path(root) / "masks" / cache_name(key)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if value else {prefix: {}}
    return {prefix: value}


def _describe(path: str) -> str:
    labels = {
        "dataset.fingerprint": "the dataset's content (data seed, size, files or generator settings)",
        "dataset.size": "the number of samples",
        "dataset.name": "the dataset",
        "dataset.split": "the split",
        "dataset.image_size": "the image size",
        "method.name": "the attention method",
        "method.version": "the attention method's version",
        "classifier": "whether the method reads a classifier",
        "classifier.sha256": "the attention model's weights (SHA-256)",
        "classifier.source": "the attention source (frozen / self)",
        "classifier.epoch": "the epoch of the self-attention weights",
        "format": "the cache format",
    }
    if path.startswith("method.options."):
        return f"attention option {path[len('method.options.'):]!r}"
    return labels.get(path, path)


def key_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(path, stored value, wanted value) for every leaf where two keys differ."""
    a, b = _flatten(_jsonable(stored)), _flatten(_jsonable(wanted))
    return [(p, a.get(p, "<absent>"), b.get(p, "<absent>")) for p in sorted(set(a) | set(b)) if a.get(p, "<absent>") != b.get(p, "<absent>")]


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------
# Reading a cache
# ---------------------------------------------------------------------------------


def _chunk_name(k: int) -> str:
    return f"chunk_{k:05d}.npy"


def _row_bytes(storage: str, height: int, width: int) -> int:
    return math.ceil(height * width / 8) if storage == "bits" else height * width


def read_meta(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        raise UserError(f"mask cache {str(directory)!r} is corrupt: {META} is not valid JSON; {REBUILD_HINT}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("key"), dict):
        raise UserError(f"mask cache {str(directory)!r} is corrupt or of another format (expected {FORMAT}); {REBUILD_HINT}")
    return meta


def _chunk_ok(directory: Path, name: str, record: Mapping[str, Any] | None) -> bool:
    path = directory / name
    return bool(record) and path.is_file() and sha256_file(path) == record.get("sha256")


class MaskCache:
    """A complete, verified mask cache, read through memory maps.

    ``cache[i]`` is sample ``i``'s mask as a 1 x H x W tensor: bool for storage "bits",
    uint8 (0..255 = round(255 * map)) for "uint8". Picklable: memory maps are opened
    lazily in each process (DataLoader workers map the files instead of copying them).
    """

    def __init__(self, directory: Path, meta: dict[str, Any]):
        self.directory = Path(directory)
        self.meta = meta
        self.key: dict[str, Any] = meta["key"]
        self.n = int(meta["n"])
        self.height, self.width = int(meta["height"]), int(meta["width"])
        self.storage: str = meta["storage"]
        self.chunk_size = int(meta["chunk_size"])
        self._maps: dict[int, np.ndarray] = {}

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | Path, expected_key: Mapping[str, Any] | None = None, *, verify: bool = True,
             hint: str = REBUILD_HINT) -> "MaskCache":
        """Open a complete cache; raise a UserError when it is missing, built for other
        settings than ``expected_key`` (naming what differs), incomplete, or corrupt."""
        directory = Path(directory)
        meta = read_meta(directory)
        if meta is None:
            raise UserError(f"{str(directory)!r} holds no mask cache ({META} is missing); build one with `dhat-seg masks build`")
        if expected_key is not None:
            check_key(directory, meta["key"], expected_key, hint)
        done = sum(1 for r in meta.get("chunks", {}).values() if r)
        total = math.ceil(int(meta["n"]) / int(meta["chunk_size"]))
        if not meta.get("complete") or done < total:
            raise UserError(f"mask cache {str(directory)!r} is incomplete ({done} of {total} chunks): its build was "
                            "interrupted; run the same `dhat-seg masks build` (or `dhat-seg train`) again to finish it")
        cache = cls(directory, meta)
        if verify:
            cache.verify(hint)
        return cache

    def verify(self, hint: str = REBUILD_HINT) -> None:
        """Check every chunk file against its recorded SHA-256 and shape."""
        for k in range(self.num_chunks):
            name = _chunk_name(k)
            record = self.meta["chunks"].get(name)
            if not (self.directory / name).is_file():
                raise UserError(f"mask cache {str(self.directory)!r} is corrupt: {name} is missing; {hint}")
            if not _chunk_ok(self.directory, name, record):
                raise UserError(f"mask cache {str(self.directory)!r} is corrupt: {name} does not match its recorded "
                                f"SHA-256; {hint}")
            rows = np.load(self.directory / name, mmap_mode="r")
            lo, hi = self.chunk_range(k)
            if rows.dtype != np.uint8 or rows.shape != (hi - lo, _row_bytes(self.storage, self.height, self.width)):
                raise UserError(f"mask cache {str(self.directory)!r} is corrupt: {name} has shape {rows.shape}; {hint}")

    # -- shape -------------------------------------------------------------------

    @property
    def soft(self) -> bool:
        """True when the cache holds soft maps (thresholded when read)."""
        return self.storage == "uint8"

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.n / self.chunk_size)

    def chunk_range(self, k: int) -> tuple[int, int]:
        return k * self.chunk_size, min(self.n, (k + 1) * self.chunk_size)

    @property
    def bytes_on_disk(self) -> int:
        return sum((self.directory / _chunk_name(k)).stat().st_size for k in range(self.num_chunks))

    @property
    def bytes_per_sample(self) -> float:
        """On-disk bytes per sample (chunk files, including their .npy headers)."""
        return self.bytes_on_disk / max(self.n, 1)

    # -- reading -----------------------------------------------------------------

    def __len__(self) -> int:
        return self.n

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def _chunk(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.load(self.directory / _chunk_name(k), mmap_mode="r")
        return self._maps[k]

    def _decode(self, rows: np.ndarray) -> Tensor:
        b = rows.shape[0]
        if self.storage == "bits":
            bits = np.unpackbits(rows, axis=1, count=self.height * self.width)
            return torch.from_numpy(bits).view(b, 1, self.height, self.width).bool()
        return torch.from_numpy(np.array(rows, copy=True)).view(b, 1, self.height, self.width)

    def __getitem__(self, index: int) -> Tensor:
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"mask index {index} out of range for a cache of {self.n} samples")
        k, r = divmod(index, self.chunk_size)
        return self._decode(self._chunk(k)[r : r + 1])[0]

    def get_many(self, indices) -> Tensor:
        """Masks of ``indices`` as B x 1 x H x W (bool or uint8)."""
        return torch.stack([self[int(i)] for i in indices])

    def iter_chunks(self) -> Iterator[tuple[int, Tensor]]:
        """(first index, masks B x 1 x H x W) per chunk."""
        for k in range(self.num_chunks):
            yield self.chunk_range(k)[0], self._decode(np.asarray(self._chunk(k)))

    def coverage(self, policy: str = "fixed", omega: float = 0.1, quantile: float = 0.5) -> float:
        """Mean foreground fraction over all samples (soft maps thresholded by the policy)."""
        total = 0.0
        for _, masks in self.iter_chunks():
            total += batch_foreground(masks, policy, omega, quantile).float().mean(dim=(1, 2, 3)).sum().item()
        return total / max(self.n, 1)

    def __repr__(self) -> str:
        return f"MaskCache({str(self.directory)!r}, n={self.n}, {self.height}x{self.width}, storage={self.storage!r})"


def check_key(directory: Path, stored: Mapping[str, Any], wanted: Mapping[str, Any], hint: str = REBUILD_HINT) -> None:
    """Raise a UserError naming the first difference when two keys differ."""
    diffs = key_differences(stored, wanted)
    if not diffs:
        return
    path, old, new = diffs[0]
    more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
    raise UserError(f"mask cache {str(directory)!r} was built for other settings: {_describe(path)} differs "
                    f"(cache: {_short(old)}, now: {_short(new)}){more}; it is never reused for other settings: {hint}")


def batch_foreground(masks: Tensor, policy: str = "fixed", omega: float = 0.1, quantile: float = 0.5) -> Tensor:
    """Cached masks of a batch (bool, or uint8 soft maps) -> bool foreground B x 1 x H x W.

    Soft maps are de-quantised to value / 255 and thresholded by the policy
    (:func:`dhat_seg.attention.foreground_mask`, the paper's omega)."""
    if masks.dtype == torch.bool:
        return masks
    return foreground_mask(masks.float() / 255.0, policy, omega, quantile)


# ---------------------------------------------------------------------------------
# Building a cache
# ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock(directory: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Exclusive lock on ``directory/.lock`` (POSIX flock; a no-op elsewhere): two
    processes never build the same cache at once, the second waits and then reuses."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(directory / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"mask cache: another process is building {directory}; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    """Write atomically; return the file's SHA-256."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
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
) -> MaskCache:
    """Compute (or finish computing) the masks of every sample of ``dataset`` into
    ``directory`` and return the verified cache.

    ``fn(images, labels)`` follows the attention contract (B x 3 x H x W in [0, 1] on
    ``device`` -> bool or [0, 1] float B x 1 x H x W); it sees un-augmented images in
    index order. Chunks already recorded in ``meta.json`` with a matching SHA-256 are
    not recomputed; a stale temporary file of an interrupted write is discarded. Each
    chunk runs under its own seed (forked RNG, the caller's generators untouched).
    ``rebuild`` discards whatever the directory holds first; without it a directory
    holding a cache of another key is an error.
    """
    directory = Path(directory)
    device = torch.device(device)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    threshold = threshold or Threshold()
    method_name = method_name or str(key.get("method", {}).get("name", "attention"))
    if batch_size < 1 or chunk_size < 1:
        raise UserError(f"mask batch size {batch_size} / chunk size {chunk_size} is invalid; expected positive integers")
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory, log):
        if rebuild:
            _clear(directory)
        meta = read_meta(directory)
        if meta is not None:
            check_key(directory, meta["key"], key)
            if meta.get("complete"):
                return MaskCache.open(directory, key)
        for stale in directory.glob(".chunk_*.tmp*"):
            stale.unlink()
        n = len(dataset)
        if n == 0:
            raise UserError("cannot build a mask cache of an empty dataset")
        h, w = dataset.image_size
        if meta is None:
            meta = {"format": FORMAT, "key": _jsonable(key), "key_hash": key_hash(key), "n": n, "height": int(h),
                    "width": int(w), "storage": None, "chunk_size": int(chunk_size), "chunks": {}, "complete": False,
                    "build_seconds": 0.0, **_jsonable(dict(extra_meta or {}))}
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
                                               method_name, bar)
                meta["storage"] = storage
                name = _chunk_name(k)
                meta["chunks"][name] = {"sha256": _write_npy(directory / name, rows), "samples": [lo, hi]}
                meta["build_seconds"] = round(float(meta.get("build_seconds", 0.0)) + time.time() - t0, 3)
                atomic_write_text(directory / META, json.dumps(meta, indent=1, sort_keys=True))
        finally:
            bar.close()
        cache = MaskCache(directory, meta)
        meta["complete"] = True
        meta["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["bytes_per_sample"] = round(cache.bytes_per_sample, 2)
        meta["coverage"] = {"value": round(cache.coverage(threshold.policy, threshold.omega, threshold.quantile), 6),
                            "policy": threshold.policy, "omega": threshold.omega, "quantile": threshold.quantile}
        atomic_write_text(directory / META, json.dumps(meta, indent=1, sort_keys=True))
    return MaskCache.open(directory, key)


def _compute_chunk(fn, dataset, lo, hi, k, device, batch_size, num_workers, storage, method_name, bar):
    from dhat_seg.data.base import derive_seed

    loader = DataLoader(_Unaugmented(dataset, lo, hi), batch_size=batch_size, shuffle=False, num_workers=num_workers)
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
    return np.concatenate(parts, axis=0), storage


def _clear(directory: Path) -> None:
    for path in list(directory.glob("chunk_*.npy")) + list(directory.glob(".chunk_*.tmp*")) + [directory / META]:
        if path.exists():
            path.unlink()


# ---------------------------------------------------------------------------------
# Training data with masks
# ---------------------------------------------------------------------------------


class MaskedDataset(Dataset):
    """``(image, label, index, mask)``: each sample with its cached mask, both through
    the dataset's joint transform in one call (:class:`~dhat_seg.data.JointAugment`:
    the same random crop and flip), so that the mask marks the object pixels of the
    image it travels with. The transform draws the same random numbers with or without
    a mask, so the images equal those of the plain dataset under the same seeds.

    Args:
        dataset: an :class:`~dhat_seg.data.IndexedDataset` (its ``transform`` is used;
            the dataset itself is not modified).
        masks: the cache of this dataset (same size and fingerprint).
    """

    def __init__(self, dataset, masks: MaskCache):
        if len(dataset) != len(masks):
            raise UserError(f"mask cache {str(masks.directory)!r} holds {len(masks)} masks but the dataset has "
                            f"{len(dataset)} samples; {REBUILD_HINT}")
        fp = masks.key.get("dataset", {}).get("fingerprint")
        if hasattr(dataset, "fingerprint") and fp != dataset.fingerprint():
            raise UserError(f"mask cache {str(masks.directory)!r} describes other data (fingerprint {fp}, dataset "
                            f"{dataset.fingerprint()}); {REBUILD_HINT}")
        if (masks.height, masks.width) != tuple(dataset.image_size):
            raise UserError(f"mask cache {str(masks.directory)!r} holds {masks.height}x{masks.width} masks but the images are "
                            f"{dataset.image_size[0]}x{dataset.image_size[1]}; {REBUILD_HINT}")
        self.dataset, self.masks = dataset, masks
        self.transform = getattr(dataset, "transform", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        index = int(index)
        image, mask = self.dataset.load_image(index), self.masks[index]
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, int(self.dataset.labels[index]), index, mask


# ---------------------------------------------------------------------------------
# From a run configuration
# ---------------------------------------------------------------------------------


def dataset_for(cfg, split: str = "train"):
    """The un-augmented dataset of ``split`` that masks are built on."""
    return split_for(cfg, split)


def resolve_method(cfg) -> tuple[AttentionSpec, dict[str, Any]]:
    """The attention spec of ``cfg`` and its resolved options (as ``build_attention``)."""
    from dhat_seg.attention_model import resolve_attention_method

    return resolve_attention_method(cfg)


def classifier_weights(cfg, train_fingerprint: str, root: Path, log: Callable[[str], None], train: bool = True) -> Path | None:
    """The frozen attention model's weights file (trained now when missing and ``train``;
    None when missing and not ``train``)."""
    from dhat_seg.attention_model import attention_model_dir, ensure_attention_model
    from dhat_seg.checkpoint import resolve_weights

    if train or cfg.attention_model:
        return ensure_attention_model(cfg, train_fingerprint, root, log)
    run_dir = attention_model_dir(cfg, train_fingerprint, root)
    return resolve_weights(run_dir) if (run_dir / "summary.json").is_file() else None


def frozen_key(cfg, dataset, *, train_fingerprint: str, root: Path, log: Callable[[str], None],
               train_classifier: bool = True) -> tuple[dict[str, Any] | None, AttentionSpec, dict[str, Any], Path | None]:
    """(key, spec, options, classifier path) of ``cfg``'s frozen-attention cache of
    ``dataset``. The key is None when the method needs an attention model that does
    not exist yet and ``train_classifier`` is False."""
    spec, options = resolve_method(cfg)
    path = None
    if spec.needs_classifier(options):
        path = classifier_weights(cfg, train_fingerprint, root, log, train=train_classifier)
        if path is None:
            return None, spec, options, None
    sha = sha256_file(path) if path is not None else None
    memo = Path(root) / "masks"
    return mask_key(dataset, spec, options, classifier_sha256=sha, memo_dir=memo), spec, options, path


def ensure_mask_cache(
    cfg,
    dataset,
    *,
    device: torch.device,
    root: Path,
    log: Callable[[str], None],
    train_fingerprint: str | None = None,
    rebuild: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
    hint: str = REBUILD_HINT,
    chunk_size: int = CHUNK_SIZE,
) -> MaskCache:
    """Reuse, finish or build the frozen-attention mask cache of ``dataset`` for the
    attention settings of ``cfg``; says which in ``log``.

    ``train_fingerprint``: fingerprint of the training split, which keys the attention
    model (default: ``dataset``'s own, right when ``dataset`` is the training split).
    """
    from dhat_seg.attention_model import build_attention, frozen
    from dhat_seg.checkpoint import load_weights

    root = Path(root)
    train_fingerprint = train_fingerprint or dataset.fingerprint()
    key, spec, options, path = frozen_key(cfg, dataset, train_fingerprint=train_fingerprint, root=root, log=log)
    directory = cache_dir_for(root, key)
    meta = None if rebuild else read_meta(directory)
    if meta is not None and meta.get("complete"):
        cache = MaskCache.open(directory, key, hint=hint)
        log(f"mask cache: reusing {directory} ({len(cache)} masks)")
        return cache
    if meta is not None:
        check_key(directory, meta["key"], key, hint)
        done = sum(1 for r in meta.get("chunks", {}).values() if r)
        log(f"mask cache: resuming the interrupted build of {directory} ({done} chunks done)")
    else:
        log(f"mask cache: building {directory} ({len(dataset)} masks with {spec.name}; runs once, later runs reuse it)")
    classifier = frozen(load_weights(path), device) if path is not None else None
    attention = build_attention(cfg, train_fingerprint=train_fingerprint, num_classes=dataset.num_classes, device=device,
                                log=log, root=root, classifier=classifier)
    threshold = Threshold(cfg.threshold_policy, cfg.omega, cfg.quantile)
    extra = {"dataset_args": split_args(cfg, dataset.split), "attention_model": str(path) if path else None}
    return build_masks(attention, dataset, directory, key, device=device, batch_size=batch_size or cfg.batch_size,
                       chunk_size=chunk_size, num_workers=cfg.num_workers, threshold=threshold, rebuild=rebuild, log=log, progress=progress,
                       method_name=spec.name, extra_meta=extra)


def self_mask_cache(
    cfg,
    dataset,
    model: nn.Module,
    epoch: int,
    directory_root: Path,
    *,
    device: torch.device,
    log: Callable[[str], None],
    progress: bool = True,
) -> MaskCache:
    """Masks of ``dataset`` from the model being trained (``attention_source: self``),
    taken in eval mode at the start of ``epoch``; keyed by the SHA-256 of its state and
    the epoch, kept under ``directory_root`` (the run's ``masks/``). Reused when a
    complete cache of the same weights exists (a resumed run), else built."""
    from dhat_seg.attention_model import build_attention

    spec, options = resolve_method(cfg)
    if not spec.needs_classifier(options):
        raise UserError(f"attention_source='self' needs an attention method that reads a classifier (gradcam, ig, sam with "
                        f"prompt=peak); {spec.name!r} with these options does not: use attention_source='frozen'")
    key = mask_key(dataset, spec, options, classifier_sha256=sha256_state(model), source="self", weights_epoch=epoch)
    directory = Path(directory_root) / cache_name(key)
    meta = read_meta(directory)
    if meta is not None and meta.get("complete"):
        cache = MaskCache.open(directory, key)
        log(f"mask cache: reusing self-attention masks of epoch {epoch} from {directory} ({len(cache)} masks)")
        return cache
    log(f"mask cache: building self-attention masks of epoch {epoch} ({len(dataset)} masks with {spec.name} on the "
        f"model being trained) in {directory}")
    attention = build_attention(cfg, train_fingerprint=dataset.fingerprint(), num_classes=dataset.num_classes,
                                device=device, log=log, root=Path(directory_root), classifier=model)

    def fn(images, labels):
        with module_mode(model, training=False):
            return attention(images, labels)

    threshold = Threshold(cfg.threshold_policy, cfg.omega, cfg.quantile)
    return build_masks(fn, dataset, directory, key, device=device, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                       threshold=threshold, log=log, progress=progress, method_name=spec.name,
                       extra_meta={"dataset_args": split_args(cfg, dataset.split)})


def open_self_cache(directory_root: Path, dataset, cfg, weights_sha256: str, epoch: int) -> MaskCache | None:
    """The complete self-attention cache of given weights and epoch, or None when it is
    missing or damaged (a resumed run whose masks were deleted)."""
    spec, options = resolve_method(cfg)
    key = mask_key(dataset, spec, options, classifier_sha256=weights_sha256, source="self", weights_epoch=epoch)
    directory = Path(directory_root) / cache_name(key)
    try:
        return MaskCache.open(directory, key)
    except UserError:
        return None


def remove_other_caches(directory_root: Path, keep: Path) -> None:
    """Delete every cache directory under ``directory_root`` but ``keep`` (older
    self-attention refreshes of a run)."""
    for path in Path(directory_root).iterdir() if Path(directory_root).is_dir() else []:
        if path.is_dir() and path.resolve() != Path(keep).resolve() and (path / META).exists():
            shutil.rmtree(path, ignore_errors=True)


def list_caches(root: Path) -> list[Path]:
    """Cache directories under ``root/masks`` (complete or not)."""
    base = Path(root) / "masks"
    return sorted(p for p in base.iterdir() if (p / META).is_file()) if base.is_dir() else []
