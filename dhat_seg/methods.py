"""Training methods: each turns a batch into a loss. A small registry, timm-style.

A method implements ``loss(model, x, y, foreground) -> (loss, stats)``; the trainer
owns the optimiser, devices and precision. Methods that need a foreground mask
declare ``needs_attention = True`` and receive a bool B x 1 x H x W mask of the
*clean* images (computed by the attention method, or read from the mask cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg import attacks, losses
from dhat_seg.config import TrainConfig
from dhat_seg.errors import UserError


class Method:
    needs_attention = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.eps, self.alpha = cfg.eps / 255, cfg.step_size / 255
        self.inv_eps, self.inv_alpha = cfg.inv_eps / 255, cfg.inv_step_size / 255

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return attacks.pgd(model, x, y, self.eps, self.alpha, self.cfg.attack_steps, mode=self.cfg.attack_mode)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, foreground: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError


class Standard(Method):
    """Clean training: CE(f(x), y)."""

    def loss(self, model, x, y, foreground=None):
        loss = F.cross_entropy(model(x), y)
        return loss, {"ce": loss.item()}


class MadryAT(Method):
    """PGD adversarial training (Madry et al. 2018): CE(f(PGD(x)), y)."""

    def loss(self, model, x, y, foreground=None):
        loss = F.cross_entropy(model(self.adversarial(model, x, y)), y)
        return loss, {"ce_adv": loss.item()}


class UIAT(Method):
    """UIAT without momentum, the "-" row of DHAT Table 10: CE(z_adv, y) + lambda1 KL(p_adv || p_inv)."""

    def inverse(self, model, x, y, x_adv):
        with torch.no_grad(), attacks.model_mode(model, self.cfg.attack_mode):
            p_nat = F.softmax(model(x), dim=1)
            p_adv = F.softmax(model(x_adv), dim=1)
        return attacks.inverse_adversarial(
            model, x, y, p_nat, p_adv, self.inv_eps, self.inv_alpha, self.cfg.inv_steps, mode=self.cfg.attack_mode
        )

    def loss(self, model, x, y, foreground=None):
        x_adv = self.adversarial(model, x, y)
        x_inv = self.inverse(model, x, y, x_adv)
        z_adv, z_inv = model(x_adv), model(x_inv)
        ce = F.cross_entropy(z_adv, y)
        reg = losses.uiat_regulariser(z_adv, z_inv)
        return ce + self.cfg.lambda1 * reg, {"ce_adv": ce.item(), "kl_inv": reg.item()}


class DHAT(UIAT):
    """DHAT (Zhang et al., ICCV 2025): CE(z_adv, y) + lambda1 L_DHLR + lambda2 L_FLOE."""

    needs_attention = True

    def loss(self, model, x, y, foreground=None):
        if foreground is None:
            raise UserError("method 'dhat' needs foreground masks; pass --attention NAME")
        x_adv = self.adversarial(model, x, y)
        x_inv = self.inverse(model, x, y, x_adv)
        x_background = losses.background_only(x_inv, foreground)
        z_adv, z_inv, z_background = model(x_adv), model(x_inv), model(x_background)
        ce = F.cross_entropy(z_adv, y)
        dhlr = losses.dhlr_loss(z_adv, z_inv, z_background, form=self.cfg.dhlr_form)
        floe = losses.floe_loss(z_inv, z_background, form=self.cfg.floe_form, p=self.cfg.floe_p)
        loss = ce + self.cfg.lambda1 * dhlr + self.cfg.lambda2 * floe
        stats = {"ce_adv": ce.item(), "dhlr": dhlr.item(), "floe": floe.item(), "fg_frac": foreground.float().mean().item()}
        return loss, stats


@dataclass(frozen=True)
class MethodEntry:
    name: str
    description: str
    cls: Callable[[TrainConfig], Method]


METHODS: dict[str, MethodEntry] = {
    e.name: e
    for e in (
        MethodEntry("standard", "clean training (also trains the Grad-CAM attention model)", Standard),
        MethodEntry("at", "PGD adversarial training (Madry et al. 2018)", MadryAT),
        MethodEntry("uiat", "UIAT: AT + inverse adversarial alignment; the '-' row of Table 10", UIAT),
        MethodEntry("dhat", "DHAT: AT + DHLR + FLOE with attention-based background extraction", DHAT),
    )
}


def create_method(cfg: TrainConfig) -> Method:
    if cfg.method not in METHODS:
        raise UserError(f"method {cfg.method!r} is unknown; expected one of {', '.join(METHODS)}")
    return METHODS[cfg.method].cls(cfg)
