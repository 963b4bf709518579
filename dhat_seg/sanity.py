"""Gradient-masking sanity checks (``dhat-seg eval --sanity``).

A defence can look robust because its gradients are useless to the attacker rather
than because it is robust ("obfuscated gradients", Athalye, Carlini & Wagner, ICML
2018). PART (appendix H.3) and FSR (supplementary section 3) rule this out with the
same behavioural checks, which dhat-seg runs on a trained model, each pass/fail:

1. iterative attacks beat single-step ones: accuracy under PGD-20 <= under FGSM;
2. robustness falls as the budget grows: PGD-20 accuracy at eps = 2, 4, 8, 16/255 is
   non-increasing (up to a small tolerance for sampling noise);
3. unbounded attacks succeed: PGD-20 with eps = 255/255 leaves at most 1% accuracy;
4. white-box attacks beat transfer attacks: PGD-20 crafted on an independently trained
   surrogate and replayed on the model is weaker than PGD-20 on the model itself;
5. random sampling does not find adversarial examples that PGD misses (PART H.3 iv):
   of the samples PGD-20 does not break, random points in the eps-ball break (almost) none.

The pass/fail rules are pure functions of accuracies (``check_*``); :func:`run_checks`
measures the accuracies.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg import attacks, evaluate

#: Budgets of the eps sweep (check 2), in 1/255 units.
EPS_SWEEP = (2.0, 4.0, 8.0, 16.0)
#: Accuracy (percent) an unbounded attack may leave (check 3).
UNBOUNDED_MAX_ACC = 1.0
#: Slack (points) for "non-increasing" in the eps sweep: PGD with random starts is a
#: random estimate, so a larger budget can score a hair higher by chance.
MONOTONE_TOLERANCE = 1.0
#: Random points per sample for check 5 (PART used 100; 20 keep it cheap).
RANDOM_SAMPLES = 20
#: Fraction (percent) of PGD-robust samples random sampling may break (check 5).
RANDOM_MAX_BROKEN = 1.0


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------
# Pass/fail rules (pure)
# ---------------------------------------------------------------------------------


def check_iterative_beats_single_step(fgsm_acc: float, pgd_acc: float) -> CheckResult:
    """Athalye et al. 2018 sec. 3.1 / PART H.3 (i): iterative PGD must be at least as
    strong as single-step FGSM; otherwise gradients mislead the iterative attack."""
    ok = pgd_acc <= fgsm_acc
    return CheckResult("iterative beats single-step", ok, f"PGD-20 {pgd_acc:.2f}% {'<=' if ok else '>'} FGSM {fgsm_acc:.2f}%",
                       {"fgsm": fgsm_acc, "pgd20": pgd_acc})


def check_monotone_in_eps(acc_by_eps: Mapping[float, float], tolerance: float = MONOTONE_TOLERANCE) -> CheckResult:
    """FSR sec. 3 (iii) / PART H.3 (v): accuracy must not rise with the budget (each
    step may rise by at most ``tolerance`` points)."""
    eps = sorted(acc_by_eps)
    rises = [(a, b) for a, b in zip(eps, eps[1:]) if acc_by_eps[b] > acc_by_eps[a] + tolerance]
    curve = ", ".join(f"{e:g}/255: {acc_by_eps[e]:.2f}%" for e in eps)
    detail = curve if not rises else f"{curve}; rises from {rises[0][0]:g} to {rises[0][1]:g}/255"
    return CheckResult("robustness falls as eps grows", not rises, detail,
                       {"accuracy_by_eps": {f"{e:g}": acc_by_eps[e] for e in eps}, "tolerance": tolerance})


def check_unbounded(acc: float, max_acc: float = UNBOUNDED_MAX_ACC) -> CheckResult:
    """FSR sec. 3 (iii) / PART H.3 (iii): an unbounded attack (eps = 1) must reach
    (nearly) 100% success; anything else means the attack is not really following
    the gradient."""
    ok = acc <= max_acc
    return CheckResult("unbounded attack succeeds", ok, f"PGD-20 at eps 255/255: {acc:.2f}% ({'<=' if ok else '>'} {max_acc:g}%)",
                       {"accuracy": acc, "max_accuracy": max_acc})


def check_white_box_beats_transfer(white_acc: float, transfer_acc: float) -> CheckResult:
    """FSR sec. 3 (i) / PART H.3 (ii): attacks that see the model's gradients must be
    at least as strong as attacks transferred from a surrogate model."""
    ok = white_acc <= transfer_acc
    return CheckResult("white-box beats transfer", ok,
                       f"white-box PGD-20 {white_acc:.2f}% {'<=' if ok else '>'} transfer PGD-20 {transfer_acc:.2f}%",
                       {"white_box": white_acc, "transfer": transfer_acc})


def check_random_sampling(n_pgd_robust: int, n_broken_by_noise: int, max_broken: float = RANDOM_MAX_BROKEN) -> CheckResult:
    """PART H.3 (iv): random points in the eps-ball must not break samples that PGD
    could not break (at most ``max_broken`` percent of them)."""
    share = 100.0 * n_broken_by_noise / n_pgd_robust if n_pgd_robust else 0.0
    ok = share <= max_broken
    return CheckResult("random sampling finds nothing PGD misses", ok,
                       f"{n_broken_by_noise} of {n_pgd_robust} PGD-robust samples broken by random noise ({share:.2f}%)",
                       {"pgd_robust": n_pgd_robust, "broken_by_noise": n_broken_by_noise, "max_percent": max_broken})


# ---------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------


def sweep_step_size(eps: float, steps: int) -> float:
    """Step size of the eps sweep: the protocol's 2/255, or 2.5 eps / steps when that is
    larger (Madry et al. 2018), so that 20 steps can reach the edge of any ball."""
    return max(2 / 255, 2.5 * eps / steps)


def _pgd_flags(model, x, y, eps, alpha, steps, batch_size, device, seed, source=None) -> Tensor:
    """Per-sample flags of ``model`` on PGD examples crafted on ``source`` (default: the model)."""
    source = source if source is not None else model
    torch.manual_seed(seed)
    out = []
    for s in range(0, len(x), batch_size):
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        x_adv = attacks.pgd(source, xb, yb, eps, alpha, steps, random_start=True, mode="eval")
        with torch.no_grad():
            out.append((model(x_adv).argmax(1) == yb).cpu())
    return torch.cat(out)


@torch.no_grad()
def _broken_by_noise(model, x, y, eps, samples, batch_size, device, seed) -> Tensor:
    """Per-sample: does any of ``samples`` uniform points in the eps-ball fool the model?"""
    g = torch.Generator(device="cpu").manual_seed(seed)
    broken = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(samples):
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size]
            noise = (torch.rand(xb.shape, generator=g) * 2 - 1) * eps
            pred = model((xb + noise).clamp(0, 1).to(device)).argmax(1).cpu()
            broken[s : s + batch_size] |= pred != y[s : s + batch_size]
    return broken


def run_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    surrogate: nn.Module | None,
    num_classes: int = 10,
    eps: float = 8 / 255,
    steps: int = 20,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    show_progress: bool = True,
) -> list[CheckResult]:
    """Run the five checks on (x, y). ``surrogate=None`` skips the transfer check."""
    model.eval()
    pct = evaluate.percent
    kw = dict(batch_size=batch_size, device=device, seed=seed)
    n_steps = 4 + len(EPS_SWEEP) + (1 if surrogate is not None else 0)
    with evaluate.progress_bar("sanity checks", n_steps, show_progress) as bar:
        fgsm = evaluate.correct_under_attack(model, x, y, "fgsm", eps=eps, **kw)
        bar.update()
        pgd = _pgd_flags(model, x, y, eps, 2 / 255, steps, **kw)
        bar.update()
        results = [check_iterative_beats_single_step(pct(fgsm), pct(pgd))]
        sweep = {}
        for e in EPS_SWEEP:
            sweep[e] = pct(_pgd_flags(model, x, y, e / 255, sweep_step_size(e / 255, steps), steps, **kw))
            bar.update()
        results.append(check_monotone_in_eps(sweep))
        results.append(check_unbounded(pct(_pgd_flags(model, x, y, 1.0, sweep_step_size(1.0, steps), steps, **kw))))
        bar.update()
        if surrogate is not None:
            surrogate.eval()
            transfer = _pgd_flags(model, x, y, eps, 2 / 255, steps, source=surrogate, **kw)
            results.append(check_white_box_beats_transfer(pct(pgd), pct(transfer)))
            bar.update()
        noise = _broken_by_noise(model, x, y, eps, RANDOM_SAMPLES, batch_size, device, seed)
        results.append(check_random_sampling(int(pgd.sum()), int((noise & pgd).sum())))
        bar.update()
    return results


# ---------------------------------------------------------------------------------
# Surrogate for the transfer check
# ---------------------------------------------------------------------------------


def train_surrogate(dataset, num_classes: int, *, epochs: int = 3, n: int = 4000, batch_size: int = 128, lr: float = 0.05,
                    device: torch.device | str = "cpu", seed: int = 0) -> nn.Module:
    """A small_cnn trained normally (clean CE, SGD) for a few epochs on the first ``n``
    samples of ``dataset``, initialised independently of the model under test."""
    from dhat_seg.models import create_model
    from dhat_seg.data import channel_stats

    gen = torch.Generator().manual_seed(seed + 12345)
    x, y = evaluate.collect(dataset, n)
    mean, std = channel_stats(dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 12345)
        model = create_model("small_cnn", num_classes, mean, std).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def surrogate_for(cfg, model: nn.Module, device, *, cache_dir: str | Path | None = None,
                  log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> tuple[nn.Module, str]:
    """The transfer-check surrogate for a run: its normally trained attention model when
    one exists (given, or in the cache), else a small_cnn trained here for 3 epochs."""
    from dhat_seg.attention_model import cache_root, find_attention_model, frozen
    from dhat_seg.checkpoint import load_weights
    from dhat_seg.data import split_for

    train_ds = split_for(cfg, "train")
    path = find_attention_model(cfg, train_ds.fingerprint(), cache_root(cache_dir))
    if path is not None:
        return frozen(load_weights(path), torch.device(device)), f"normally trained attention model {path}"
    log("sanity: no attention model in the cache; training a small_cnn surrogate for 3 epochs for the transfer check")
    surrogate = train_surrogate(train_ds, train_ds.num_classes, device=device, seed=cfg.seed)
    return surrogate, "small_cnn trained normally for 3 epochs on up to 4000 training samples"
