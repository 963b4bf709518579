"""CFA: Class-wise Calibrated Fair Adversarial training (Wei, Wang, Guo, Wang, CVPR 2023).

Sources: the paper (arXiv 2303.14460, sections 4.1-4.3, Algorithm 1 and 5.1 "Training
Settings") and the official code (github.com/PKU-ML/CFA, ``train.py``, ``attack.py``:
``cw_pgd_loss``/``cw_trades_loss``, ``utils.py``: ``weight_average``). Three parts, with t_k
class k's *train robust accuracy* in the previous epoch (the fraction of its training
samples whose training-forward x_adv logits were classified correctly):

* **CCM** (class-wise calibrated margin, eq. 6): class k is attacked with radius
  eps_k = (lambda_1 + t_k) eps. ``cfa.lambda1``: the paper's 0.5 for AT and 0.3 for TRADES
  (section 5.1; the code's default is 0.5 for both); null picks the paper's value.
* **CCR** (class-wise calibrated regularisation, eqs. 7-8; TRADES only): beta_k =
  (lambda_2 + t_k) beta and the loss (CE(f(x), y) + beta_y KL(p_nat || p_adv)) / (1 + beta_y),
  per sample, mean over the batch (code: ``(1 - b) CE + b KL`` with b = beta_y / (1 + beta_y),
  the same). ``cfa.lambda2`` = 0.5 (paper and code), beta = ``trades.beta`` (6, both).
  Before calibration starts beta_y = beta, so TRADES+CFA's loss is TRADES' divided by
  1 + beta throughout (paper eq. 8 from Algorithm 1's start; code ``trades_loss``).
* **FAWA** (fairness-aware weight averaging, section 4.3): after an epoch, if the trained
  model's worst class robust accuracy on the validation split is >= delta, the average
  becomes decay avg + (1 - decay) theta (per epoch, not per step: Algorithm 1 and the
  code). ``cfa.fawa_decay`` 0.85 and ``cfa.fawa_threshold`` 0.2 (paper; the code defaults to 0.88
  and 0.24, its README example uses 0.2), ``cfa.fawa_begin`` 50 (paper: "the weight average
  processes begin at the 50-th epoch" of 200; the code has no such start). The average is
  what is validated, selected, saved and evaluated (:meth:`evaluation_model`).

Choices where the sources are silent or differ (dhat-seg's):

* ``cfa.base: at`` is the default: DHAT's loss is AT's (L_AT(z_adv, y)), the DHAT paper does
  not say which CFA variant DHAT-CFA uses, and the official README's one example is AT+CFA.
  The CFA paper's best row is TRADES+CFA (Table 1: AA 50.1 avg / 26.5 worst, AT+CFA 50.1 /
  24.4): ``--set cfa.base=trades``.
* Calibration starts at 0-based epoch ``cfa.begin`` = 10 (code ``--begin``; the paper does
  not say) and uses the stats of the epoch before; earlier epochs use eps (and beta) for
  every class, the float attack path, bit for bit AT's (TRADES') attack.
* The step size stays ``step_size`` for every class (code: ``alpha`` 2/255 whatever eps_k).
* t_k = correct_k / seen_k (the code's 10 correct_k / N equals it for balanced classes);
  0 for a class not seen in the epoch. Counted on the device (no host sync per batch),
  only for forwards of the trained model (AWP's proxy forwards are not counted).
* The FAWA gate uses PGD (``val_attack_steps`` steps of 2/255, radius ``eps``, eval mode),
  as the trainer's validation and the code's; the worst class is taken over the classes
  present in the validation samples. Before the first accepted epoch the trained weights
  are evaluated (the code evaluates its randomly initialised average then); the first
  accepted epoch copies the weights (code ``SEAT_init``; Algorithm 1 starts from theta_0).
  Integer buffers (BatchNorm's batch counter) are copied, not averaged.
* UIAT/DHAT on ``base: cfa``: x_inv is made from CFA's class-wise x_adv with ``inv_eps``
  (not calibrated). Attack mode, precision and BN handling follow dhat-seg's rules for
  every method (the code attacks TRADES in eval mode, AT in train mode).
* Checkpoint selection stays dhat-seg's (validation robust accuracy of the evaluated
  model), not the paper's sum of average and worst-class robustness.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg import attacks
from dhat_seg.training_methods.adversarial import MadryAT
from dhat_seg.training_methods.base import max_abs
from dhat_seg.training_methods.settings import MethodSettings

#: The CFA variants (``cfa.base``) and the paper's lambda_1 for each (section 5.1).
CFA_BASES = ("at", "trades")
PAPER_LAMBDA1 = {"at": 0.5, "trades": 0.3}


@dataclass(frozen=True)
class CFASettings(MethodSettings):
    """CFA's settings (``--set cfa.KEY=VALUE``; see the module doc). ``base``: at = AT+CFA (CCM + FAWA),
    trades = TRADES+CFA (CCM + CCR + FAWA, with ``trades.beta``); ``lambda1`` null = the paper's value
    for the base; ``begin``, ``fawa_begin``: 0-based epochs."""

    LEGACY = {"fawa_decay": "fawa_decay", "fawa_threshold": "fawa_threshold", "fawa_begin": "fawa_begin"}

    base: str = "at"
    lambda1: float | None = None
    lambda2: float = 0.5
    begin: int = 10
    fawa_decay: float = 0.85
    fawa_threshold: float = 0.2
    fawa_begin: int = 50

    def checks(self, cfg):
        return [(self.base in CFA_BASES, "base", f"one of {', '.join(CFA_BASES)}"),
                (self.lambda1 is None or self.lambda1 >= 0, "lambda1", "a non-negative number or null (the paper's value for the base)"),
                (self.lambda2 >= 0, "lambda2", "a non-negative number"),
                (self.begin >= 0, "begin", "a non-negative integer (0-based epoch)"),
                (0 <= self.fawa_decay < 1, "fawa_decay", "a number in [0, 1)"),
                (0 <= self.fawa_threshold <= 1, "fawa_threshold", "a number in [0, 1] (a fraction of a class's samples)"),
                (self.fawa_begin >= 0, "fawa_begin", "a non-negative integer (0-based epoch)")]
#: Step size of the FAWA gate's attack (the code's and the trainer's validation PGD).
GATE_STEP = 2 / 255


def class_margins(train_robust: Tensor, lambda1: float, eps: float) -> Tensor:
    """CCM (eq. 6): eps_k = (lambda_1 + t_k) eps, per class."""
    return (lambda1 + train_robust) * eps


def class_betas(train_robust: Tensor, lambda2: float, beta: float) -> Tensor:
    """CCR (eq. 7): beta_k = (lambda_2 + t_k) beta, per class."""
    return (lambda2 + train_robust) * beta


def trades_per_sample(z_nat: Tensor, z_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample CE(f(x), y) and KL(p_nat || p_adv) (summed over classes; nothing detached)."""
    ce = F.cross_entropy(z_nat, y, reduction="none")
    kl = F.kl_div(F.log_softmax(z_adv, dim=1), F.log_softmax(z_nat, dim=1), reduction="none", log_target=True).sum(1)
    return ce, kl


