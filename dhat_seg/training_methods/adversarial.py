"""Adversarial training and the bases UIAT/DHAT compose with: PGD-AT, TRADES, MART (and clean training)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg import attacks, losses
from dhat_seg.training_methods.base import TrainingMethod, max_abs
from dhat_seg.training_methods.settings import MethodSettings


@dataclass(frozen=True)
class TradesSettings(MethodSettings):
    """``trades.beta``: the weight of KL(p_nat || p_adv); 6.0 = the authors' CIFAR-10 script (their
    ``trades_loss`` defaults to 1.0). Read by TRADES and by every method on ``base: trades``."""

    beta: float = 6.0

    def checks(self, cfg):
        return [(self.beta >= 0, "beta", "a non-negative number")]


@dataclass(frozen=True)
class MartSettings(MethodSettings):
    """``mart.beta``: the weight of MART's weighted KL; 6.0 = the authors' WRN-34-10 script (their
    ResNet-18 script uses 5.0). Read by MART and by every method on ``base: mart``."""

    beta: float = 6.0

    def checks(self, cfg):
        return [(self.beta >= 0, "beta", "a non-negative number")]


class Standard(TrainingMethod):
    """Clean training: CE(f(x), y)."""

    def loss(self, model, x, y, foreground=None, prepared=None):
        z = model(x)
        loss = F.cross_entropy(z, y)
        return loss, {"ce": loss.detach(), "max_logit_clean": max_abs(z)}


class MadryAT(TrainingMethod):
    """PGD adversarial training (Madry et al., ICLR 2018): CE(f(PGD(x)), y). Also the ``at`` base."""

    def prepare(self, model, x, y):
        return {"x_adv": self.adversarial(model, x, y)}

    def base_loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(loss, z_adv, stats) of the method given its x_adv; UIAT and DHAT add their terms to it."""
        z_adv = model(x_adv)
        loss = F.cross_entropy(z_adv, y)
        return loss, z_adv, {"ce_adv": loss.detach(), "max_logit_adv": max_abs(z_adv)}

    def loss(self, model, x, y, foreground=None, prepared=None):
        prepared = self.prepare(model, x, y) if prepared is None else prepared
        loss, _, stats = self.base_loss(model, x, y, prepared["x_adv"])
        return loss, stats


class TRADES(MadryAT):
    """TRADES (Zhang et al., ICML 2019): CE(f(x), y) + beta KL(p_nat || p_adv).

    x_adv maximises KL(p_nat || softmax f(x')) from x + 0.001 N(0, 1)
    (:func:`dhat_seg.attacks.trades_kl_attack`, ``attack_steps`` signed steps of
    ``step_size``, radius ``eps``). The KL is batchmean, as
    ``KLDivLoss(size_average=False)(log_softmax(f(x_adv)), softmax(f(x))) / batch_size``
    in the official code (yaodongyu/TRADES, trades.py). ``trades.beta`` = 6.0, the
    authors' CIFAR-10 training script (``trades_loss``'s own default is 1.0). The official
    loss forwards x twice; dhat-seg once (one BN update for x, one for x_adv).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.beta = cfg.options("trades").beta  # read once, not per step

    def adversarial(self, model, x, y, eps=None):
        with self.auxiliary(model):
            return attacks.trades_kl_attack(model, x, self.eps if eps is None else eps, self.alpha, self.cfg.attack_steps,
                                            mode=self.attack_mode, precision=self.cfg.attack_precision)

    def base_loss(self, model, x, y, x_adv):
        z_nat, z_adv = model(x), model(x_adv)
        ce = F.cross_entropy(z_nat, y)
        kl = losses.trades_regulariser(z_nat, z_adv)
        stats = {"ce": ce.detach(), "kl_adv": kl.detach(), "max_logit_clean": max_abs(z_nat), "max_logit_adv": max_abs(z_adv)}
        return ce + self.beta * kl, z_adv, stats


class MART(MadryAT):
    """MART (Wang et al., ICLR 2020): BCE(p_adv, y) + beta KL(p_nat || p_adv) (1 - p_nat[y]).

    x_adv from PGD on the CE, as AT (the official code starts from x + 0.001 N(0, 1);
    dhat-seg's PGD from a uniform start). Then, with p_adv = softmax f(x_adv),
    p_nat = softmax f(x) (:func:`dhat_seg.losses.mart_terms`): boosted CE =
    CE(f(x_adv), y) + NLL(log(1.0001 - p_adv + 1e-12), y') with y' the most probable wrong
    class; robust = (1/B) sum_b KL(p_nat || p_adv)_b (1.0000001 - p_nat,b[y_b]). Official
    code: YisenWang/MART, mart.py (``mart_loss``). ``mart.beta`` = 6.0, the authors'
    WRN-34-10 script (train_wideresnet.py); their ResNet-18 script uses 5.0.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.beta = cfg.options("mart").beta  # read once, not per step

    def base_loss(self, model, x, y, x_adv):
        z_nat, z_adv = model(x), model(x_adv)
        bce, robust = losses.mart_terms(z_nat, z_adv, y)
        stats = {"bce_adv": bce.detach(), "kl_weighted": robust.detach(), "max_logit_clean": max_abs(z_nat),
                 "max_logit_adv": max_abs(z_adv)}
        return bce + self.beta * robust, z_adv, stats
