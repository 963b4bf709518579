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

import hashlib
import json
import logging
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dhat_seg import attacks
from dhat_seg.errors import UserError

#: The order in which pyautoattack's standard version runs its attacks.
AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
#: The pyautoattack minor version dhat-seg is tested with: it reads and writes that
#: version's private state keys (see :func:`_read_aa_state`). Same range as pyproject.toml.
AUTOATTACK_MINOR = (0, 2)
AUTOATTACK_SUPPORTED = f">={AUTOATTACK_MINOR[0]}.{AUTOATTACK_MINOR[1]},<{AUTOATTACK_MINOR[0]}.{AUTOATTACK_MINOR[1] + 1}"


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


def attack_settings(names: Iterable[str], eps: float, alpha: float = 2 / 255) -> dict[str, dict]:
    """What each attack does, for eval.json (eps and step sizes in [0, 1] units)."""
    out = {}
    for name in names:
        spec = EVAL_ATTACKS[name]
        if name == "clean":
            out[name] = {"description": spec.description}
        elif name == "aa":
            out[name] = {"description": spec.description, "version": "standard", "norm": "Linf", "eps": eps,
                         "attacks": list(AUTOATTACK_STANDARD)}
        else:
            step = eps if name == "fgsm" else alpha
            out[name] = {"description": spec.description, "eps": eps, "step_size": step, "steps": spec.steps,
                         "loss": spec.loss, "random_start": spec.random_start}
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
) -> Tensor:
    """Per-sample bool (CPU): is the model right on ``attack``'s adversarial example?

    The model is put in eval mode. ``progress(n)`` is called after every batch of n
    samples (for AutoAttack: with 1 per finished sub-attack, see :func:`autoattack_flags`).
    """
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
        x_adv = spec.run(model, xb, yb, eps, alpha)
        out.append((_predict(model, x_adv) == yb).cpu())
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
    aa_state_path: Path | None = None,
    show_progress: bool = True,
    label: str = "",
    aa_warnings: list[str] | None = None,
) -> dict[str, Tensor]:
    """Per-sample flags for each attack, with one progress bar per attack.

    AutoAttack runs on the first ``aa_examples`` samples only (None: all); its flags
    are then shorter than the others.
    """
    out: dict[str, Tensor] = {}
    for name in names:
        n = len(x) if name != "aa" or aa_examples is None else min(aa_examples, len(x))
        total = len(AUTOATTACK_STANDARD) if name == "aa" else n  # AutoAttack ticks per sub-attack
        with progress_bar(f"{label}{name}", total, show_progress) as bar:
            out[name] = correct_under_attack(model, x[:n], y[:n], name, eps=eps, alpha=alpha, batch_size=batch_size,
                                             device=device, seed=seed, aa_state_path=aa_state_path, progress=bar.update,
                                             aa_warnings=aa_warnings)
    return out


# ---------------------------------------------------------------------------------
# AutoAttack (pyautoattack), resumable
# ---------------------------------------------------------------------------------


class _AutoAttackLog(logging.Handler):
    """Turns pyautoattack's log lines into progress and collects its warnings.

    pyautoattack logs "running <attack>" and "robust accuracy after <ATTACK>: ..." at
    DEBUG level; its sanity checks (randomness, output range, ...) at WARNING.
    """

    def __init__(self, progress: Callable[[int], None] | None):
        super().__init__(logging.DEBUG)
        self.progress, self.warnings = progress, []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings.append(msg)
        elif msg.startswith("robust accuracy after") and self.progress:
            self.progress(1)  # one finished sub-attack


def _installed_autoattack_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("pyautoattack")
    except md.PackageNotFoundError:
        return None


def check_autoattack_version() -> str:
    """The installed pyautoattack version; a UserError unless it is in :data:`AUTOATTACK_SUPPORTED`."""
    version = _installed_autoattack_version()
    install = f"pip install 'pyautoattack{AUTOATTACK_SUPPORTED}'"
    if version is None:
        raise UserError(f"pyautoattack is not installed; AutoAttack needs pyautoattack{AUTOATTACK_SUPPORTED} ({install})")
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m or (int(m[1]), int(m[2])) != AUTOATTACK_MINOR:
        raise UserError(f"pyautoattack {version} is installed, but dhat-seg supports pyautoattack{AUTOATTACK_SUPPORTED} only "
                        f"(it resumes AutoAttack from that version's state file); {install}")
    return version


def autoattack_state_file(folder: Path, split: str, x: Tensor, y: Tensor, *, eps: float, seed: int, weights_sha: str) -> Path:
    """The state file of one AutoAttack evaluation, named by everything that changes its
    result: the weights, the exact samples (sha256 of the image and label bytes), n, eps,
    norm, version, seed and pyautoattack's version. A state of other samples, even of
    the same number, has another name and is never continued."""
    h = hashlib.sha256(json.dumps([weights_sha, len(x), eps, "Linf", "standard", seed, _installed_autoattack_version()]).encode())
    for t in (x, y):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return Path(folder) / f"{split}-n{len(x)}-{h.hexdigest()[:16]}.json"


