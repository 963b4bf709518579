"""UIAT and DHAT: inverse adversarial alignment, and DHAT's debiased terms on top of a base."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dhat_seg import attacks, losses
from dhat_seg.errors import UserError
from dhat_seg.training_methods.bases import build_base
from dhat_seg.training_methods.base import OnBase, max_abs


def _loss_terms(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """A base's loss terms without its logit sizes (UIAT and DHAT record the clean and x_B logits)."""
    return {k: v for k, v in stats.items() if not k.startswith("max_logit")}


class UIAT(OnBase):
    """UIAT without momentum, the "-" row of DHAT Table 10: L_base + lambda1 KL(p_adv || p_inv).

    L_base = CE(z_adv, y) with ``base: at`` (UIAT itself); with ``trades``/``mart`` that
    method's loss, with its x_adv, from which x_inv is made.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.base = build_base(cfg)

    def inverse(self, model, x, y, x_adv) -> tuple[Tensor, Tensor]:
        """(x_inv, clean logits). p_nat and p_adv are fp32 targets of the inverse attack."""
        with self.auxiliary(model), torch.no_grad(), attacks.model_mode(model, self.attack_mode), \
                attacks.attack_precision(x, self.cfg.attack_precision):
            z_nat = model(x).float()
            p_nat, p_adv = F.softmax(z_nat, dim=1), F.softmax(model(x_adv).float(), dim=1)
            x_inv = attacks.inverse_adversarial(model, x, y, p_nat, p_adv, self.inv_eps, self.inv_alpha,
                                                self.cfg.inv_steps, mode=self.attack_mode,
                                                precision=self.cfg.attack_precision)
        return x_inv, z_nat

    def prepare(self, model, x, y):
        """x_adv (the base's attack), x_inv from it, and the clean logits the inverse attack read (for stats)."""
        x_adv = self.base.adversarial(model, x, y)
        x_inv, z_nat = self.inverse(model, x, y, x_adv)
        return {"x_adv": x_adv, "x_inv": x_inv, "z_nat": z_nat}

    def loss(self, model, x, y, foreground=None, prepared=None):
        p = self.prepare(model, x, y) if prepared is None else prepared
        base, z_adv, base_stats = self.base.base_loss(model, x, y, p["x_adv"])
        z_inv = model(p["x_inv"])
        reg = losses.uiat_regulariser(z_adv, z_inv)
        stats = {**_loss_terms(base_stats), "kl_inv": reg.detach(), "max_logit_clean": max_abs(p["z_nat"])}
        return base + self.cfg.lambda1 * reg, stats


class DHAT(UIAT):
    """DHAT (Zhang et al., ICCV 2025): L_base + lambda1 L_DHLR + lambda2 L_FLOE.

    L_base = CE(z_adv, y) with ``base: at`` (the paper); with ``trades``/``mart`` that
    method's loss with its own x_adv; x_inv is made from that x_adv and x_B from x_inv and
    the foreground, as with ``at``. Stats hold the base's terms, DHLR, FLOE and the
    foreground fraction.
    """

    needs_attention = True

    def loss(self, model, x, y, foreground=None, prepared=None):
        if foreground is None:
            raise UserError("method 'dhat' needs foreground masks; pass --attention NAME")
        p = self.prepare(model, x, y) if prepared is None else prepared
        x_background = losses.background_only(p["x_inv"], foreground)
        base, z_adv, base_stats = self.base.base_loss(model, x, y, p["x_adv"])
        z_inv = model(p["x_inv"])
        with self.auxiliary(model):
            z_background = model(x_background)
        dhlr = losses.dhlr_loss(z_adv, z_inv, z_background, form=self.cfg.dhlr_form)
        floe = losses.floe_loss(z_inv, z_background, form=self.cfg.floe_form, p=self.cfg.floe_p)
        loss = base + self.cfg.lambda1 * dhlr + self.cfg.lambda2 * floe
        stats = {**_loss_terms(base_stats), "dhlr": dhlr.detach(), "floe": floe.detach(),
                 "fg_frac": foreground.float().mean(), "max_logit_clean": max_abs(p["z_nat"]),
                 "max_logit_background": max_abs(z_background)}
        return loss, stats

    def warmup_loss(self, model, x, y, prepared=None):
        return UIAT.loss(self, model, x, y, None, prepared)


