"""Reading a mask cache: :class:`MaskCache`, its metadata and chunks, and thresholding a batch.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from dhat_seg.attention import foreground_mask
from dhat_seg.errors import UserError
from dhat_seg.cache.key import sha256_file
from dhat_seg.cache.key import FORMAT, META, REBUILD_HINT, check_key

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



def batch_foreground(masks: Tensor, policy: str = "fixed", omega: float = 0.1, quantile: float = 0.5) -> Tensor:
    """Cached masks of a batch (bool, or uint8 soft maps) -> bool foreground B x 1 x H x W.

    Soft maps are de-quantised to value / 255 and thresholded by the policy
    (:func:`dhat_seg.attention.foreground_mask`, the paper's omega)."""
    if masks.dtype == torch.bool:
        return masks
    return foreground_mask(masks.float() / 255.0, policy, omega, quantile)



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
