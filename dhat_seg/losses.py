"""DHAT and UIAT losses (REFERENCE section 1, steps 5-8) and the TRADES and MART terms,
as pure functions of logits.

Notation: z_nat = f(x), z_adv = f(x_adv), z_inv = f(x_inv), z_B = f(x_B) with x_B the
inverse adversarial example with its foreground blacked out, z_star = z_inv - z_B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dhat_seg.errors import UserError

DHLR_FORMS = ("code", "paper", "paper-adv")
FLOE_FORMS = ("paper", "code", "relative")


def kl_div(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(softmax(p) || softmax(q)), summed over classes, mean over the batch."""
    return F.kl_div(F.log_softmax(q_logits, dim=1), F.log_softmax(p_logits, dim=1), reduction="batchmean", log_target=True)


def dhlr_loss(z_adv: Tensor, z_inv: Tensor, z_background: Tensor, form: str = "code") -> Tensor:
    """Debiased High-confidence Logit Regularisation (DHAT eq. DHLR, Alg. 1 l.18).

    With z_star = z_inv - z_B:

    * ``"code"`` (default, the authors' code): KL(softmax(z_adv) || softmax(z_star)),
      batchmean, nothing detached.
    * ``"paper"`` (Algorithm 1, line 18): KL(softmax(z_star) || softmax(z_inv)).
    * ``"paper-adv"`` (main text, L_DHLR(z_star, z_adv)): KL(softmax(z_star) || softmax(z_adv)).
    """
    z_star = z_inv - z_background
    if form == "code":
        return kl_div(z_adv, z_star)
    if form == "paper":
        return kl_div(z_star, z_inv)
    if form == "paper-adv":
        return kl_div(z_star, z_adv)
    raise UserError(f"dhlr_form {form!r} is unknown; expected one of {', '.join(DHLR_FORMS)}")


def floe_loss(z_inv: Tensor, z_background: Tensor, form: str = "paper", p: float = 2.0, eps: float = 1e-8) -> Tensor:
    """Foreground Logit Orthogonal Enhancement (DHAT eq. FLOE, Alg. 1 l.20).

    * ``"paper"`` (default): per sample, r = z_inv - (<z_inv, z_B> / ||z_B||^2) z_B and
      the loss is -mean_b ||r_b||_p (the denominator is clamped at ``eps``): minimising
      it enlarges the part of z_inv that the background logits cannot explain.
    * ``"code"`` (the authors' code): a batch-level projection
      R = z_inv - (z_inv z_B^T / ||z_B z_B^T||_F) z_B and the loss is +||R||_F / B.
      Minimising it shrinks z_inv towards the span of z_B (and towards 0).
    * ``"relative"`` (dhat-seg's scale-free variant, not in the paper):
      -mean_b ||r_b||_p / ||z_inv_b||_p, i.e. -sin(angle(z_inv, z_B)) for p = 2. The
      paper form's gradient has unit size whatever the logits' scale, so it can lower
      the loss forever by inflating the logits; this one is bounded in [-1, 0] and only
      rewards the direction the paper asks for.
    """
    if form in ("paper", "relative"):
        coef = (z_inv * z_background).sum(dim=1, keepdim=True) / (z_background.pow(2).sum(dim=1, keepdim=True).clamp_min(eps))
        residual = torch.linalg.vector_norm(z_inv - coef * z_background, ord=p, dim=1)
        if form == "relative":
            residual = residual / torch.linalg.vector_norm(z_inv, ord=p, dim=1).clamp_min(eps)
        return -residual.mean()
    if form == "code":
        gram_norm = torch.linalg.matrix_norm(z_background @ z_background.T).clamp_min(eps)
        residual = z_inv - (z_inv @ z_background.T / gram_norm) @ z_background
        return torch.linalg.matrix_norm(residual) / z_inv.shape[0]
    raise UserError(f"floe_form {form!r} is unknown; expected one of {', '.join(FLOE_FORMS)}")


def uiat_regulariser(z_adv: Tensor, z_inv: Tensor) -> Tensor:
    """UIAT's alignment term KL(softmax(z_adv) || softmax(z_inv)) (Table 10 "-" row)."""
    return kl_div(z_adv, z_inv)


def trades_regulariser(z_nat: Tensor, z_adv: Tensor) -> Tensor:
    """TRADES' robust term KL(p_nat || p_adv), summed over classes, mean over the batch.

    The official code (yaodongyu/TRADES, trades.py) computes
    ``KLDivLoss(size_average=False)(log_softmax(z_adv), softmax(z_nat)) / batch_size``;
    the same quantity. Nothing is detached: the gradient reaches both forwards.
    """
    return kl_div(z_nat, z_adv)


def mart_terms(z_nat: Tensor, z_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """MART's two terms (Wang et al., ICLR 2020; official code: YisenWang/MART, mart.py).

    With p_adv = softmax(z_adv), p_nat = softmax(z_nat) and B the batch size:

    * boosted CE: CE(z_adv, y) + NLL(log(1.0001 - p_adv + 1e-12), y'), where y' is the
      most probable wrong class under p_adv (the runner-up when the top class is y);
    * robust term: (1/B) sum_b KL(p_nat,b || p_adv,b) (1.0000001 - p_nat,b[y_b]), the KL
      taken against log(p_adv + 1e-12). The weight is not detached (as in the official code).

    Returns (boosted CE, robust term); the loss is ``bce + beta * robust``. Computed in fp32.
    """
    z_nat, z_adv = z_nat.float(), z_adv.float()
    adv_probs = F.softmax(z_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(z_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
    nat_probs = F.softmax(z_nat, dim=1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    robust = (kl * (1.0000001 - true_probs)).sum() / z_adv.shape[0]
    return bce, robust


def background_only(x: Tensor, foreground: Tensor) -> Tensor:
    """x_B: ``x`` with foreground pixels set to 0 (black in [0, 1] space), Alg. 1 l.13.

    ``foreground`` is a bool B x 1 x H x W mask, broadcast over channels.
    """
    return x * (~foreground).to(x.dtype)
