"""AutoAttack (standard version, pyautoattack) for ``dhat-seg eval``: resumable, with
per-batch progress.

pyautoattack runs its four sub-attacks in turn, each in batches over the samples still
robust. dhat-seg drives it through its log lines: each finished batch advances the
progress bar by its samples, each finished sub-attack by the samples it skipped
(already broken), so the bar's honest total is ``4 x n`` sample-attacks
(:func:`progress_total`). Its state file is continued only for exactly the same samples
(:func:`autoattack_state_file`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from dhat_seg.errors import UserError

#: The order in which pyautoattack's standard version runs its attacks.
AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
#: The pyautoattack minor version dhat-seg is tested with: it reads and writes that
#: version's private state keys (see :func:`_read_aa_state`). Same range as pyproject.toml.
AUTOATTACK_MINOR = (0, 2)
AUTOATTACK_SUPPORTED = f">={AUTOATTACK_MINOR[0]}.{AUTOATTACK_MINOR[1]},<{AUTOATTACK_MINOR[0]}.{AUTOATTACK_MINOR[1] + 1}"


class _AutoAttackLog(logging.Handler):
    """Turns pyautoattack's log lines into progress and collects its warnings.

    pyautoattack logs at DEBUG level "<attack> - <b>/<batches> - <k> out of <m> successfully
    perturbed" after each batch and "robust accuracy after <ATTACK>: ..." after each
    sub-attack; its sanity checks (randomness, output range, ...) at WARNING. Progress
    counts sample-attacks: a batch advances by its m samples, a finished sub-attack by the
    samples of the run it did not attack (broken before), :meth:`finish` by the rest (the
    sub-attacks skipped when no robust sample is left); one run of n samples and k
    sub-attacks thus advances by exactly n x k.
    """

    _BATCH = re.compile(r"^\S+ - \d+/\d+ - \d+ out of (\d+) successfully perturbed")

    def __init__(self, progress: Callable[[int], None] | None):
        super().__init__(logging.DEBUG)
        self.progress, self.warnings = progress, []
        self.n = self.left = self.attacked = 0

    def advance(self, k: int) -> None:
        k = min(k, self.left)
        if k > 0 and self.progress:
            self.progress(k)
        self.left -= max(k, 0)

    def begin(self, n: int, attacks: int) -> None:
        """A pyautoattack run on n samples with ``attacks`` sub-attacks starts."""
        self.n, self.left, self.attacked = n, n * attacks, 0

    def finish(self) -> None:
        """The run ended: the sub-attacks it skipped count as done."""
        self.advance(self.left)

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings.append(msg)
        elif m := self._BATCH.match(msg):
            self.attacked += int(m[1])
            self.advance(int(m[1]))  # one batch of one sub-attack
        elif msg.startswith("robust accuracy after"):
            self.advance(self.n - self.attacked)  # the samples this sub-attack skipped
            self.attacked = 0


def progress_total(n: int) -> int:
    """The progress total of AutoAttack on n samples: n x 4 sub-attacks (see :class:`_AutoAttackLog`)."""
    return n * len(AUTOATTACK_STANDARD)


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


def autoattack_state_file(folder: Path, split: str, x: Tensor, y: Tensor, *, eps: float, seed: int, weights_sha: str,
                          subset: Tensor | None = None) -> Path:
    """The state file of one AutoAttack evaluation, named by everything that changes its
    result: the weights, the exact samples (sha256 of the image and label bytes), n, eps,
    norm, version, seed and pyautoattack's version. A state of other samples, even of
    the same number, has another name and is never continued.

    ``subset``: the indices (into the split's first samples) of the samples AutoAttack
    attacks, when it runs on those left unbroken by the cheaper attacks; ``x``/``y`` are
    then those samples, and the indices enter the name too ("-of" marks a subset).
    """
    key = [weights_sha, len(x), eps, "Linf", "standard", seed, _installed_autoattack_version()]
    if subset is not None:
        key.append(["subset", [int(i) for i in subset.tolist()]])
    h = hashlib.sha256(json.dumps(key).encode())
    for t in (x, y):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return Path(folder) / f"{split}-n{len(x)}{'-subset' if subset is not None else ''}-{h.hexdigest()[:16]}.json"


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
                          log: _AutoAttackLog) -> Tensor:
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
        idx = flags.nonzero().flatten()
        log.begin(len(x), len(todo))  # restored: the attacks done, and the samples broken for the rest
        log.advance(len(x) * (len(todo) - len(remaining)) + (len(x) - len(idx)) * len(remaining))
        if remaining:
            if len(idx):
                flags = flags.clone()
                flags[idx] = _autoattack_resumable(adversary, x[idx], y[idx], rest, remaining, batch_size, log)
            _write_aa_state(path, flags, [a for a in AUTOATTACK_STANDARD if a in todo])
        rest.unlink(missing_ok=True)
        return flags
    adversary.attacks_to_run = list(todo)
    log.begin(len(x), len(todo))
    adversary.run_standard_evaluation(x, y, batch_size=batch_size, state_path=path)
    log.finish()
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
    ``progress(k)`` is called after each batch of each sub-attack, with k samples; in all
    with :func:`progress_total` (n x 4) sample-attacks, samples broken earlier included.
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
                return _autoattack_resumable(adversary, x, y, Path(tmp) / "aa_state.json", todo, batch_size, handler)
        state_path = Path(state_path).absolute()
        state_path.parent.mkdir(parents=True, exist_ok=True)
        return _autoattack_resumable(adversary, x, y, state_path, todo, batch_size, handler)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if warnings_out is not None:
            warnings_out.extend(handler.warnings)

