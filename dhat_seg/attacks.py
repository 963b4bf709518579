"""L_inf attacks as pure, batched, device-agnostic functions.

Inputs are images in [0, 1]; every result stays in the eps-ball around ``x`` and in
[0, 1]. Attacks do not change the model's train/eval mode unless asked: pass
``mode="eval"`` or ``mode="train"`` to run the attack in that mode (restored after),
or ``mode=None`` to leave it as it is (DHAT's authors attack in train mode).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg.errors import UserError
from dhat_seg.models import module_mode

MODES = ("train", "eval", None)


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str | None):
    """Temporarily put ``model`` in "train" or "eval" mode (None: leave it as it is)."""
    if mode not in MODES:
        raise UserError(f"model mode {mode!r} is invalid; expected 'train', 'eval' or None")
    if mode is None:
        yield model
        return
    with module_mode(model, training=mode == "train"):
        yield model


def cw_margin_loss(logits: Tensor, y: Tensor, kappa: float = 50.0) -> Tensor:
    """Per-sample C&W margin, max_{j != y} z_j - z_y, clamped at -kappa (Carlini & Wagner 2017, f_6).

    Maximising it pushes the best wrong class above the true one. Returns shape B.
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return (others.max(dim=1).values - true).clamp(min=-kappa)


def _ce_per_sample(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ce": _ce_per_sample, "cw": cw_margin_loss}


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    *,
    loss: str = "ce",
    random_start: bool = True,
    mode: str | None = None,
) -> Tensor:
    """L_inf PGD (Madry et al. 2018): x_{t+1} = Proj_{B(x, eps) ∩ [0,1]}(x_t + alpha sign(grad L)).

    Args:
        loss: "ce" (cross-entropy) or "cw" (C&W margin: PGD on it is the C&W-inf attack).
        random_start: start from x + U(-eps, eps) (clipped to [0, 1]).
        mode: model mode during the attack ("train", "eval", or None to leave it).
    Returns:
        adversarial examples, detached, same shape as x.
    """
    if eps < 0 or alpha < 0 or steps < 0:
        raise UserError(f"attack settings eps={eps}, alpha={alpha}, steps={steps} are invalid; expected non-negative values")
    if loss not in LOSSES:
        raise UserError(f"attack loss {loss!r} is unknown; expected one of {', '.join(LOSSES)}")
    loss_fn = LOSSES[loss]
    x = x.detach()
    x_adv = x.clone()
    if random_start and eps > 0:
        x_adv = _project(x_adv + torch.empty_like(x).uniform_(-eps, eps), x, eps)
    with model_mode(model, mode), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            objective = loss_fn(model(x_adv), y).sum()
            (grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = _project(x_adv.detach() + alpha * grad.sign(), x, eps)
    return x_adv.detach()


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, mode: str | None = None) -> Tensor:
    """FGSM (Goodfellow et al. 2015): one step of size eps from x, no random start."""
    return pgd(model, x, y, eps, eps, 1, random_start=False, mode=mode)


def inverse_adversarial(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    p_nat: Tensor,
    p_adv: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    *,
    random_start: bool = True,
    mode: str | None = None,
) -> Tensor:
    """Inverse adversarial examples (UIAT / DHAT, REFERENCE section 1 step 2).

    Descends L_inv = CE(f(x'), y) + KL(p_nat || p') - KL(p_adv || p') over the L_inf
    ball of radius eps around x, with signed steps and no momentum. ``p_nat`` and
    ``p_adv`` (B x K probabilities) are computed once by the caller, before the loop.
    """
    if eps < 0 or alpha < 0 or steps < 0:
        raise UserError(f"inverse attack settings eps={eps}, alpha={alpha}, steps={steps} are invalid; expected non-negative values")
    x = x.detach()
    p_nat, p_adv = p_nat.detach(), p_adv.detach()
    x_inv = x.clone()
    if random_start and eps > 0:
        x_inv = _project(x_inv + torch.empty_like(x).uniform_(-eps, eps), x, eps)
    with model_mode(model, mode), torch.enable_grad():
        for _ in range(steps):
            x_inv.requires_grad_(True)
            objective = inverse_loss(model(x_inv), y, p_nat, p_adv)
            (grad,) = torch.autograd.grad(objective, x_inv)
            x_inv = _project(x_inv.detach() - alpha * grad.sign(), x, eps)
    return x_inv.detach()


def inverse_loss(logits: Tensor, y: Tensor, p_nat: Tensor, p_adv: Tensor) -> Tensor:
    """CE(z, y) + KL(p_nat || softmax z) - KL(p_adv || softmax z), batch means."""
    log_p = F.log_softmax(logits, dim=1)
    kl_nat = F.kl_div(log_p, p_nat, reduction="batchmean")
    kl_adv = F.kl_div(log_p, p_adv, reduction="batchmean")
    return F.cross_entropy(logits, y) + kl_nat - kl_adv
