"""Robustness evaluation: clean and attacked accuracy, per sample, on a fixed set.

All attacks evaluate the bare classifier in eval mode. Settings follow the DHAT
evaluation protocol (REFERENCE section 1): L_inf eps 8/255, step 2/255, random start;
C&W-inf is PGD-20 on the C&W margin loss; AutoAttack is the *standard* version through
pyautoattack (APGD-CE, APGD-T, FAB-T, Square).

Everything here works on tensors already in memory and returns per-sample bool flags
("is the model right on this sample under this attack?"), so that accuracies, the
per-sample worst case, the robust gap and the background gap are all computed from
the same flags by the small pure functions at the end of this module.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Union

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dhat_seg import attacks
from dhat_seg.evaluation.autoattack import (  # noqa: F401  (re-exported: the AutoAttack API of this module)
    AUTOATTACK_MINOR, AUTOATTACK_STANDARD, AUTOATTACK_SUPPORTED, autoattack_flags, autoattack_state_file,
    check_autoattack_version, progress_total)
from dhat_seg.errors import UserError

#: How robust accuracy is counted (``dhat-seg eval --robust-accuracy``): "any-iterate"
#: (default; AutoAttack's convention): a sample is broken if the clean input or *any*
#: point an attack visits (random start, every PGD iterate, the last) is misclassified;
#: "last-iterate": only the attack's last iterate is judged (what many papers report).
ROBUST_ACCURACY = ("any-iterate", "last-iterate")
#: The attacks AutoAttack follows: with any-iterate it runs on what they left unbroken.
CHEAP_ATTACKS = ("clean", "fgsm", "pgd10", "pgd20", "pgd50", "cw")
#: ``aa_state_path`` of :func:`flags_for_attacks`: a path, or (subset indices or None, x, y) -> path.
AAState = Union[Path, Callable[[Union[Tensor, None], Tensor, Tensor], Path], None]


@dataclass(frozen=True)
class EvalAttack:
    """One evaluation attack: ``run(model, x, y, eps, alpha) -> x_adv``.

    ``steps``/``loss``/``random_start`` describe it for eval.json (None: not a PGD).
    """

    name: str
    description: str
    run: Callable[..., Tensor]
    steps: int | None = None
    loss: str | None = None
    random_start: bool = False


def _pgd(steps: int, loss: str = "ce"):
    return lambda model, x, y, eps, alpha: attacks.pgd(model, x, y, eps, alpha, steps, loss=loss, random_start=True, mode="eval")


def check_counted(counted: str) -> str:
    """``counted`` if it is one of :data:`ROBUST_ACCURACY`, else a UserError naming both."""
    if counted not in ROBUST_ACCURACY:
        raise UserError(f"--robust-accuracy {counted!r} is unknown; expected one of {', '.join(ROBUST_ACCURACY)}")
    return counted


def _autoattack_placeholder(*_args):  # AutoAttack works on the whole set, see autoattack_flags
    raise RuntimeError("AutoAttack is run through autoattack_flags, not per batch")


EVAL_ATTACKS: dict[str, EvalAttack] = {
    a.name: a
    for a in (
        EvalAttack("clean", "no attack", lambda model, x, y, eps, alpha: x),
        EvalAttack("fgsm", "FGSM, one step of eps", lambda model, x, y, eps, alpha: attacks.fgsm(model, x, y, eps, mode="eval"),
                   steps=1, loss="ce"),
        EvalAttack("pgd10", "PGD-10 (CE, random start)", _pgd(10), 10, "ce", True),
        EvalAttack("pgd20", "PGD-20 (CE, random start)", _pgd(20), 20, "ce", True),
        EvalAttack("pgd50", "PGD-50 (CE, random start)", _pgd(50), 50, "ce", True),
        EvalAttack("cw", "C&W-inf: PGD-20 on the C&W margin loss", _pgd(20, "cw"), 20, "cw", True),
        EvalAttack("aa", "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) via pyautoattack", _autoattack_placeholder),
    )
}
DEFAULT_ATTACKS = ("clean", "pgd10", "pgd20", "cw", "aa")


def parse_attacks(names: str | Iterable[str]) -> list[str]:
    """A comma list (or iterable) of attack names -> validated list, duplicates dropped."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for name in names:
        if name not in EVAL_ATTACKS:
            raise UserError(f"attack {name!r} is unknown; expected a comma list of {', '.join(EVAL_ATTACKS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise UserError(f"no attack given; expected a comma list of {', '.join(EVAL_ATTACKS)}")
    return out


def attack_settings(names: Iterable[str], eps: float, alpha: float = 2 / 255,
                    counted: str = "any-iterate") -> dict[str, dict]:
    """What each attack does and how it is counted, for eval.json (eps and step sizes in [0, 1] units)."""
    names = list(names)
    out = {}
    for name in names:
        spec = EVAL_ATTACKS[name]
        if name == "clean":
            out[name] = {"description": spec.description}
        elif name == "aa":
            before = [n for n in names if n in CHEAP_ATTACKS]
            union = (f"union: correct under AutoAttack and under every other attack of this evaluation "
                     f"({', '.join(['clean'] + [n for n in before if n != 'clean'])}); AutoAttack runs only on the "
                     "samples those left unbroken, the others count as broken")
            out[name] = {"description": spec.description, "version": "standard", "norm": "Linf", "eps": eps,
                         "attacks": list(AUTOATTACK_STANDARD),
                         "counted": union if counted == "any-iterate" else "AutoAttack alone, on all samples"}
        else:
            step = eps if name == "fgsm" else alpha
            how = ("any-iterate: broken if the clean input, the start point or any iterate is misclassified"
                   if counted == "any-iterate" else "last-iterate: only the last iterate is judged")
            out[name] = {"description": spec.description, "eps": eps, "step_size": step, "steps": spec.steps,
                         "loss": spec.loss, "random_start": spec.random_start, "counted": how}
    return out


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


def predict(model: nn.Module, x: Tensor, *, batch_size: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """Predicted labels (CPU, long) of ``x``, in batches."""
    return torch.cat([_predict(model, x[s : s + batch_size].to(device)).cpu() for s in range(0, len(x), batch_size)])


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
    aa_warnings: list[str] | None = None,
    counted: str = "any-iterate",
    clean_correct: Tensor | None = None,
) -> Tensor:
    """Per-sample bool (CPU): is the model right on ``attack``'s adversarial example?

    ``counted`` (:data:`ROBUST_ACCURACY`): "any-iterate" counts a sample broken once the
    clean input or any point the attack visits is misclassified, and stops computing on
    it (:func:`dhat_seg.attacks.pgd_any_iterate`); "last-iterate" judges the last iterate
    only. ``clean_correct`` (bool, CPU, one per sample): the shared clean predictions;
    with any-iterate, samples misclassified clean are not attacked (None: computed per
    batch). The model is put in eval mode. ``progress(n)`` is called after every batch of
    n samples (AutoAttack: see :func:`dhat_seg.evaluation.autoattack.autoattack_flags`).
    AutoAttack runs on all of ``x`` here; :func:`flags_for_attacks` picks its subset.
    """
    check_counted(counted)
    model.eval()
    if attack == "aa":
        return autoattack_flags(model, x, y, eps=eps, batch_size=batch_size, device=device, seed=seed,
                                state_path=aa_state_path, progress=progress, warnings_out=aa_warnings)
    if attack not in EVAL_ATTACKS:
        raise UserError(f"attack {attack!r} is unknown; expected one of {', '.join(EVAL_ATTACKS)}")
    spec = EVAL_ATTACKS[attack]
    torch.manual_seed(seed)
    out = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        if attack == "clean" or counted == "last-iterate":
            x_adv = spec.run(model, xb, yb, eps, alpha)
            out.append((_predict(model, x_adv) == yb).cpu())
        else:
            cc = None if clean_correct is None else clean_correct[start : start + batch_size].to(device)
            correct, _ = attacks.pgd_any_iterate(model, xb, yb, eps, eps if attack == "fgsm" else alpha, spec.steps,
                                                 loss=spec.loss, random_start=spec.random_start, clean_correct=cc,
                                                 mode="eval")
            out.append(correct.cpu())
        if progress:
            progress(len(xb))
    return torch.cat(out)


def progress_bar(desc: str, total: int, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr (results go to stdout)."""
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, disable=not enabled or None)


def flags_for_attacks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    names: Iterable[str],
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    aa_examples: int | None = None,
    aa_state_path: AAState = None,
    show_progress: bool = True,
    label: str = "",
    aa_warnings: list[str] | None = None,
    counted: str = "any-iterate",
    clean: Tensor | None = None,
    seconds: dict[str, float] | None = None,
) -> dict[str, Tensor]:
    """Per-sample flags for each attack (in the order of ``names``), one progress bar each.

    The clean predictions are computed once (or given as ``clean``) and shared: with
    any-iterate counting, no attack touches a sample misclassified clean. AutoAttack
    runs last, on the first ``aa_examples`` samples only (None: all; its flags are then
    shorter than the others); with any-iterate, only on those every other attack here
    left unbroken: its flags are the union (right under AutoAttack *and* every other
    attack). ``aa_state_path``: its state file, or a function (subset indices or None
    for all, x, y) -> state file. ``seconds`` receives each attack's wall time.
    """
    names, counted = list(names), check_counted(counted)
    seconds = {} if seconds is None else seconds
    common = dict(eps=eps, alpha=alpha, batch_size=batch_size, device=device, seed=seed, counted=counted)
    if clean is None and ("clean" in names or counted == "any-iterate"):
        t0 = time.time()
        with progress_bar(f"{label}clean", len(x), show_progress) as bar:
            clean = correct_under_attack(model, x, y, "clean", progress=bar.update, **common)
        seconds["clean"] = round(time.time() - t0, 2)
    out: dict[str, Tensor] = {"clean": clean} if "clean" in names else {}
    for name in [n for n in names if n not in ("clean", "aa")]:
        t0 = time.time()
        with progress_bar(f"{label}{name}", len(x), show_progress) as bar:
            out[name] = correct_under_attack(model, x, y, name, progress=bar.update, **common,
                                             clean_correct=clean if counted == "any-iterate" else None)
        seconds[name] = round(time.time() - t0, 2)
    if "aa" in names:
        t0 = time.time()
        n = len(x) if aa_examples is None else min(aa_examples, len(x))
        subset = None
        if counted == "any-iterate":
            unbroken = torch.stack([clean[:n].bool(), *(f[:n].bool() for f in out.values())]).all(dim=0)
            subset = unbroken.nonzero().flatten()
        xs, ys = (x[:n], y[:n]) if subset is None else (x[subset], y[subset])
        flags = torch.zeros(n, dtype=torch.bool)
        if len(xs):
            state = aa_state_path(subset, xs, ys) if callable(aa_state_path) else aa_state_path
            with progress_bar(f"{label}aa", progress_total(len(xs)), show_progress) as bar:
                result = correct_under_attack(model, xs, ys, "aa", aa_state_path=state, progress=bar.update,
                                              aa_warnings=aa_warnings, **common)
            flags = result if subset is None else flags.index_put((subset,), result)
        out["aa"] = flags
        seconds["aa"] = round(time.time() - t0, 2)
    return {name: out[name] for name in names}


# ---------------------------------------------------------------------------------
# Pure summaries of per-sample flags
# ---------------------------------------------------------------------------------


def percent(flags: Tensor) -> float:
    """Accuracy in percent (2 decimals) of a bool per-sample tensor."""
    if flags.numel() == 0:
        raise UserError("cannot compute an accuracy on 0 examples")
    return round(100.0 * flags.float().mean().item(), 2)


def worst_case(flags: Mapping[str, Tensor]) -> tuple[Tensor, int]:
    """Per-sample worst case over all evaluations: right only if right under every one.

    Includes "clean": the zero perturbation is in every attack's eps-ball, so a sample
    misclassified clean counts as broken even if a random-start attack happened to land
    on a correct point. When the flags have different lengths (AutoAttack on a subset),
    the worst case is taken on the common prefix. Returns (flags, n).
    """
    if not flags:
        raise UserError("worst case needs at least one evaluation")
    n = min(len(f) for f in flags.values())
    return torch.stack([f[:n].bool() for f in flags.values()]).all(dim=0), n


def robust_gap(train_flags: Tensor, test_flags: Tensor) -> dict[str, float | int]:
    """Robust Gap (DHAT Table 10): robust accuracy on training samples minus on test
    samples under the same attack, in points. Smaller = better robust generalisation."""
    train_acc, test_acc = percent(train_flags), percent(test_flags)
    return {"train_accuracy": train_acc, "test_accuracy": test_acc, "gap": round(train_acc - test_acc, 2),
            "n_train": len(train_flags), "n_test": len(test_flags)}


def background_gap(same_flags: Tensor, mixed_rand_flags: Tensor) -> dict[str, float | int]:
    """BG-gap (Xiao et al., ICLR 2021): accuracy with training-like backgrounds ("same")
    minus with random backgrounds ("mixed-rand"), in points. It measures how much the
    model relies on the background; 0 = not at all."""
    same, mixed = percent(same_flags), percent(mixed_rand_flags)
    return {"same": same, "mixed_rand": mixed, "gap": round(same - mixed, 2), "n": min(len(same_flags), len(mixed_rand_flags))}


# ---------------------------------------------------------------------------------
# Attention quality
# ---------------------------------------------------------------------------------


def attention_iou(
    attention: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    truth: Tensor,
    *,
    policy: str = "fixed",
    omega: float = 0.1,
    quantile: float = 0.5,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Per-image IoU between an attention method's foreground (after the run's
    threshold policy) and the ground-truth masks ``truth`` (N x H x W bool). CPU float N."""
    from dhat_seg.attention import foreground_iou, foreground_mask

    out = []
    for s in range(0, len(x), batch_size):
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        fg = foreground_mask(attention(xb, yb), policy, omega, quantile)
        out.append(foreground_iou(fg.cpu(), truth[s : s + batch_size]))
        if progress:
            progress(len(xb))
    return torch.cat(out)
