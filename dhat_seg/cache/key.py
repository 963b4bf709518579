"""The key of a mask cache: what a cache was built with (see :mod:`dhat_seg.cache`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from dhat_seg.attention import AttentionSpec
from dhat_seg.run.checkpoint import atomic_write_text
from dhat_seg.errors import UserError

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
        memo[ident] = digest
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo_path, json.dumps(memo, indent=1))
        except OSError:
            pass  # only a memo (full disk, read-only cache): the file is hashed again next time
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



def check_key(directory: Path, stored: Mapping[str, Any], wanted: Mapping[str, Any], hint: str = REBUILD_HINT) -> None:
    """Raise a UserError naming the first difference when two keys differ."""
    diffs = key_differences(stored, wanted)
    if not diffs:
        return
    path, old, new = diffs[0]
    more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
    raise UserError(f"mask cache {str(directory)!r} was built for other settings: {_describe(path)} differs "
                    f"(cache: {_short(old)}, now: {_short(new)}){more}; it is never reused for other settings: {hint}")


