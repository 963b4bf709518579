"""Where a run computes: the device, the training passes' autocast dtype and the number of
DataLoader workers (resolved once per run by the orchestration layer)."""

from __future__ import annotations

import os

import torch

from dhat_seg.errors import UserError


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
