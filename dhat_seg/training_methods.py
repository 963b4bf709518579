"""Training methods: each turns a batch into a loss. A small registry, timm-style.

A method implements ``loss(model, x, y, foreground) -> (loss, stats)``; the trainer
owns the optimiser, devices and precision. Methods that need a foreground mask
declare ``needs_attention = True`` and receive a bool B x 1 x H x W mask of the
*clean* images (computed by the attention method, or read from the mask cache).

Two rules every method follows, so that methods compare fairly:

* Attacks run in fp32 (``attacks.attack_precision``), also inside the trainer's
  autocast region, unless the config opts in with ``attack_precision: autocast``.
* Auxiliary forwards (every attack step, the clean/adversarial probabilities the
  inverse attack aims at, DHAT's background-only x_B) leave BatchNorm running
  statistics alone unless ``attack_bn_update`` is true (the authors' code, where every
  train-mode forward updates them). Only the forwards of the training inputs that the
  method's loss is about (clean for standard, x_adv for AT, x_adv and x_inv for
  UIAT/DHAT) update them, so UIAT and DHAT rows differ in their loss alone.

``stats`` holds detached 0-dim tensors (read by the trainer once per batch), among them
``max_logit_*``: the largest |logit| of a forward, the trainer's divergence signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg import attacks, losses
from dhat_seg.errors import UserError
from dhat_seg.models import frozen_bn_statistics


def max_abs(logits: Tensor) -> Tensor:
    """Largest |logit| of a batch, detached, in fp32 (a divergence signal)."""
    return logits.detach().abs().max().float()


class TrainingMethod:
    """Base class. ``cfg`` is the run's :class:`dhat_seg.config.TrainConfig`."""

    needs_attention = False

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.eps, self.alpha = cfg.eps / 255, cfg.step_size / 255
        self.inv_eps, self.inv_alpha = cfg.inv_eps / 255, cfg.inv_step_size / 255

    def auxiliary(self, model: nn.Module):
        """Context for forwards that must not update BN running statistics (see module doc)."""
        return frozen_bn_statistics(model, frozen=not self.cfg.attack_bn_update)

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with self.auxiliary(model):
            return attacks.pgd(model, x, y, self.eps, self.alpha, self.cfg.attack_steps, mode=self.cfg.attack_mode,
                               precision=self.cfg.attack_precision)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, foreground: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def warmup_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss during ``attention_burn_in`` epochs (no masks yet): the method without its attention terms."""
        return self.loss(model, x, y, None)


class Standard(TrainingMethod):
    """Clean training: CE(f(x), y)."""

    def loss(self, model, x, y, foreground=None):
        z = model(x)
        loss = F.cross_entropy(z, y)
        return loss, {"ce": loss.detach(), "max_logit_clean": max_abs(z)}


class MadryAT(TrainingMethod):
    """PGD adversarial training (Madry et al. 2018): CE(f(PGD(x)), y)."""

    def loss(self, model, x, y, foreground=None):
        z_adv = model(self.adversarial(model, x, y))
        loss = F.cross_entropy(z_adv, y)
        return loss, {"ce_adv": loss.detach(), "max_logit_adv": max_abs(z_adv)}


class UIAT(TrainingMethod):
    """UIAT without momentum, the "-" row of DHAT Table 10: CE(z_adv, y) + lambda1 KL(p_adv || p_inv)."""

    def inverse(self, model, x, y, x_adv) -> tuple[Tensor, Tensor]:
        """(x_inv, clean logits). p_nat and p_adv are fp32 targets of the inverse attack."""
        with self.auxiliary(model), torch.no_grad(), attacks.model_mode(model, self.cfg.attack_mode), \
                attacks.attack_precision(x, self.cfg.attack_precision):
            z_nat = model(x).float()
            p_nat, p_adv = F.softmax(z_nat, dim=1), F.softmax(model(x_adv).float(), dim=1)
            x_inv = attacks.inverse_adversarial(model, x, y, p_nat, p_adv, self.inv_eps, self.inv_alpha,
                                                self.cfg.inv_steps, mode=self.cfg.attack_mode,
                                                precision=self.cfg.attack_precision)
        return x_inv, z_nat

    def loss(self, model, x, y, foreground=None):
        x_adv = self.adversarial(model, x, y)
        x_inv, z_nat = self.inverse(model, x, y, x_adv)
        z_adv, z_inv = model(x_adv), model(x_inv)
        ce = F.cross_entropy(z_adv, y)
        reg = losses.uiat_regulariser(z_adv, z_inv)
        stats = {"ce_adv": ce.detach(), "kl_inv": reg.detach(), "max_logit_clean": max_abs(z_nat)}
        return ce + self.cfg.lambda1 * reg, stats


class DHAT(UIAT):
    """DHAT (Zhang et al., ICCV 2025): CE(z_adv, y) + lambda1 L_DHLR + lambda2 L_FLOE."""

    needs_attention = True

    def loss(self, model, x, y, foreground=None):
        if foreground is None:
            raise UserError("method 'dhat' needs foreground masks; pass --attention NAME")
        x_adv = self.adversarial(model, x, y)
        x_inv, z_nat = self.inverse(model, x, y, x_adv)
        x_background = losses.background_only(x_inv, foreground)
        z_adv, z_inv = model(x_adv), model(x_inv)
        with self.auxiliary(model):
            z_background = model(x_background)
        ce = F.cross_entropy(z_adv, y)
        dhlr = losses.dhlr_loss(z_adv, z_inv, z_background, form=self.cfg.dhlr_form)
        floe = losses.floe_loss(z_inv, z_background, form=self.cfg.floe_form, p=self.cfg.floe_p)
        loss = ce + self.cfg.lambda1 * dhlr + self.cfg.lambda2 * floe
        stats = {"ce_adv": ce.detach(), "dhlr": dhlr.detach(), "floe": floe.detach(),
                 "fg_frac": foreground.float().mean(), "max_logit_clean": max_abs(z_nat),
                 "max_logit_background": max_abs(z_background)}
        return loss, stats

    def warmup_loss(self, model, x, y):
        return UIAT.loss(self, model, x, y, None)


@dataclass(frozen=True)
class TrainingMethodEntry:
    name: str
    description: str
    cls: Callable[[Any], TrainingMethod]


TRAINING_METHODS: dict[str, TrainingMethodEntry] = {
    e.name: e
    for e in (
        TrainingMethodEntry("standard", "clean training (also trains the Grad-CAM attention model)", Standard),
        TrainingMethodEntry("at", "PGD adversarial training (Madry et al. 2018)", MadryAT),
        TrainingMethodEntry("uiat", "UIAT: AT + inverse adversarial alignment; the '-' row of Table 10", UIAT),
        TrainingMethodEntry("dhat", "DHAT: AT + DHLR + FLOE with attention-based background extraction", DHAT),
    )
}


def create_training_method(cfg: Any) -> TrainingMethod:
    if cfg.method not in TRAINING_METHODS:
        raise UserError(f"training method {cfg.method!r} is unknown; expected one of {', '.join(TRAINING_METHODS)}")
    return TRAINING_METHODS[cfg.method].cls(cfg)
