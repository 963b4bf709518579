"""FSR: Feature Separation and Recalibration (Kim, Cho, Jung, Yoon, CVPR 2023), the loss.

Sources: the paper (arXiv 2303.13846, Eqs. 3-5: L_sep, L_rec and the total loss), its
supplementary (``seeds/002``: Eq. (1) = L_sep, Table S5 on the choice of y', Fig. S1 on tau
and the lambdas; REFERENCE section 3) and the authors' code (github.com/wkim97/FSR,
``train.py``: ``get_pred`` and the loss), which fixes every formula below. The module
(separation, Gumbel-sigmoid mask, recalibration, auxiliary head) is
:mod:`dhat_seg.models.fsr_module`; it is part of the model (``<name>_fsr``), so every attack and
every evaluation goes through it.

With the base's x_adv and one training forward of it (the base's own), the auxiliary head
h's logits on the pooled robust part f+, non-robust part f- and recalibrated part f~- of
x_adv's last feature map give:

    L_sep = CE(h(f+), y) + CE(h(f-), y')         y' = the highest-scoring wrong class of f(x_adv)
    L_rec = CE(h(f~-), y)
    L     = L_base + fsr.lambda_sep L_sep + fsr.lambda_rec L_rec

lambdas 1 and 1 (paper; code defaults), CE batch means. y' is computed from the main
classifier's logits of x_adv, detached (the code's ``get_pred(adv_outputs, targets)``: the top
class, or the second when the top one is y). L_base is AT's CE(f(x_adv), y) (``base: at``,
the code's), or TRADES' or MART's loss (``base: trades | mart``; the paper reports these, the
code ships AT only): the FSR terms are always on x_adv's forward, the one the base's loss
reads, and the FSR module also sits in the base's clean forward.

Choices where the sources are silent or differ (dhat-seg's):

* x_adv: the base's own attack (PGD for at and mart, TRADES' KL attack for trades), run
  without Gumbel noise (:func:`~dhat_seg.models.fsr_module.deterministic_masks`), as the code's
  attack (``is_eval=True``); eval mode, as the code (FSR's registry default, the base's attack
  included; ``attack_mode`` overrides it); BN statistics follow ``attack_bn_update``.
* The training forwards (x_adv, and x for TRADES and MART) draw Gumbel noise; evaluation
  and test-time attacks run in eval mode, deterministic.
* tau (``fsr.tau``) is written into the model's FSR module at the start of training and
  saved with its weights, so ``dhat-seg eval`` rebuilds the same model.
* ``fsr.begin`` (default 0: the paper and the code, which add the terms from the first step)
  delays the terms to a later 0-based epoch; before it the loss is L_base (the module is in
  the model all along, its terms are logged with weight 0). Measured on the ``quick`` preset
  (small CNN, built-in data, 3000 samples, batches of 32): with the terms from the start the
  model never leaves chance in 6 epochs (CE(f(x_adv), y) 2.30 throughout, the features and
  logits shrink towards 0) while AT, and FSR with both lambdas 0, learn. The culprit is
  CE(h(f-), y'): while f is at chance, y' is nearly one class for every sample, the shared
  head is asked to read that class from f- and y from f+ (about f / 2 each at first), and
  shrinking f is the way out. Without that term, or with the terms from step 200 (about 2
  quick epochs), FSR trains (CE 0.79 at step 500 against 2.31).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from dhat_seg.errors import UserError
from dhat_seg.models.fsr_module import (FSROutputs, deterministic_masks, fsr_model_name, is_fsr_model, recording,
                                        require_fsr, set_tau)
from dhat_seg.training_methods.bases import build_base
from dhat_seg.training_methods.base import OnBase
from dhat_seg.training_methods.settings import MethodSettings

#: The losses FSR's terms are added to (``base``), as in the paper's tables.
FSR_BASES = ("at", "trades", "mart")


@dataclass(frozen=True)
class FSRSettings(MethodSettings):
    """FSR's settings (``--set fsr.KEY=VALUE``; see the module doc): the weights of the separation and
    recalibration terms, the Gumbel-sigmoid temperature, and the 0-based epoch the terms start."""

    lambda_sep: float = 1.0
    lambda_rec: float = 1.0
    tau: float = 0.1
    begin: int = 0

    def checks(self, cfg):
        return [(self.lambda_sep >= 0, "lambda_sep", "a non-negative number"),
                (self.lambda_rec >= 0, "lambda_rec", "a non-negative number"),
                (self.tau > 0, "tau", "a positive number (the Gumbel-sigmoid temperature)"),
                (self.begin >= 0, "begin", "a non-negative integer (0-based epoch)")]


def check_config(cfg) -> None:
    """Method fsr needs a model with the FSR module (``<name>_fsr``) and one of :data:`FSR_BASES`."""
    if not is_fsr_model(cfg.model):
        raise UserError(f"model {cfg.model!r} has no FSR module, which method 'fsr' trains; expected "
                        f"model={fsr_model_name(cfg.model)!r} (any model name + '_fsr')")
    if cfg.base not in FSR_BASES:
        raise UserError(f"base {cfg.base!r} is not available with method 'fsr'; expected one of {', '.join(FSR_BASES)}")


def highest_wrong_class(logits: Tensor, y: Tensor) -> Tensor:
    """y': per row, the class of largest logit other than y (no gradient)."""
    z = logits.detach().float().clone()
    z.scatter_(1, y[:, None], float("-inf"))
    return z.argmax(dim=1)


