"""SGLR: Self-Guided Label Refinement (Li, Yu, Wei, Jin, Zhang, Chan, CVPR 2024).

Sources: the paper ("Soften to Defend: Towards Adversarial Robustness via Self-Guided
Label Refinement", arXiv 2403.09101; CVPR 2024 pp. 24776-24785), whose method section
was not readable here: its abstract, and a third-party summary of it
(themoonlight.io/review/soften-to-defend-towards-adversarial-robustness-via-self-guided-label-refinement:
a soft label r f(x'; w) + (1 - r) y_hard, made reliable by an exponential moving average
of past predictions); and the authors' official code, github.com/devicerxx/SGLS ("official
implementation of Soften to Defend ... Self-Guided Label Smoothing", the method's earlier
name; ``losses/loss.py``: class ``SGLS``; ``scripts/cifar10/run_sgls.sh``), which fixes
every formula below.

The method, as the official code computes it. Every training sample i keeps a soft label
t_i (a probability vector over the classes), which starts as its one-hot label. x_adv is
PGD on the CE with the hard label (radius ``eps``, ``attack_steps`` steps of ``step_size``,
uniform random start: the code's 8/255, 10 x 2/255). Before the start epoch the loss is
AT's, CE(f(x_adv), y), and nothing is refined. From the start epoch on, at each visit of i
(once per epoch):

    q_i = w softmax(f(x_i)) + (1 - w) softmax(f(x_adv,i))       (both detached)
    t_i <- m t_i + (1 - m) q_i                                    (then used at once)
    loss = (1/B) sum_i -sum_c t_i,c log softmax(f(x_adv,i))_c

m = ``sglr.momentum`` = 0.9 (code and script), w = ``sglr.clean_weight`` = 0.2 (a constant
in the code: ``0.2 * clean_prob + 0.8 * prob``). The "self-distilled models" are thus the
model's own past states, through their predictions: t_i is the one-hot label with weight
m^k after k refinements plus an exponentially weighted average of the k predictions (the
summary's r = 1 - m for the first one). There is no teacher network, no temperature and no
weight average in the code; f(x_adv) is the loss's own forward (detached), f(x) one more
forward of the clean batch.

Choices where the sources are silent or differ (dhat-seg's):

* The start. The script starts refining at its (1-based) epoch 90 of 200, ten epochs before
  its first LR decay at 100 (``--sat-es 90``; its ``main_adv.py`` defines ``--sgls-es``,
  default 0, so the script as published is refused by argparse; its 90 is taken as the
  intended value). ``sglr.start`` null keeps that placement on dhat-seg's schedule: 0-based
  epoch ``milestones[0] - 10`` (70 with DHAT's [80, 90]), or ``epochs - 10`` without
  milestones, at least 0; an integer sets the 0-based epoch itself.
* Per-sample soft labels need the dataset index of every sample in a batch: the trainer
  hands them over with :meth:`on_batch_start` (``batch[2]``); a soft label that is needed
  before any index arrived is a UserError. The labels live on the model's device, grow to
  the largest index seen (rows never refined are zero and read as one-hot), and are saved in
  every checkpoint (:meth:`state_dict`), so a resumed run continues exactly.
* Attack mode and BN: the code attacks in eval mode and lets the clean forward update BN
  statistics; dhat-seg attacks in eval mode too (SGLR's registry default;
  ``attack_mode`` overrides it) and runs the clean forward under :meth:`auxiliary` (BN running statistics untouched
  unless ``attack_bn_update``), as every method here; it still normalises with the batch's
  statistics in train mode, as the code's does. With w = 0 the clean forward is skipped.
* AWP's proxy (``awp: true``) trains on targets refined from its own predictions without
  writing them; only the trained model's forwards refine the stored labels (once a batch).
* UIAT/DHAT on ``base: sglr``: their terms are added to SGLR's loss, and x_inv is made from
  SGLR's x_adv (PGD on the hard label), as for every base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg.errors import UserError
from dhat_seg.training_methods.adversarial import MadryAT
from dhat_seg.training_methods.base import max_abs
from dhat_seg.training_methods.settings import MethodSettings

#: Epochs of refinement before the first LR decay in the official script (its epochs 90-99).
LEAD_EPOCHS = 10


@dataclass(frozen=True)
class SGLRSettings(MethodSettings):
    """SGLR's settings (``--set sglr.KEY=VALUE``; see the module doc): the label momentum, the clean
    prediction's weight in the guide, and the 0-based epoch refinement starts (null: 10 epochs before
    the first LR milestone)."""

    momentum: float = 0.9
    clean_weight: float = 0.2
    start: int | None = None

    def checks(self, cfg):
        return [(0 <= self.momentum <= 1, "momentum", "a number in [0, 1]"),
                (0 <= self.clean_weight <= 1, "clean_weight", "a number in [0, 1]"),
                (self.start is None or self.start >= 0, "start",
                 "a non-negative integer (0-based epoch) or null (10 epochs before the first milestone)")]


def start_epoch(cfg: Any) -> int:
    """The 0-based epoch from which labels are refined (``sglr.start``, or its null default)."""
    start = cfg.options("sglr").start
    if start is not None:
        return int(start)
    anchor = cfg.milestones[0] if cfg.milestones else cfg.epochs
    return max(0, anchor - LEAD_EPOCHS)


def refine_labels(previous: Tensor, y: Tensor, p_adv: Tensor, p_clean: Tensor | None, momentum: float,
                  clean_weight: float) -> Tensor:
    """t <- m t + (1 - m) (w p_clean + (1 - w) p_adv), row by row; an all-zero row of
    ``previous`` (never refined) is the one-hot label of ``y``. ``p_clean`` None: w = 0."""
    one_hot = F.one_hot(y, previous.shape[1]).to(previous.dtype)
    previous = torch.where(previous.sum(1, keepdim=True) == 0, one_hot, previous)
    guide = p_adv if p_clean is None else clean_weight * p_clean + (1 - clean_weight) * p_adv
    return momentum * previous + (1 - momentum) * guide


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """(1/B) sum_i -sum_c target_ic log softmax(logits_i)_c, in fp32."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


