"""Data, models and attention shared by tests/test_distributed.py and its torchrun workers."""

from __future__ import annotations

import torch
from torch import nn

from dhat_seg.attention import AttentionSpec
from dhat_seg.data import build_dataset

TEST_SPEC = AttentionSpec(name="test-noisy", description="brightness + noise", factory=lambda ctx: None, kind="image")


def tiny_data():
    """56 training images: 4 chunks of 16 (the last one short)."""
    return build_dataset("synthetic", "train", size=64, seed=0, val_size=8)


def noisy_attention(images, labels):
    """A soft map that draws from torch's generator: equal chunks need equal seeding."""
    return (images.mean(1, keepdim=True) * 0.5 + torch.rand_like(images[:, :1]) * 0.5).clamp(0, 1)


def tiny_linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))


def grad_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)