def fsr_terms(out: FSROutputs, y: Tensor, y_wrong: Tensor) -> dict[str, Tensor]:
    """The three cross-entropies of FSR (fp32, batch means): ``robust`` CE(h(f+), y),
    ``non_robust`` CE(h(f-), y'), ``recalibrated`` CE(h(f~-), y)."""
    return {"robust": F.cross_entropy(out.robust.float(), y),
            "non_robust": F.cross_entropy(out.non_robust.float(), y_wrong),
            "recalibrated": F.cross_entropy(out.recalibrated.float(), y)}


def fsr_loss(base: Tensor, out: FSROutputs, y: Tensor, lambda_sep: float, lambda_rec: float
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """L_base + lambda_sep (CE(h(f+), y) + CE(h(f-), y')) + lambda_rec CE(h(f~-), y), y' from ``out.logits``."""
    terms = fsr_terms(out, y, highest_wrong_class(out.logits, y))
    sep = terms["robust"] + terms["non_robust"]
    loss = base + lambda_sep * sep + lambda_rec * terms["recalibrated"]
    stats = {"fsr_sep": sep.detach(), "fsr_sep_robust": terms["robust"].detach(),
             "fsr_sep_non_robust": terms["non_robust"].detach(), "fsr_rec": terms["recalibrated"].detach(),
             "fsr_mask": out.mask_mean}
    return loss, stats


def _forward_of(outputs: list[FSROutputs], logits: Tensor) -> FSROutputs:
    """The recorded forward whose logits the base returned as z_adv."""
    for out in outputs:
        if out.logits is logits:
            return out
    raise UserError("method fsr could not find the forward of x_adv among the model's FSR forwards; expected the "
                    "base's base_loss to return the logits of its own x_adv forward")


class FSR(OnBase):
    """L_base + FSR's separation and recalibration terms on x_adv (see the module doc)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.base not in FSR_BASES:
            raise UserError(f"base {cfg.base!r} is not available with method 'fsr'; expected one of {', '.join(FSR_BASES)}")
        self.base = build_base(cfg)
        self.settings: FSRSettings = cfg.options("fsr")
        self._epoch = 0

    def active(self) -> bool:
        """Whether the current epoch adds FSR's terms (from 0-based epoch ``fsr.begin``)."""
        return self._epoch >= self.settings.begin

    # the other trainer hooks go to the base (OnBase)
    def on_fit_start(self, model, state):
        require_fsr(model)
        set_tau(model, self.settings.tau)
        super().on_fit_start(model, state)

    def on_epoch_start(self, model, epoch):
        self._epoch = epoch
        super().on_epoch_start(model, epoch)

    def adversarial(self, model, x, y):
        """The base's x_adv, made without Gumbel noise."""
        with deterministic_masks(model):
            return self.base.adversarial(model, x, y)

    def prepare(self, model, x, y):
        return {"x_adv": self.adversarial(model, x, y)}

    def loss(self, model, x, y, foreground=None, prepared=None):
        p = self.prepare(model, x, y) if prepared is None else prepared
        with recording(model) as outputs:
            base, z_adv, base_stats = self.base.base_loss(model, x, y, p["x_adv"])
        on = self.active()  # before fsr_begin: the terms are computed and logged, with weight 0
        loss, stats = fsr_loss(base, _forward_of(outputs, z_adv), y, self.settings.lambda_sep if on else 0.0,
                               self.settings.lambda_rec if on else 0.0)
        return loss, {**base_stats, **stats}

