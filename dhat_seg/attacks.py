"""L_inf attacks as pure, batched, device-agnostic functions.

Inputs are images in [0, 1]; every result stays in the eps-ball around ``x`` and in
[0, 1]. Attacks do not change the model's train/eval mode unless asked: pass
``mode="eval"`` or ``mode="train"`` to run the attack in that mode (restored after),
or ``mode=None`` to leave it as it is (DHAT's authors attack in train mode).

Precision: every attack runs its forward and backward passes in fp32, also when it is
called inside an autocast region (mixed-precision training). In fp16 the input
gradient of a confidently classified sample underflows to 0, sign(0) = 0 and the
attack stops moving (the inverse attack, whose CE is near 0, first); a GradScaler
scales parameter gradients, not input gradients. ``precision="autocast"`` opts in to
the ambient autocast (faster, at the user's risk).
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
PRECISIONS = ("fp32", "autocast")


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


@contextlib.contextmanager
def attack_precision(x: Tensor, precision: str = "fp32"):
    """fp32 for the attack's passes (autocast switched off), or the ambient autocast."""
    if precision not in PRECISIONS:
        raise UserError(f"attack precision {precision!r} is invalid; expected one of {', '.join(PRECISIONS)}")
    if precision == "autocast":
        yield
        return
    with torch.autocast(x.device.type, enabled=False):
        yield


def cw_margin_loss(logits: Tensor, y: Tensor, kappa: float = 50.0) -> Tensor:
    """Per-sample C&W-inf objective min(max_{j != y} z_j - z_y, kappa) (Carlini & Wagner 2017, f_6).

    Maximising it pushes the best wrong class above the true one; the cap at +kappa
    stops pushing once a sample is misclassified by kappa. The cap must be on that side:
    a floor at -kappa would give zero gradient to every sample classified correctly by a
    margin above kappa, and PGD would never move it. Returns shape B, in fp32.
    """
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return (others.max(dim=1).values - true).clamp(max=kappa)


