"""Where and how a run computes: device selection, the training passes' autocast dtype,
and seeding the global random number generators."""

from __future__ import annotations

import random

import numpy as np
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


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
