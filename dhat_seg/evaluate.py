"""Robustness evaluation: clean and attacked accuracy, per sample, on a fixed set.

All attacks evaluate the bare classifier in eval mode. Settings follow the DHAT
evaluation protocol (REFERENCE section 1): L_inf eps 8/255, step 2/255, random start;
C&W-inf is PGD-20 on the C&W margin loss; AutoAttack is the *standard* version through
pyautoattack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from dhat_seg import attacks
from dhat_seg.errors import UserError


@dataclass(frozen=True)
class EvalAttack:
    name: str
    description: str
    run: Callable[..., Tensor]  # (model, x, y, eps, alpha) -> x_adv


def _pgd(steps: int, loss: str = "ce"):
    return lambda model, x, y, eps, alpha: attacks.pgd(model, x, y, eps, alpha, steps, loss=loss, random_start=True, mode="eval")


EVAL_ATTACKS: dict[str, EvalAttack] = {
    a.name: a
    for a in (
        EvalAttack("clean", "no attack", lambda model, x, y, eps, alpha: x),
        EvalAttack("fgsm", "FGSM, one step of eps", lambda model, x, y, eps, alpha: attacks.fgsm(model, x, y, eps, mode="eval")),
        EvalAttack("pgd10", "PGD-10 (CE, random start)", _pgd(10)),
        EvalAttack("pgd20", "PGD-20 (CE, random start)", _pgd(20)),
        EvalAttack("pgd50", "PGD-50 (CE, random start)", _pgd(50)),
        EvalAttack("cw", "C&W-inf: PGD-20 on the C&W margin loss", _pgd(20, "cw")),
        EvalAttack("aa", "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) via pyautoattack", lambda *a: None),
    )
}
DEFAULT_ATTACKS = ("clean", "pgd10", "pgd20", "cw", "aa")


def parse_attacks(names: str | Iterable[str]) -> list[str]:
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    for name in names:
        if name not in EVAL_ATTACKS:
            raise UserError(f"attack {name!r} is unknown; expected a comma list of {', '.join(EVAL_ATTACKS)}")
    return names


def collect(dataset, n: int | None = None) -> tuple[Tensor, Tensor]:
    """The first ``n`` samples of a dataset as two tensors (images, labels)."""
    n = len(dataset) if n is None else min(n, len(dataset))
    if n <= 0:
        raise UserError(f"n_examples={n} is invalid; expected a positive number")
    xs, ys = zip(*[(dataset[i][0], int(dataset[i][1])) for i in range(n)])
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(dim=1)


def correct_under_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    aa_state_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Per-sample bool: is the model right on ``attack``'s adversarial example?"""
    model.eval()
    if attack == "aa":
        return _autoattack(model, x, y, eps, batch_size, device, seed, aa_state_path)
    spec = EVAL_ATTACKS[attack]
    torch.manual_seed(seed)
    out = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        x_adv = spec.run(model, xb, yb, eps, alpha)
        out.append((_predict(model, x_adv) == yb).cpu())
        if progress:
            progress(len(xb))
    return torch.cat(out)


def _autoattack(model, x, y, eps, batch_size, device, seed, state_path) -> Tensor:
    import logging

    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    adversary = AutoAttack(model, eps=eps, norm="Linf", version="standard", device=device, seed=seed)
    x_adv, _ = adversary.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size, state_path=state_path)
    with torch.no_grad():
        preds = torch.cat([_predict(model, x_adv[i : i + batch_size].to(device)).cpu() for i in range(0, len(x_adv), batch_size)])
    return preds == y


def percent(flags: Tensor) -> float:
    return round(100.0 * flags.float().mean().item(), 2)