def _ce_per_sample(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ce": _ce_per_sample, "cw": cw_margin_loss}


def _box(x: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor]:
    """Bounds (lo, hi) of the L_inf ball of radius ``eps`` around ``x``, computed once per attack.

    A float radius: x - eps and x + eps, the float path's values bit for bit. A tensor radius
    (per sample or per pixel) is exact element-wise: where rounding put a bound outside its
    pixel's budget (fl(x + eps) - x > eps), the bound moves one float step towards x, so every
    x' in [lo, hi] has |x' - x| <= eps in floating point, also after clamping to [0, 1]
    (which moves x' towards x, inside [0, 1]). One step suffices: the rounding error of
    x + eps is at most half a step."""
    lo, hi = x - eps, x + eps
    if isinstance(eps, Tensor):
        hi = torch.where(hi - x > eps, torch.nextafter(hi, x.expand_as(hi)), hi)
        lo = torch.where(x - lo > eps, torch.nextafter(lo, x.expand_as(lo)), lo)
    return lo, hi


def _project(x_adv: Tensor, box: tuple[Tensor, Tensor]) -> Tensor:
    """Element-wise projection onto the ball (``_box``) and [0, 1]."""
    return torch.min(torch.max(x_adv, box[0]), box[1]).clamp_(0.0, 1.0)


def _per_sample(value: float | Tensor, x: Tensor) -> float | Tensor:
    """A float as it is; a tensor of shape B (one value per sample, e.g. CFA's class-wise
    radius) shaped B x 1 x ... x 1 to broadcast over the sample's dimensions; a tensor with
    as many dimensions as ``x`` (one value per pixel, B x 1 x H x W, or per pixel and
    channel, B x C x H x W: PART's budget map) as it is, once checked to broadcast to ``x``."""
    if not isinstance(value, Tensor):
        return value
    value = value.to(device=x.device, dtype=x.dtype)
    if value.dim() <= 1:
        return value.reshape(-1, *([1] * (x.dim() - 1)))
    if value.dim() != x.dim() or any(v not in (1, n) for v, n in zip(value.shape, x.shape)):
        raise UserError(f"attack budget of shape {tuple(value.shape)} does not broadcast to the inputs' shape "
                        f"{tuple(x.shape)}; expected a float, one value per sample (B) or a map B x 1 x H x W or B x C x H x W")
    return value


def _negative(value: float | Tensor) -> bool:
    """Whether a float setting is negative. Per-sample tensors are not checked (that would
    cost a host sync per batch); their caller builds them non-negative."""
    return not isinstance(value, Tensor) and value < 0


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    alpha: float | Tensor,
    steps: int,
    *,
    loss: str = "ce",
    random_start: bool = True,
    mode: str | None = None,
    precision: str = "fp32",
) -> Tensor:
    """L_inf PGD (Madry et al. 2018): x_{t+1} = Proj_{B(x, eps) ∩ [0,1]}(x_t + alpha sign(grad L)).

    Args:
        eps, alpha: floats, or tensors of shape B: one radius / step size per sample (CFA's
            class-wise margins), or maps B x 1 x H x W / B x C x H x W: one per pixel (PART's
            budget). The projection is element-wise and exact for tensors: every pixel ends
            within its own radius in floating point (``_box``); the float path is unchanged.
        loss: "ce" (cross-entropy) or "cw" (C&W margin: PGD on it is the C&W-inf attack).
        random_start: start from x + U(-eps, eps) (clipped to [0, 1]).
        mode: model mode during the attack ("train", "eval", or None to leave it).
        precision: "fp32" (default; autocast off inside the attack) or "autocast".
    Returns:
        adversarial examples, detached, same shape as x.
    """
    if _negative(eps) or _negative(alpha) or steps < 0:
        raise UserError(f"attack settings eps={eps}, alpha={alpha}, steps={steps} are invalid; expected non-negative values")
    if loss not in LOSSES:
        raise UserError(f"attack loss {loss!r} is unknown; expected one of {', '.join(LOSSES)}")
    loss_fn = LOSSES[loss]
    x = x.detach()
    eps, alpha = _per_sample(eps, x), _per_sample(alpha, x)
    box = _box(x, eps)
    x_adv = _start(x, eps, box, random_start)
    with model_mode(model, mode), attack_precision(x, precision), torch.enable_grad():
        for _ in range(steps):
            x_adv, _ = _pgd_step(model, loss_fn, x_adv, y, alpha, box)
    return x_adv.detach()


def _start(x: Tensor, eps: float | Tensor, box: tuple[Tensor, Tensor], random_start: bool) -> Tensor:
    """PGD's first iterate: x, or x + U(-eps, eps) projected (noise drawn for the whole batch)."""
    x_adv = x.clone()
    if random_start and isinstance(eps, Tensor):
        x_adv = _project(x_adv + torch.empty_like(x).uniform_(-1.0, 1.0) * eps, box)
    elif random_start and eps > 0:
        x_adv = _project(x_adv + torch.empty_like(x).uniform_(-eps, eps), box)
    return x_adv


