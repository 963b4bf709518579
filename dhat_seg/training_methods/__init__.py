"""Training methods: each turns a batch into a loss. A small registry, timm-style.

A method implements ``prepare(model, x, y) -> prepared`` (its adversarial inputs, made on
the current weights) and ``loss(model, x, y, foreground, prepared=None) -> (loss, stats)``
(``prepared`` None: made now); the trainer owns the optimiser, devices and precision.
Methods that need a foreground mask declare ``needs_attention = True`` and receive a bool
B x 1 x H x W mask of the *clean* images (computed by the attention method, or read from
the mask cache).

Composition:

* **base** (``base: at | trades | mart | cfa | sglr``, read by UIAT and DHAT): the loss that UIAT's
  and DHAT's terms are added to, with that method's own x_adv, from which x_inv (and
  DHAT's x_B) are made. A base method exposes ``adversarial`` (its attack) and
  ``base_loss(model, x, y, x_adv) -> (loss, z_adv, stats)``, used standalone and by UIAT/DHAT;
  a base with state (CFA's calibration and weight average) keeps it through the trainer
  hooks, which UIAT and DHAT pass on (``base: cfa`` = DHAT-CFA). FSR reads ``base`` too
  (``at | trades | mart``) and adds its terms to that loss (:mod:`.fsr`). PART reads it too
  (``at | trades | mart``: PART, PART-T, PART-M) and makes that base's x_adv with a
  per-pixel budget from the foreground mask (:mod:`.part`). AGAIN (:mod:`.again`) is AT whose
  batches switch, with a probability growing over training, to its own loss on AT's x_adv;
  ``again_form: code`` builds the released form instead (:mod:`.again_code`).
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

from dataclasses import dataclass
from typing import Any, Callable

from dhat_seg import losses  # noqa: F401  (re-exported: tests patch losses through this module)
from dhat_seg.errors import UserError
from dhat_seg.training_methods.adversarial import MART, TRADES, MadryAT, Standard
from dhat_seg.training_methods.again import AGAIN, FAKE_LABELS as AGAIN_FAKE_LABELS, FORMS as AGAIN_FORMS
from dhat_seg.training_methods.bases import BASE_METHODS
from dhat_seg.training_methods.base import TrainingMethod, max_abs
from dhat_seg.training_methods.cfa import CFA
from dhat_seg.training_methods.fsr import FSR
from dhat_seg.training_methods.inverse import DHAT, UIAT
from dhat_seg.training_methods.part import PART
from dhat_seg.training_methods.sglr import SGLR

__all__ = ["AGAIN", "AGAIN_FAKE_LABELS", "AGAIN_FORMS", "BASE_METHODS", "CFA", "DHAT", "FSR", "MART", "TRADES", "TRAINING_METHODS", "MadryAT", "PART", "SGLR", "Standard",
           "TrainingMethod", "TrainingMethodEntry", "UIAT", "create_training_method", "max_abs"]


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
        TrainingMethodEntry("uiat", "UIAT: base (at, or --set base=trades|mart|cfa|sglr) + inverse adversarial alignment; "
                                    "the '-' row of Table 10", UIAT),
        TrainingMethodEntry("dhat", "DHAT: base (at, or --set base=trades|mart|cfa|sglr) + DHLR + FLOE with attention-based "
                                    "background extraction", DHAT),
        TrainingMethodEntry("trades", "TRADES (Zhang et al. 2019): CE(x) + trades_beta KL(p_nat || p_adv)", TRADES),
        TrainingMethodEntry("mart", "MART (Wang et al. 2020): boosted CE + mart_beta weighted KL", MART),
        TrainingMethodEntry("cfa", "CFA (Wei et al. 2023): AT (or --set cfa_base=trades) with class-wise calibrated "
                                   "eps (and TRADES beta) and a fairness-aware weight average (FAWA)", CFA),
        TrainingMethodEntry("sglr", "SGLR (Li et al. 2024): AT on self-refined soft labels, a moving average of each "
                                    "sample's one-hot label and the model's clean and adversarial predictions", SGLR),
        TrainingMethodEntry("fsr", "FSR (Kim et al. 2023): base (at, or --set base=trades|mart) + feature separation and "
                                   "recalibration losses; needs a model <name>_fsr", FSR),
        TrainingMethodEntry("part", "PART (Zhang et al. 2024): base (at, or --set base=trades|mart) on x_adv whose budget is "
                                    "eps on the pixels the attention marks important, part_eps_low elsewhere", PART),
        TrainingMethodEntry("again", "AGAIN (Yin et al. 2023), as specified: PGD-10 AT; with probability i/N (iteration "
                                     "i of N) a batch trains on CE of the class-y logit mixed with a fake label's "
                                     "(again_alpha) instead, with hybrid feature fusion (again_hff); --set "
                                     "again_form=code: as released, on a model <name>_again (auxiliary heads modulating "
                                     "features by 0.6 W[y] + 0.4 W[y'], CE + 2 x auxiliary CE, AWP)", AGAIN),
    )
}
#: every method takes ``--set awp=true`` (adversarial weight perturbation, :mod:`dhat_seg.awp`)


def create_training_method(cfg: Any) -> TrainingMethod:
    if cfg.method not in TRAINING_METHODS:
        raise UserError(f"training method {cfg.method!r} is unknown; expected one of {', '.join(TRAINING_METHODS)}")
    return TRAINING_METHODS[cfg.method].cls(cfg)
