"""Reproducible runs: seeding the global random number generators and deterministic kernels."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)



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