def _pgd_step(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x_adv: Tensor, y: Tensor,
              alpha: float | Tensor, box: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """One PGD step (the only one: :func:`pgd` and :func:`pgd_any_iterate` both take it):
    (next iterate, detached logits of ``x_adv``: the prediction of the current iterate comes free)."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    (grad,) = torch.autograd.grad(loss_fn(logits, y).sum(), x_adv)
    return _project(x_adv.detach() + alpha * grad.sign(), box), logits.detach()


def _take(value: float | Tensor, keep: Tensor, n: int) -> float | Tensor:
    """The rows ``keep`` of a per-sample setting (as shaped by :func:`_per_sample`) for a
    batch of ``n``; a float, or a tensor broadcast over the batch (first dimension 1), as it is."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[keep]
    return value


def pgd_any_iterate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    alpha: float | Tensor,
    steps: int,
    *,
    loss: str = "ce",
    random_start: bool = True,
    clean_correct: Tensor | None = None,
    source: nn.Module | None = None,
    mode: str | None = "eval",
    precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """PGD for worst-case evaluation: a sample is broken once *any* point misclassifies it.

    Same iterates as :func:`pgd` with the same arguments and RNG state (the random start
    is drawn for the whole batch first), but "any-iterate" counted (AutoAttack's
    convention): a sample is broken if ``model`` misclassifies the clean input, the start
    point, or any later iterate up to the last. A broken sample keeps the iterate that
    broke it and leaves the batch: only unbroken samples go through further passes.

    Args:
        clean_correct: bool B, whether ``model`` is right on the clean ``x`` (computed
            once by the caller and shared by every attack); None: computed here.
            Samples misclassified clean are not attacked at all.
        source: the model whose gradients craft the iterates (transfer attack); each
            iterate is still judged by ``model``. None: ``model`` itself (white box).
        eps, alpha, loss, random_start, mode, precision: as in :func:`pgd`.
    Returns:
        (correct: bool B on x's device, x_kept: detached, same shape as x): per sample,
        whether no point broke it, and the point that broke it (x itself when misclassified
        clean) or, when unbroken, the last iterate.
    """
    if _negative(eps) or _negative(alpha) or steps < 0:
        raise UserError(f"attack settings eps={eps}, alpha={alpha}, steps={steps} are invalid; expected non-negative values")
    if loss not in LOSSES:
        raise UserError(f"attack loss {loss!r} is unknown; expected one of {', '.join(LOSSES)}")
    loss_fn, source = LOSSES[loss], model if source is None else source
    x = x.detach()
    n = len(x)
    eps, alpha = _per_sample(eps, x), _per_sample(alpha, x)
    box = _box(x, eps)
    x_adv = _start(x, eps, box, random_start)  # drawn for all n before compacting: the same start as pgd
    kept = x.clone()
    with model_mode(model, mode), model_mode(source, mode), attack_precision(x, precision):
        if clean_correct is None:
            with torch.no_grad():
                clean_correct = model(x).argmax(1) == y
        correct = clean_correct.to(device=x.device, dtype=torch.bool).clone()
        idx = correct.nonzero().flatten()  # the samples still unbroken, by index into the batch
        xa, ya, a, bx = x_adv[idx], y[idx], _take(alpha, idx, n), (box[0][idx], box[1][idx])
        for step in range(steps + 1):
            if not len(idx):
                break
            if step < steps:
                with torch.enable_grad():
                    nxt, logits = _pgd_step(source, loss_fn, xa, ya, a, bx)
                if source is not model:
                    with torch.no_grad():
                        logits = model(xa)
            else:
                with torch.no_grad():
                    logits = model(xa)  # the last iterate
            wrong = logits.argmax(1) != ya
            broken = idx[wrong]
            correct[broken], kept[broken] = False, xa[wrong]
            if step == steps:
                kept[idx[~wrong]] = xa[~wrong]
                break
            if bool(wrong.any()):
                keep = (~wrong).nonzero().flatten()
                idx, nxt, ya, a = idx[keep], nxt[keep], ya[keep], _take(a, keep, len(wrong))
                bx = (bx[0][keep], bx[1][keep])
            xa = nxt
    return correct, kept.detach()


def signed_ascent(
    model: nn.Module,
    objective: Callable[[Tensor], Tensor],
    x: Tensor,
    start: Tensor,
    eps: float | Tensor,
    alpha: float | Tensor,
    steps: int,
    *,
    mode: str | None = None,
    precision: str = "fp32",
) -> Tensor:
    """``steps`` signed steps up the scalar ``objective(x')`` (a function of the inputs that runs
    ``model``), x' <- Proj_{B(x, eps) ∩ [0,1]}(x' + alpha sign(grad)), from ``start`` as given (the
    first forward sees it unprojected, as codes that start at x + noise do); the result is
    projected (also with 0 steps). ``eps``/``alpha`` as in :func:`pgd`."""
    if _negative(eps) or _negative(alpha) or steps < 0:
        raise UserError(f"attack settings eps={eps}, alpha={alpha}, steps={steps} are invalid; expected non-negative values")
    x = x.detach()
    eps, alpha = _per_sample(eps, x), _per_sample(alpha, x)
    box = _box(x, eps)
    x_adv = start.detach().clone()
    with model_mode(model, mode), attack_precision(x, precision), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(x_adv), x_adv)
            x_adv = _project(x_adv.detach() + alpha * grad.sign(), box)
    return _project(x_adv.detach(), box)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, mode: str | None = None, precision: str = "fp32") -> Tensor:
    """FGSM (Goodfellow et al. 2015): one step of size eps from x, no random start."""
    return pgd(model, x, y, eps, eps, 1, random_start=False, mode=mode, precision=precision)


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
    precision: str = "fp32",
) -> Tensor:
    """Inverse adversarial examples (UIAT / DHAT, REFERENCE section 1 step 2).

    Descends L_inv = CE(f(x'), y) + KL(p_nat || p') - KL(p_adv || p') over the L_inf
    ball of radius eps around x, with signed steps and no momentum. ``p_nat`` and
    ``p_adv`` (B x K probabilities) are computed once by the caller, before the loop.
    Runs in fp32 unless ``precision="autocast"`` (see the module docstring).
    """
    if eps < 0 or alpha < 0 or steps < 0:
        raise UserError(f"inverse attack settings eps={eps}, alpha={alpha}, steps={steps} are invalid; expected non-negative values")
    x = x.detach()
    p_nat, p_adv = p_nat.detach(), p_adv.detach()
    x_inv = x.clone()
    box = _box(x, eps)
    if random_start and eps > 0:
        x_inv = _project(x_inv + torch.empty_like(x).uniform_(-eps, eps), box)
    with model_mode(model, mode), attack_precision(x, precision), torch.enable_grad():
        for _ in range(steps):
            x_inv.requires_grad_(True)
            objective = inverse_loss(model(x_inv), y, p_nat, p_adv)
            (grad,) = torch.autograd.grad(objective, x_inv)
            x_inv = _project(x_inv.detach() - alpha * grad.sign(), box)
    return x_inv.detach()