@torch.no_grad()
def fawa_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """avg <- decay avg + (1 - decay) theta, for every floating parameter and buffer (in
    place); integer buffers take the model's value."""
    own = model.state_dict()
    for name, value in average.state_dict().items():
        if value.is_floating_point():
            value.mul_(decay).add_(own[name], alpha=1 - decay)
        else:
            value.copy_(own[name])


class CFA(MadryAT):
    """AT+CFA (``cfa.base: at``) or TRADES+CFA (``trades``); also a base of UIAT/DHAT (see the module doc)."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.settings: CFASettings = cfg.options("cfa")
        self.variant = self.settings.base
        self.lambda1 = PAPER_LAMBDA1[self.variant] if self.settings.lambda1 is None else self.settings.lambda1
        self.trades_beta = cfg.options("trades").beta
        self._model: nn.Module | None = None  # the trained model: only its forwards are counted
        self._correct: Tensor | None = None  # per class, this epoch, on the device
        self._seen: Tensor | None = None
        #: t_k of the last finished epoch (None before the first)
        self.train_robust: Tensor | None = None
        #: this epoch's eps_k (units of 1, not 1/255) and beta_k; None: eps and beta for every class
        self.class_eps: Tensor | None = None
        self.class_beta: Tensor | None = None
        self.average: nn.Module | None = None
        self.updates = 0

    # ------------------------------------------------------------------ loss
    def adversarial(self, model, x, y):
        """x_adv with class y's radius eps_y: PGD on the CE (at) or TRADES' KL attack (trades)."""
        eps = self.eps if self.class_eps is None else self.class_eps[y]
        with self.auxiliary(model):
            if self.variant == "trades":
                return attacks.trades_kl_attack(model, x, eps, self.alpha, self.cfg.attack_steps,
                                                mode=self.attack_mode, precision=self.cfg.attack_precision)
            return attacks.pgd(model, x, y, eps, self.alpha, self.cfg.attack_steps, mode=self.attack_mode,
                               precision=self.cfg.attack_precision)

    def base_loss(self, model, x, y, x_adv):
        if self.variant == "trades":
            z_nat, z_adv = model(x), model(x_adv)
            ce, kl = trades_per_sample(z_nat, z_adv, y)
            beta = self.trades_beta if self.class_beta is None else self.class_beta[y]
            loss = ((ce + beta * kl) / (1 + beta)).mean()  # CCR, eq. 8
            stats = {"ce": ce.detach().mean(), "kl_adv": kl.detach().mean(), "max_logit_clean": max_abs(z_nat),
                     "max_logit_adv": max_abs(z_adv)}
        else:
            z_adv = model(x_adv)
            loss = F.cross_entropy(z_adv, y)
            stats = {"ce_adv": loss.detach(), "max_logit_adv": max_abs(z_adv)}
        if model is self._model:
            self._count(z_adv, y)
        return loss, z_adv, stats

    def _count(self, z_adv: Tensor, y: Tensor) -> None:
        """Add the batch's correct x_adv predictions per class (on the device, no sync)."""
        if self._correct is None:
            self._correct = torch.zeros(z_adv.shape[1], dtype=torch.long, device=y.device)
            self._seen = torch.zeros_like(self._correct)
        self._correct.index_add_(0, y, (z_adv.detach().argmax(1) == y).long())
        self._seen.index_add_(0, y, torch.ones_like(y))

    # ------------------------------------------------------------------ trainer hooks
    def on_fit_start(self, model, state):
        self._model = model
        if not state:
            return
        self.updates = int(state["updates"])
        self.train_robust = state["train_robust"]
        if state.get("average") is not None:
            self.average = self._copy(model)
            self.average.load_state_dict(state["average"])

    def on_epoch_start(self, model, epoch):
        self._correct = self._seen = None
        self.class_eps = self.class_beta = None
        if epoch >= self.settings.begin and self.train_robust is not None:
            t = self.train_robust.to(_device(model))
            self.class_eps = class_margins(t, self.lambda1, self.eps)
            if self.variant == "trades":
                self.class_beta = class_betas(t, self.settings.lambda2, self.trades_beta)

    def on_epoch_end(self, model, epoch, val_x, val_y, device):
        """Update t_k and, from ``fawa_begin``, the FAWA average. One host sync per epoch."""
        c = self.settings
        stats: dict[str, Any] = {"cfa_worst_train_acc": None, "cfa_eps_min": None, "cfa_eps_max": None,
                                 "fawa_worst_val_acc": None}
        if self._seen is not None:
            self.train_robust = self._correct.float() / self._seen.clamp(min=1).float()
            present = self.train_robust[self._seen > 0]
            stats["cfa_worst_train_acc"] = round(100 * present.min().item(), 2)
        if self.class_eps is not None:
            stats["cfa_eps_min"] = round(255 * self.class_eps.min().item(), 4)
            stats["cfa_eps_max"] = round(255 * self.class_eps.max().item(), 4)
        if epoch >= c.fawa_begin:
            worst = self.worst_class_robustness(model, val_x, val_y, device, seed=self.cfg.seed + epoch)
            stats["fawa_worst_val_acc"] = round(100 * worst, 2)
            if worst >= c.fawa_threshold:
                self.accept(model)
        stats["fawa_updates"] = self.updates
        return stats

    def accept(self, model: nn.Module) -> None:
        """A checkpoint that passed the fairness gate joins the average (the first one: a copy)."""
        if self.average is None:
            self.average = self._copy(model)
        else:
            fawa_update(self.average, model, self.settings.fawa_decay)
        self.updates += 1

    def worst_class_robustness(self, model: nn.Module, x: Tensor, y: Tensor, device: torch.device | str,
                               seed: int) -> float:
        """The lowest per-class PGD accuracy (a fraction) of ``model`` on (x, y), over the classes
        present; the global RNG is left as it was."""
        device = torch.device(device)
        correct = seen = None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for s in range(0, len(x), 256):
                xb, yb = x[s : s + 256].to(device), y[s : s + 256].to(device)
                x_adv = attacks.pgd(model, xb, yb, self.eps, GATE_STEP, self.cfg.val_attack_steps, mode="eval")
                with torch.no_grad(), attacks.model_mode(model, "eval"):
                    z = model(x_adv)
                if correct is None:
                    correct = torch.zeros(z.shape[1], dtype=torch.long, device=device)
                    seen = torch.zeros_like(correct)
                correct.index_add_(0, yb, (z.argmax(1) == yb).long())
                seen.index_add_(0, yb, torch.ones_like(yb))
        present = seen > 0
        return (correct[present].double() / seen[present].double()).min().item()

    def evaluation_model(self, model):
        """The FAWA average once an epoch passed the gate, else the trained model."""
        return self.average if self.average is not None else model

    def state_dict(self):
        return {"updates": self.updates,
                "train_robust": None if self.train_robust is None else self.train_robust.cpu(),
                "average": None if self.average is None else {k: v.detach().cpu().clone()
                                                              for k, v in self.average.state_dict().items()}}

    @staticmethod
    def _copy(model: nn.Module) -> nn.Module:
        """A frozen copy of the model (the average's module), in eval mode."""
        average = copy.deepcopy(model)
        for p in average.parameters():
            p.grad = None
            p.requires_grad_(False)
        return average.eval()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
