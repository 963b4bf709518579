"""DHAT and UIAT losses as pure functions of logits (REFERENCE section 1, steps 5-8).

Notation: z_adv = f(x_adv), z_inv = f(x_inv), z_B = f(x_B) with x_B the inverse
adversarial example with its foreground blacked out, z_star = z_inv - z_B.
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


def background_only(x: Tensor, foreground: Tensor) -> Tensor:
    """x_B: ``x`` with foreground pixels set to 0 (black in [0, 1] space), Alg. 1 l.13.

    ``foreground`` is a bool B x 1 x H x W mask, broadcast over channels.
    """
    return x * (~foreground).to(x.dtype)
