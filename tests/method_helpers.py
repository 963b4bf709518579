"""Tiny models and a fixed batch for the training-method tests (hand computations of losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Tiny(nn.Module):
    """conv -> ReLU -> linear on 3 x 8 x 8 images, 4 classes; no BatchNorm (deterministic forwards)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


class TinyBN(Tiny):
    """Tiny with a BatchNorm layer (running statistics to watch)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def batch(n=6, seed=1):
    """(x, y, x_adv, x_inv, foreground) of ``n`` random 3 x 8 x 8 images: x_adv and x_inv
    small perturbations of x, the foreground a fixed rectangle."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x_adv = (x + (torch.rand(x.shape, generator=g) - 0.5) * 0.06).clamp(0, 1)
    x_inv = (x + (torch.rand(x.shape, generator=g) - 0.5) * 0.03).clamp(0, 1)
    fg = torch.zeros(n, 1, 8, 8, dtype=torch.bool)
    fg[:, :, 2:6, 1:7] = True
    return x, y, x_adv, x_inv, fg