def _read_aa_state(path: Path, n: int) -> tuple[Tensor, list[str]]:
    """(robust flags, attacks already run) from a pyautoattack state file."""
    try:
        data = json.loads(path.read_text())
        flags = torch.tensor(data["_robust_flags"], dtype=torch.bool)
        done = [a for a in AUTOATTACK_STANDARD if a in set(data.get("_run_attacks") or [])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"AutoAttack state file {str(path)!r} is unreadable ({exc}); delete it to start AutoAttack afresh") from None
    if flags.ndim != 1 or len(flags) != n:
        raise UserError(f"AutoAttack state file {str(path)!r} is for {len(flags)} examples, not {n}; delete it or use another --n-examples")
    return flags, done


def _write_aa_state(path: Path, flags: Tensor, done: list[str]) -> None:
    """Record a finished (merged) evaluation in pyautoattack's state format."""
    data = json.loads(path.read_text())
    data["_robust_flags"] = flags.tolist()
    data["_run_attacks"] = list(done)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)


def _autoattack_resumable(adversary, x: Tensor, y: Tensor, path: Path, todo: list[str], batch_size: int,
                          progress: Callable[[int], None] | None) -> Tensor:
    """Robust flags after the attacks ``todo``, continuing the state in ``path`` if any.

    pyautoattack 0.2.0 cannot continue from its own state file: the attack set is
    stored as a string, so ``run_standard_evaluation(state_path=...)`` rejects every
    existing state, and on the restore path ``y_adv`` would be unbound. The state file
    does hold what is needed (the per-sample robust flags and the attacks already run),
    so the remaining attacks run as a *fresh* pyautoattack evaluation on the samples
    that are still robust, with their own state file (itself resumable the same way),
    and the flags are merged back. Restored or not, the flags come from the state, not
    from the returned adversarial examples (which cover only the current run).
    """
    if path.exists():
        flags, done = _read_aa_state(path, len(x))
        remaining = [a for a in todo if a not in done]
        rest = path.with_name(path.stem + "-rest" + path.suffix)
        if remaining:
            if progress:
                progress(len(todo) - len(remaining))
            idx = flags.nonzero().flatten()
            if len(idx):
                flags = flags.clone()
                flags[idx] = _autoattack_resumable(adversary, x[idx], y[idx], rest, remaining, batch_size, progress)
            _write_aa_state(path, flags, [a for a in AUTOATTACK_STANDARD if a in todo])
        rest.unlink(missing_ok=True)
        return flags
    adversary.attacks_to_run = list(todo)
    adversary.run_standard_evaluation(x, y, batch_size=batch_size, state_path=path)
    flags, _ = _read_aa_state(path, len(x))
    return flags


def autoattack_flags(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    state_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
    warnings_out: list[str] | None = None,
) -> Tensor:
    """Per-sample robust flags under standard AutoAttack (Croce & Hein 2020), L_inf.

    Runs pyautoattack's ``AutoAttack(version='standard')`` on the bare model in eval
    mode. With ``state_path``, an interrupted evaluation continues where it stopped
    (see :func:`_autoattack_resumable`); without, a temporary state file is used.
    ``progress(k)`` is called with k = the number of finished sub-attacks (of 4).
    ``warnings_out`` collects pyautoattack's warnings (e.g. "the model seems randomised").
    ``state_path`` must belong to these samples and settings: see :func:`autoattack_state_file`.
    """
    check_autoattack_version()
    from pyautoattack import AutoAttack

    model.eval()
    x, y = x.detach().cpu(), y.detach().cpu()  # pyautoattack moves batches to `device` itself
    logger = logging.getLogger("auto-attack")
    saved = (logger.level, logger.propagate)
    handler = _AutoAttackLog(progress)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        adversary = AutoAttack(model, eps=eps, norm="Linf", version="standard", device=device, seed=seed)
        adversary.verbose = True  # needed for the progress log lines; they go to the handler only
        todo = list(AUTOATTACK_STANDARD)
        if state_path is None:
            with tempfile.TemporaryDirectory(prefix="dhat-seg-aa-") as tmp:
                return _autoattack_resumable(adversary, x, y, Path(tmp) / "aa_state.json", todo, batch_size, progress)
        state_path = Path(state_path).absolute()
        state_path.parent.mkdir(parents=True, exist_ok=True)
        return _autoattack_resumable(adversary, x, y, state_path, todo, batch_size, progress)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if warnings_out is not None:
            warnings_out.extend(handler.warnings)


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
