"""Checkpoints: safetensors weights + a ``weights_only`` torch state, written atomically.

Layout of ``RUN/checkpoints/``::

    epoch_0007/model.safetensors   weights, with metadata (model, num_classes, mean, std)
    epoch_0007/train_model.safetensors  only for methods that evaluate other weights than they
                                        train (CFA's weight average): the trained weights, for resume
    epoch_0007/state.pt            optimiser, scheduler, epoch, best score (tensors + plain types)
    pointers.json                  {"last": "epoch_0007", "best": "epoch_0005", ...}

Each epoch directory is written under a temporary name and renamed into place, then
``pointers.json`` is replaced atomically: a run killed at any moment, or a write that
fails (full disk, read-only file system: a one-line
:class:`~dhat_seg.errors.WriteError`), leaves the previous consistent checkpoint.
Files are serialised in memory and written with an fsync before the rename, so the
bytes of a checkpoint depend only on its tensors (same run, same bytes). Nothing is
ever unpickled: state files are read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from dhat_seg.errors import UserError, write_error
from dhat_seg.models import Classifier, create_model

WEIGHTS = "model.safetensors"
TRAIN_WEIGHTS = "train_model.safetensors"
STATE = "state.pt"
POINTERS = "pointers.json"


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; what the block writes there replaces
    ``path`` in one step (after an fsync) when the block succeeds, and is removed when it
    fails (an OSError such as a full disk, re-raised naming ``path``): ``path`` holds the
    old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            exc.filename = str(path)  # the file meant, not its temporary name
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace ``path`` by ``data`` atomically (see :func:`replaced_atomically`)."""
    with replaced_atomically(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)


def atomic_write_text(path: Path, text: str) -> None:
    write_atomic(path, text)


def save_weights(model: Classifier, path: Path, model_name: str) -> None:
    """Weights of a registry model as safetensors, with what is needed to rebuild it
    (serialised in memory, written atomically: an OSError is a plain OSError)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    num_classes = _num_classes(model)
    meta = {
        "model": model_name,
        "num_classes": str(num_classes),
        "mean": json.dumps(model.mean.flatten().tolist()),
        "std": json.dumps(model.std.flatten().tolist()),
        "format": "dhat-seg/1",
    }
    write_atomic(path, _sorted_metadata(safetensors_bytes(state, metadata=meta)))


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors bytes with the metadata keys in sorted order: safetensors writes them
    in hash-map order, which changes from process to process (same weights, other bytes).
    The header keeps its length (same content), so the tensor data is not moved."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if not isinstance(header.get("__metadata__"), dict):
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps({"__metadata__": header.pop("__metadata__"), **header}, separators=(",", ":"),
                      ensure_ascii=False).encode()
    if len(text) > n:
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


def _num_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"checkpoint {str(path)!r} is corrupt or not a safetensors file: {exc}") from None


def load_weights(path: str | Path, model: nn.Module | None = None, expected_model: str | None = None) -> Classifier:
    """Load a weights file into ``model`` (or build the model its metadata names).

    Raises UserError for a missing file, a corrupt file, or weights of another
    architecture, naming the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; expected a {WEIGHTS} file or a run directory")
    meta = read_metadata(path)
    if model is None:
        if "model" not in meta:
            raise UserError(f"checkpoint {str(path)!r} has no dhat-seg metadata; expected a file written by dhat-seg")
        if expected_model and meta["model"] != expected_model:
            raise UserError(f"checkpoint {str(path)!r} holds model {meta['model']!r}; expected {expected_model!r}")
        model = create_model(meta["model"], int(meta["num_classes"]), json.loads(meta["mean"]), json.loads(meta["std"]))
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"checkpoint {str(path)!r} is corrupt: {exc}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        arch = meta.get("model", "unknown")
        detail = (missing or unexpected or wrong)[:3]
        raise UserError(
            f"checkpoint {str(path)!r} does not fit the model (it holds {arch!r} weights; "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped keys, e.g. {detail})"
        )
    model.load_state_dict(state)
    return model


def save_checkpoint(ckpt_dir: Path, epoch: int, model: Classifier, model_name: str, state: dict[str, Any], is_best: bool,
                    train_model: Classifier | None = None) -> None:
    """Write epoch ``epoch`` atomically and update the last/best pointers. ``model``: the
    weights to evaluate; ``train_model``: the trained weights when they differ (resume reads them).

    A write that fails (full disk, read-only file system) removes what it had written and
    raises a :class:`~dhat_seg.errors.WriteError`; the previous checkpoints and
    ``pointers.json`` are untouched."""
    name = f"epoch_{epoch:04d}"
    tmp = ckpt_dir / f".{name}.tmp"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_weights(model, tmp / WEIGHTS, model_name)
        if train_model is not None:
            save_weights(train_model, tmp / TRAIN_WEIGHTS, model_name)
        buffer = io.BytesIO()  # in memory first: torch.save reports a failed write as a RuntimeError
        torch.save(state, buffer)
        write_atomic(tmp / STATE, buffer.getvalue())
        final = ckpt_dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointers = read_pointers(ckpt_dir)
        pointers["last"] = name
        if is_best or "best" not in pointers:
            pointers["best"] = name
        write_atomic(ckpt_dir / POINTERS, json.dumps(pointers, indent=1))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        last = read_pointers(ckpt_dir).get("last") if (ckpt_dir / POINTERS).is_file() else None
        kept = (f"the previous checkpoint {str(ckpt_dir / last)!r} is intact and --resume continues from it (redoing "
                f"epoch {int(last[6:]) + 1})" if last else "no earlier checkpoint exists; --resume starts the run again")
        raise write_error(ckpt_dir / name, exc, f"{kept}; free space or choose a writable --out") from None
    keep = {pointers["last"], pointers["best"]}
    for old in ckpt_dir.glob("epoch_*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def read_pointers(ckpt_dir: Path) -> dict[str, str]:
    path = ckpt_dir / POINTERS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{str(path)!r} is corrupt; expected JSON with 'last' and 'best' checkpoint names") from None


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a weights-only file: never fall back to unpickling
        raise UserError(f"training state {str(path)!r} is corrupt or unsafe to load: {str(exc).splitlines()[0]}") from None


def resolve_weights(target: str | Path, which: str = "best") -> Path:
    """A run directory, a checkpoint directory or a weights file -> the weights file."""
    target = Path(target)
    if target.is_file():
        return target
    if not target.exists():
        raise UserError(f"path {str(target)!r} does not exist; expected a run directory, checkpoint directory or {WEIGHTS}")
    if (target / WEIGHTS).is_file():
        return target / WEIGHTS
    ckpt_dir = target / "checkpoints" if (target / "checkpoints").is_dir() else target
    pointers = read_pointers(ckpt_dir)
    if which not in pointers:
        raise UserError(f"{str(target)!r} holds no {which} checkpoint; expected a run directory written by `dhat-seg train`")
    return ckpt_dir / pointers[which] / WEIGHTS
