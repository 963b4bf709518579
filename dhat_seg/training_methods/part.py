"""PART: Pixel-reweighted AdveRsarial Training (Zhang, Liu, Zhou, Zhang, Liu, ICML 2024).

Sources: the paper (``seeds/003``: section 3.1 eq. 3-4, section 3.2 "Pixel-AG" and "Burn-in
period", Appendix D Algorithms 1-3, section 4.1 "Defense settings", Appendix G; REFERENCE
section 2) and the official code (github.com/tmlr-group/PART: ``craft_ae.part_pgd``,
``utils.craft_weight_matrix`` / ``process_overlay`` / ``generate_weighted_eps``,
``loss/part_trades.py``, ``loss/part_mart.py``, ``train_eval_part*.py``).

The attack's budget differs per pixel. With M the important-pixel mask of the clean image
(the trainer's foreground mask, B x 1 x H x W, from any attention method) and
eps_low = ``part.eps_low`` / 255 (null: eps - 1/255, the paper's default):

    eps_i = eps if M_i else eps_low                      (paper: m_i = 1 or eps_low / eps, times eps)
    x_adv = argmax_{x'} l(f(x'), y)  s.t. |x'_i - x_i| <= eps_i for every pixel i, x' in [0, 1]^d   (eq. 3)

found by the base method's own attack with the element-wise projection
x' <- min(max(x' + alpha sign(grad), x - eps_i), x + eps_i), clipped to [0, 1]
(:func:`dhat_seg.attacks.pgd` / :func:`~dhat_seg.attacks.trades_kl_attack` with a per-pixel
radius; every pixel ends inside its own budget exactly, in floating point). The loss is the
base's on that x_adv (eq. 4; PART = AT's CE(f(x_adv), y), PART-T = TRADES', PART-M =
MART's, ``base: at | trades | mart``): nothing else changes. During the
``attention_burn_in`` epochs (paper: 20 of 80) the method is its base, unchanged
(:meth:`PART.warmup_loss`); masks then come from ``attention_source: self`` (the model being
trained, in eval mode) rebuilt every ``mask_refresh_every`` = s epochs (paper: s = 1 or 10).

Which pixels are important. The paper resizes the CAM L to the image, "scales" it to
w = [w_1 ... w_d] and marks w_i > 1 (section 3.2; Algorithm 1 writes the two cases the other
way round, a typo: the text, Figure 3 and the code keep eps on the important pixels). The
code's scaling is a standardisation, w = (L - mean) / std, so important = L > mean + std of
the image: ``threshold_policy: mean_std`` (:func:`dhat_seg.attention.foreground_mask`). The
class is the prediction (the code: ``output.argmax()``): ``attention_options: {target:
pred}`` for Grad-CAM. Any other attention method gives M as well (u2net, SAM, the oracle's
ground truth: rows no paper has).

Departures from the official code (dhat-seg's, deliberate):

* Masks are keyed by sample index and travel with their image through crop and flip (the
  mask cache). The code computes one CAM per image per batch of a shuffled loader, stores
  them by batch position, and looks them up by batch position in the next, reshuffled,
  epochs: each mask is applied to another image.
* The code's CAM is torchcam's Grad-CAM resized bicubically, squared and passed through
  matplotlib's jet colormap; the standardisation and w > 1 act on the three jet colour
  channels, so the budget differs per channel and low-CAM pixels (blue) are marked
  important in the blue channel. dhat-seg standardises the CAM itself (one budget per
  pixel, shared by its channels), as the paper describes.
* The code clamps eps only after the first step: its random start is U(-eps, eps) on every
  pixel and is not clipped to [0, 1]. dhat-seg starts inside each pixel's own budget and
  [0, 1] (U(-eps_i, eps_i) for AT and MART; TRADES' x + 0.001 N(0, 1), projected).
* The code's learning rate is divided by 10 only in its last epoch (its schedule counts
  epochs from 1 again after the burn-in and never calls the schedule during it); dhat-seg
  follows the paper (milestone 60 of 80, the trainer's MultiStepLR).
* PART-M's attack: the code starts from x + 0.001 N(0, 1) as MART's code; dhat-seg's MART
  starts uniformly (see :class:`~dhat_seg.training_methods.adversarial.MART`).
* Attack mode: eval, as the code (PART's registry default; ``attack_mode`` overrides it), the
  base's attack included; BatchNorm statistics follow ``attack_bn_update`` as for every method.
* The model is selected on the validation split (dhat-seg's rule); the code evaluates its
  last epoch.

Choices where the paper is silent: a bool mask, not a soft weight (the paper's m has two
values); one budget per pixel for all channels; the step size stays ``step_size`` on every
pixel; with the mask cache the mean + std is taken per batch over the map as cropped and
flipped with its image (the cache keeps soft maps as 8-bit values; crop padding counts as
0); ``fg_frac`` (the share of pixels at the full budget) is recorded per epoch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from dhat_seg.errors import UserError
from dhat_seg.training_methods.bases import build_base
from dhat_seg.training_methods.base import OnBase
from dhat_seg.training_methods.settings import MethodSettings

#: The losses PART reweights the attack of (``base``): PART, PART-T, PART-M.
PART_BASES = ("at", "trades", "mart")
#: The paper's eps_low = eps - 1/255 (section 3.2, "How to select eps_low"), units of 1/255.
PAPER_EPS_DROP = 1.0


@dataclass(frozen=True)
class PARTSettings(MethodSettings):
    """``part.eps_low``: the budget of the pixels the mask leaves out (units of 1/255; null = eps - 1,
    the paper's). PART's masks are the shared attention settings (see the module doc)."""

    eps_low: float | None = None

    def checks(self, cfg):
        return [(self.eps_low is None or 0 <= self.eps_low <= cfg.eps, "eps_low",
                 f"a number in [0, eps={cfg.eps:g}] (units of 1/255) or null (eps - 1)")]


def eps_low_of(cfg: Any) -> float:
    """eps_low in units of 1 (not 1/255): ``part.eps_low`` / 255, or (eps - 1) / 255 (at least 0)."""
    given = cfg.options("part").eps_low
    low = given if given is not None else max(0.0, cfg.eps - PAPER_EPS_DROP)
    return low / 255


def pixel_budget(important: Tensor, eps: float, eps_low: float) -> Tensor:
    """The per-pixel radius: ``eps`` where ``important`` (bool, B x 1 x H x W or B x C x H x W), else
    ``eps_low``; float32, the mask's shape and device."""
    if important.dtype != torch.bool:
        raise UserError(f"PART's important-pixel mask must be a bool tensor; got {important.dtype}")
    low = torch.full(important.shape, eps_low, dtype=torch.float32, device=important.device)
    return low.masked_fill_(important, eps)


class PART(OnBase):
    """The base's loss on x_adv made with PART's pixel-wise budget (see the module doc)."""

    needs_attention = True

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.base not in PART_BASES:
            raise UserError(f"base {cfg.base!r} is not available with method 'part'; expected one of {', '.join(PART_BASES)}")
        self.base = build_base(cfg)
        self.eps_low = eps_low_of(cfg)
        self._foreground: Tensor | None = None  # the batch's mask while the trainer's AWP block prepares x_adv

    # ------------------------------------------------------------------ attack and loss
    def budget(self, foreground: Tensor) -> Tensor:
        """eps on the important pixels, eps_low elsewhere (B x 1 x H x W)."""
        return pixel_budget(foreground, self.eps, self.eps_low)

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, foreground: Tensor | None = None) -> Tensor:
        """The base's attack (PGD on the CE for at and mart, TRADES' KL attack for trades) with the
        pixel-wise budget of ``foreground``; None: the base's own radius eps (the burn-in)."""
        if foreground is None:
            return self.base.adversarial(model, x, y)
        return self.base.adversarial(model, x, y, eps=self.budget(foreground))

    def prepare(self, model, x, y):
        return {"x_adv": self.adversarial(model, x, y, self._foreground)}

    @contextlib.contextmanager
    def weight_perturbation(self, model: nn.Module, x: Tensor, y: Tensor, foreground: Tensor | None, epoch: int, *,
                            warmup: bool = False, autocast: Callable[[], Any] = contextlib.nullcontext
                            ) -> Iterator[dict[str, Tensor] | None]:
        """AWP as every method's (:meth:`TrainingMethod.weight_perturbation`); x_adv is prepared
        with the batch's mask (none in the burn-in), which ``prepare`` does not receive."""
        self._foreground = None if warmup else foreground
        try:
            with super().weight_perturbation(model, x, y, foreground, epoch, warmup=warmup, autocast=autocast) as prepared:
                yield prepared
        finally:
            self._foreground = None

    def loss(self, model, x, y, foreground=None, prepared=None):
        if foreground is None:
            raise UserError("method 'part' needs foreground masks (its important pixels); pass --attention NAME")
        x_adv = self.adversarial(model, x, y, foreground) if prepared is None else prepared["x_adv"]
        loss, _, stats = self.base.base_loss(model, x, y, x_adv)
        return loss, {**stats, "fg_frac": foreground.float().mean()}

    def warmup_loss(self, model, x, y, prepared=None):
        """The burn-in: the base method, unchanged (radius eps on every pixel)."""
        x_adv = self.base.adversarial(model, x, y) if prepared is None else prepared["x_adv"]
        loss, _, stats = self.base.base_loss(model, x, y, x_adv)
        return loss, stats
