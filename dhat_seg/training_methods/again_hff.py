"""AGAIN's hybrid feature fusion (HFF), shared by both forms of AGAIN (``again.hff``): the
official code's definition (InsLin/AGAIN, ``AGAIN_with_AWP/models/wideresnet_AGAIN_woHFF.py``:
``func1``, ``calc_mean_std``, ``adain``, ``HFF``; defined there, never called) applied to the
first stage's output with a permuted batch as the style. The formulas and dhat-seg's choices
are in :mod:`dhat_seg.training_methods.again` ("HFF")."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from dhat_seg.errors import UserError
from dhat_seg.models.feature_split import first_stage

#: Added to the variance before the square root (the official ``calc_mean_std``'s eps).
HFF_EPS = 1e-5


def channel_statistics(f: Tensor, eps: float = HFF_EPS) -> tuple[Tensor, Tensor]:
    """(mu, sigma) of a B x C x H x W map per sample and channel over H x W, B x C x 1 x 1:
    sigma = sqrt(unbiased variance + eps), the official ``calc_mean_std``."""
    mu = f.mean(dim=(2, 3), keepdim=True)
    return mu, (f.var(dim=(2, 3), keepdim=True, unbiased=True) + eps).sqrt()


def adain(content: Tensor, style: Tensor, eps: float = HFF_EPS) -> Tensor:
    """(content - mu_c) / sigma_c sigma_s + mu_s (AdaIN, the official ``adain``)."""
    mu_c, sigma_c = channel_statistics(content, eps)
    mu_s, sigma_s = channel_statistics(style, eps)
    return (content - mu_c) / sigma_c * sigma_s + mu_s


def simplex_weights(generator: torch.Generator | None = None) -> Tensor:
    """Four weights uniform on the simplex: the spacings of 3 sorted U(0, 1) draws (the official ``func1(1, 4)``)."""
    cuts = torch.rand(3, generator=generator).sort().values
    return torch.diff(torch.cat([torch.zeros(1), cuts, torch.ones(1)]))


def hybrid_feature_fusion(content: Tensor, style: Tensor, lam: Tensor, eps: float = HFF_EPS) -> Tensor:
    """The official ``HFF(content, style)``: content normalised by its own statistics, rescaled to the
    lam-weighted mix of the statistics of content, style, AdaIN(content, style) and AdaIN(style,
    content) (see the module doc). ``lam``: 4 weights; computed in fp32, output in content's dtype."""
    if content.dim() != 4 or content.shape != style.shape:
        raise UserError(f"HFF needs two B x C x H x W feature maps of one shape; got {tuple(content.shape)} and "
                        f"{tuple(style.shape)}")
    c, s = content.float(), style.float()
    lam = lam.to(device=c.device, dtype=c.dtype)
    stats = [channel_statistics(t, eps) for t in (c, s, adain(c, s, eps), adain(s, c, eps))]
    mu_mix = sum(w * mu for w, (mu, _) in zip(lam, stats))
    sigma_mix = sum(w * sigma for w, (_, sigma) in zip(lam, stats))
    mu_c, sigma_c = stats[0]
    return ((c - mu_c) / sigma_c * sigma_mix + mu_mix).to(content.dtype)


@contextlib.contextmanager
def fused_first_stage(model: nn.Module) -> Iterator[nn.Module]:
    """Forwards of ``model`` in the block pass the first stage's output f through HFF with style
    f[perm], a fresh permutation and simplex weights per forward (global CPU generator)."""

    def hook(module, inputs, output):
        perm = torch.randperm(output.shape[0]).to(output.device)
        return hybrid_feature_fusion(output, output[perm], simplex_weights())

    handle = first_stage(model, "AGAIN's HFF").register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def hff_on(cfg) -> bool:
    """Whether a run uses HFF: ``again.hff``, or (null) the form's default: on for paper, off for code."""
    return cfg.options("again").hff_on