def inverse_loss(logits: Tensor, y: Tensor, p_nat: Tensor, p_adv: Tensor) -> Tensor:
    """CE(z, y) + KL(p_nat || softmax z) - KL(p_adv || softmax z), batch means."""
    logits = logits.float()
    log_p = F.log_softmax(logits, dim=1)
    kl_nat = F.kl_div(log_p, p_nat, reduction="batchmean")
    kl_adv = F.kl_div(log_p, p_adv, reduction="batchmean")
    return F.cross_entropy(logits, y) + kl_nat - kl_adv


def trades_kl_attack(
    model: nn.Module,
    x: Tensor,
    eps: float | Tensor,
    alpha: float | Tensor,
    steps: int,
    *,
    noise: float = 0.001,
    mode: str | None = None,
    precision: str = "fp32",
) -> Tensor:
    """TRADES' inner maximisation (Zhang et al., ICML 2019; official code: yaodongyu/TRADES, trades.py).

    Ascends KL(p_nat || softmax f(x')) over the L_inf ball of radius eps around x with
    signed steps: x' <- Proj_{B(x, eps) ∩ [0,1]}(x' + alpha sign(grad KL)), starting from
    x + noise * N(0, 1). p_nat = softmax f(x) is computed once, without gradients, before
    the loop (the official code recomputes it every step; its value is the same). The
    label is not used. dhat-seg projects the start into the ball and [0, 1] as well (the
    official code clamps only after the first step). ``eps`` and ``alpha`` may be tensors
    of shape B (one per sample) or per-pixel maps, as in :func:`pgd`. Runs in fp32 unless
    ``precision="autocast"`` (see the module docstring).
    """
    if _negative(eps) or _negative(alpha) or steps < 0 or noise < 0:
        raise UserError(f"TRADES attack settings eps={eps}, alpha={alpha}, steps={steps}, noise={noise} are invalid; "
                        "expected non-negative values")
    x = x.detach()
    eps, alpha = _per_sample(eps, x), _per_sample(alpha, x)
    box = _box(x, eps)
    with model_mode(model, mode), attack_precision(x, precision):
        with torch.no_grad():
            p_nat = F.softmax(model(x).float(), dim=1)
        x_adv = _project(x + noise * torch.randn_like(x), box)
        with torch.enable_grad():
            for _ in range(steps):
                x_adv.requires_grad_(True)
                objective = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), p_nat, reduction="sum")
                (grad,) = torch.autograd.grad(objective, x_adv)
                x_adv = _project(x_adv.detach() + alpha * grad.sign(), box)
    return x_adv.detach()
