"""Training methods: each turns a batch into a loss. A small registry, timm-style.

A method implements ``prepare(model, x, y) -> prepared`` (its adversarial inputs, made on
the current weights) and ``loss(model, x, y, foreground, prepared=None) -> (loss, stats)``
(``prepared`` None: made now); the trainer owns the optimiser, devices and precision.
Methods that need a foreground mask declare ``needs_attention = True`` and receive a bool
B x 1 x H x W mask of the *clean* images (computed by the attention method, or read from
the mask cache).

Composition:

* **base** (``base: at | trades | mart``, read by UIAT and DHAT): the loss that UIAT's
  and DHAT's terms are added to, with that method's own x_adv, from which x_inv (and
  DHAT's x_B) are made. A base method exposes ``adversarial`` (its attack) and
  ``base_loss(model, x, y, x_adv) -> (loss, z_adv, stats)``, used standalone and by UIAT/DHAT.
* **AWP** (``awp: true``, any method): :meth:`TrainingMethod.weight_perturbation`, a
  context the trainer enters around loss and backward (:mod:`dhat_seg.awp`).

Two rules every method follows, so that methods compare fairly:

* Attacks run in fp32 (``attacks.attack_precision``), also inside the trainer's
  autocast region, unless the config opts in with ``attack_precision: autocast``.
* Auxiliary forwards (every attack step, the clean/adversarial probabilities the
  inverse attack aims at, DHAT's background-only x_B) leave BatchNorm running
  statistics alone unless ``attack_bn_update`` is true (the authors' code, where every
  train-mode forward updates them). Only the forwards of the training inputs that the
  method's loss is about (clean for standard, x_adv for AT, x and x_adv for TRADES and
  MART, plus x_inv for UIAT/DHAT) update them, so UIAT and DHAT rows differ in their
  loss alone.

``stats`` holds detached 0-dim tensors (read by the trainer once per batch), among them
``max_logit_*``: the largest |logit| of a forward, the trainer's divergence signal.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg import attacks, losses
from dhat_seg.awp import AdversarialWeightPerturbation
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
        self._awp: AdversarialWeightPerturbation | None = None

    def auxiliary(self, model: nn.Module):
        """Context for forwards that must not update BN running statistics (see module doc)."""
        return frozen_bn_statistics(model, frozen=not self.cfg.attack_bn_update)

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """x_adv: PGD on the CE (Madry et al.), under :meth:`auxiliary`, in ``attack_mode``, fp32."""
        with self.auxiliary(model):
            return attacks.pgd(model, x, y, self.eps, self.alpha, self.cfg.attack_steps, mode=self.cfg.attack_mode,
                               precision=self.cfg.attack_precision)

    def prepare(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """What the loss needs that is made without weight gradients (adversarial inputs), on the current weights."""
        return {}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, foreground: Tensor | None,
             prepared: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def warmup_loss(self, model: nn.Module, x: Tensor, y: Tensor,
                    prepared: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss during ``attention_burn_in`` epochs (no masks yet): the method without its attention terms."""
        return self.loss(model, x, y, None, prepared)

    @contextlib.contextmanager
    def weight_perturbation(self, model: nn.Module, x: Tensor, y: Tensor, foreground: Tensor | None, epoch: int, *,
                            warmup: bool = False, autocast: Callable[[], Any] = contextlib.nullcontext
                            ) -> Iterator[dict[str, Tensor] | None]:
        """AWP around the training step: enter it before the loss, leave it after the backward pass.

        A no-op yielding None unless ``awp`` is on, ``awp_gamma`` > 0 and ``epoch`` (0-based)
        >= ``awp_warmup``. Then: the method's inputs are prepared on the current weights w
        and yielded (pass them to :meth:`loss` / :meth:`warmup_loss`, so the attack runs
        once, on w, as in the official code); a proxy takes one step on the negative loss
        of the same method (:meth:`warmup_loss` when ``warmup``); the model's weights are
        w + v inside the block and exactly w after it. ``autocast``: the context of the
        training forwards (the proxy's loss runs in it, as the model's does).
        """
        c = self.cfg
        if not (c.awp and c.awp_gamma > 0 and epoch >= c.awp_warmup):
            yield None
            return
        with autocast():
            prepared = self.prepare(model, x, y)

        def proxy_loss(proxy: nn.Module) -> Tensor:
            with autocast():
                out = self.warmup_loss(proxy, x, y, prepared) if warmup else self.loss(proxy, x, y, foreground, prepared)
            return out[0]

        if self._awp is None:
            self._awp = AdversarialWeightPerturbation(c.awp_gamma)
        with self._awp.perturbed(model, proxy_loss):
            yield prepared


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
    in the official code (yaodongyu/TRADES, trades.py). ``trades_beta`` = 6.0, the
    authors' CIFAR-10 training script (``trades_loss``'s own default is 1.0). The official
    loss forwards x twice; dhat-seg once (one BN update for x, one for x_adv).
    """

    def adversarial(self, model, x, y):
        with self.auxiliary(model):
            return attacks.trades_kl_attack(model, x, self.eps, self.alpha, self.cfg.attack_steps,
                                            mode=self.cfg.attack_mode, precision=self.cfg.attack_precision)

    def base_loss(self, model, x, y, x_adv):
        z_nat, z_adv = model(x), model(x_adv)
        ce = F.cross_entropy(z_nat, y)
        kl = losses.trades_regulariser(z_nat, z_adv)
        stats = {"ce": ce.detach(), "kl_adv": kl.detach(), "max_logit_clean": max_abs(z_nat), "max_logit_adv": max_abs(z_adv)}
        return ce + self.cfg.trades_beta * kl, z_adv, stats


class MART(MadryAT):
    """MART (Wang et al., ICLR 2020): BCE(p_adv, y) + beta KL(p_nat || p_adv) (1 - p_nat[y]).

    x_adv from PGD on the CE, as AT (the official code starts from x + 0.001 N(0, 1);
    dhat-seg's PGD from a uniform start). Then, with p_adv = softmax f(x_adv),
    p_nat = softmax f(x) (:func:`dhat_seg.losses.mart_terms`): boosted CE =
    CE(f(x_adv), y) + NLL(log(1.0001 - p_adv + 1e-12), y') with y' the most probable wrong
    class; robust = (1/B) sum_b KL(p_nat || p_adv)_b (1.0000001 - p_nat,b[y_b]). Official
    code: YisenWang/MART, mart.py (``mart_loss``). ``mart_beta`` = 6.0, the authors'
    WRN-34-10 script (train_wideresnet.py); their ResNet-18 script uses 5.0.
    """

    def base_loss(self, model, x, y, x_adv):
        z_nat, z_adv = model(x), model(x_adv)
        bce, robust = losses.mart_terms(z_nat, z_adv, y)
        stats = {"bce_adv": bce.detach(), "kl_weighted": robust.detach(), "max_logit_clean": max_abs(z_nat),
                 "max_logit_adv": max_abs(z_adv)}
        return bce + self.cfg.mart_beta * robust, z_adv, stats


#: The methods UIAT and DHAT can add their terms to (config ``base``).
BASE_METHODS: dict[str, Callable[[Any], MadryAT]] = {"at": MadryAT, "trades": TRADES, "mart": MART}


def _loss_terms(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """A base's loss terms without its logit sizes (UIAT and DHAT record the clean and x_B logits)."""
    return {k: v for k, v in stats.items() if not k.startswith("max_logit")}


class UIAT(TrainingMethod):
    """UIAT without momentum, the "-" row of DHAT Table 10: L_base + lambda1 KL(p_adv || p_inv).

    L_base = CE(z_adv, y) with ``base: at`` (UIAT itself); with ``trades``/``mart`` that
    method's loss, with its x_adv, from which x_inv is made.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.base = BASE_METHODS[cfg.base](cfg)

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
        TrainingMethodEntry("uiat", "UIAT: base (at, or --set base=trades|mart) + inverse adversarial alignment; "
                                    "the '-' row of Table 10", UIAT),
        TrainingMethodEntry("dhat", "DHAT: base (at, or --set base=trades|mart) + DHLR + FLOE with attention-based "
                                    "background extraction", DHAT),
        TrainingMethodEntry("trades", "TRADES (Zhang et al. 2019): CE(x) + trades_beta KL(p_nat || p_adv)", TRADES),
        TrainingMethodEntry("mart", "MART (Wang et al. 2020): boosted CE + mart_beta weighted KL", MART),
    )
}
#: every method takes ``--set awp=true`` (adversarial weight perturbation, :mod:`dhat_seg.awp`)


def create_training_method(cfg: Any) -> TrainingMethod:
    if cfg.method not in TRAINING_METHODS:
        raise UserError(f"training method {cfg.method!r} is unknown; expected one of {', '.join(TRAINING_METHODS)}")
    return TRAINING_METHODS[cfg.method].cls(cfg)