class SGLR(MadryAT):
    """AT with self-refined soft labels (see the module doc); also a base of UIAT/DHAT."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.start = start_epoch(cfg)
        self.momentum, self.clean_weight = cfg.options("sglr").momentum, cfg.options("sglr").clean_weight
        #: soft labels, one row per training sample (None until the first refinement)
        self.labels: Tensor | None = None
        self._model: nn.Module | None = None  # the trained model: only its forwards write labels
        self._epoch = 0
        self._index: Tensor | None = None

    # ------------------------------------------------------------------ loss
    def refining(self) -> bool:
        """Whether the current epoch trains on refined labels."""
        return self._epoch >= self.start

    def base_loss(self, model, x, y, x_adv):
        """(loss, z_adv, stats): AT's CE before the start epoch, then the CE with the refined labels.
        Stats: the hard-label CE (``ce_adv``), the loss (``ce_soft``) and the mean mass of the
        refined labels on the true class (``soft_label_y``; 1 before the start epoch)."""
        z_adv = model(x_adv)
        if not self.refining():
            ce = F.cross_entropy(z_adv, y)
            one = torch.ones((), device=z_adv.device)
            return ce, z_adv, {"ce_adv": ce.detach(), "ce_soft": ce.detach(), "soft_label_y": one,
                               "max_logit_adv": max_abs(z_adv)}
        target = self.refined(model, x, y, z_adv.detach())
        loss = soft_cross_entropy(z_adv, target)
        stats = {"ce_adv": F.cross_entropy(z_adv.detach(), y), "ce_soft": loss.detach(),
                 "soft_label_y": target.gather(1, y[:, None]).mean(), "max_logit_adv": max_abs(z_adv)}
        return loss, z_adv, stats

    @torch.no_grad()
    def refined(self, model: nn.Module, x: Tensor, y: Tensor, z_adv: Tensor) -> Tensor:
        """The batch's refined labels t (fp32); written back when ``model`` is the trained one."""
        index = self._batch_index(y)
        p_adv = F.softmax(z_adv.float(), dim=1)
        p_clean = None
        if self.clean_weight > 0:
            with self.auxiliary(model):
                p_clean = F.softmax(model(x).float(), dim=1)
        write = self._model is None or model is self._model
        if write:
            self._grow(index, p_adv.shape[1], p_adv.device)
        target = refine_labels(self._previous(index, p_adv), y, p_adv, p_clean, self.momentum, self.clean_weight)
        if write:
            self.labels[index.to(target.device)] = target
        return target

    def _batch_index(self, y: Tensor) -> Tensor:
        if self._index is None:
            raise UserError("method sglr keeps a soft label per training sample and needs the dataset indices of each "
                            "batch; expected the trainer to call on_batch_start(batch indices) before the loss")
        if len(self._index) != len(y):
            raise UserError(f"method sglr got {len(self._index)} sample indices for a batch of {len(y)}; expected "
                            "on_batch_start with the indices of the batch being trained")
        return self._index

    def _grow(self, index: Tensor, classes: int, device: torch.device) -> None:
        """Zero rows appended to the label table until it holds every sample of ``index``."""
        have = 0 if self.labels is None else len(self.labels)
        needed = int(index.max()) + 1  # the indices are on the CPU (from the DataLoader): no device sync
        if needed > have:
            extra = torch.zeros(needed - have, classes, device=device)
            self.labels = extra if self.labels is None else torch.cat([self.labels, extra])

    def _previous(self, index: Tensor, like: Tensor) -> Tensor:
        """The stored labels of ``index``; zero (= one-hot) for samples not in the table yet."""
        if self.labels is not None and int(index.max()) < len(self.labels):
            return self.labels[index.to(like.device)]
        previous = torch.zeros_like(like)
        if self.labels is not None:
            known = index < len(self.labels)
            previous[known.to(like.device)] = self.labels[index[known].to(like.device)]
        return previous

    # ------------------------------------------------------------------ trainer hooks
    def on_fit_start(self, model, state):
        self._model = model
        self.labels = None
        if state and state.get("labels") is not None:
            self.labels = state["labels"].to(next(model.parameters()).device)

    def on_epoch_start(self, model, epoch):
        self._epoch, self._index = epoch, None

    def on_batch_start(self, index):
        self._index = index.detach().cpu().long()

    def state_dict(self):
        return {"labels": None if self.labels is None else self.labels.detach().cpu().clone()}
