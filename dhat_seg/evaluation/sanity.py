"""Gradient-masking sanity checks (``dhat-seg eval --sanity``).

A defence can look robust because its gradients are useless to the attacker rather
than because it is robust ("obfuscated gradients", Athalye, Carlini & Wagner, ICML
2018). PART (appendix H.3) and FSR (supplementary section 3) rule this out with the
same behavioural checks, which dhat-seg runs on a trained model:

1. iterative attacks beat single-step ones: PGD-20 is at least as strong as FGSM;
2. robustness falls as the budget grows: PGD-20 at eps = 2, 4, 8, 16/255 does not get
   weaker as eps grows;
3. unbounded attacks succeed: PGD-20 with eps = 255/255 leaves at most 1% accuracy;
4. white-box attacks beat transfer attacks: PGD-20 crafted on an independently trained
   surrogate and replayed on the model is not stronger than PGD-20 on the model itself;
5. random sampling does not find adversarial examples that PGD misses (PART H.3 iv):
   of the samples PGD-20 does not break, random points in the eps-ball break (almost) none.

Checks 1, 2, 4 and 5 are statistical tests on per-sample outcomes: each states a null
hypothesis that a healthy (unmasked) model satisfies and fails only when an exact
one-sided binomial test rejects it at ``alpha`` = :data:`ALPHA` (0.01), so that one or
two samples of sampling noise do not make a model suspect. Checks 1, 2 and 4 compare two
attacks on the same samples with the exact sign (McNemar) test on the samples that
exactly one of them breaks; check 5 tests the share of PGD-robust samples broken by
noise against :data:`NOISE_P0`. Check 3 is deterministic. Under their nulls the four
tests together flag a healthy model with probability at most 4 x 0.01 = 0.04 (union
bound); a model well inside the nulls, far less. Each result carries its null, alpha,
p0, the counts and the p-value (``eval.json``, ``sanity.checks``).

The rules are pure functions of per-sample outcomes (``check_*``), the statistics pure
functions of counts (:mod:`dhat_seg.evaluation.binomial`); :func:`run_checks` measures the outcomes.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg import attacks
from dhat_seg.evaluation import evaluate
from dhat_seg.evaluation.binomial import binomial_power, binomial_tail, critical_count, format_p, samples_for_power

#: Budgets of the eps sweep (check 2), in 1/255 units.
EPS_SWEEP = (2.0, 4.0, 8.0, 16.0)
#: Accuracy (percent) an unbounded attack may leave (check 3).
UNBOUNDED_MAX_ACC = 1.0
#: Random points per sample for check 5 (PART used 100; 20 keep it cheap).
RANDOM_SAMPLES = 20
#: Significance level of every statistical check: a check fails when its p-value is <= ALPHA.
ALPHA = 0.01
#: p0 of the paired checks (1, 2, 4): of the samples exactly one of two attacks breaks,
#: the one that should be weaker breaks each with probability <= 1/2 (equal strength is
#: the boundary of "at least as strong").
SIGN_P0 = 0.5
#: p0 of the noise check (5): random noise breaks at most 2% of the PGD-robust samples.
#: Healthy quick runs showed about 1.5%: 8 samples broken by noise of roughly 540
#: PGD-robust ones (counted from the rows' PGD accuracies) over the twelve compare rows of
#: docs/results-generator-v1.md (likely boundary samples: PGD kept its last iterate then; any-iterate
#: counting, the default now, counts such samples broken), so
#: 2% bounds the healthy rate while a masking effect of 5% stands clearly above it.
NOISE_P0 = 0.02
#: The masking effect the noise check must detect (share of PGD-robust samples broken by
#: noise), and the power it must detect it with (:func:`robust_samples_needed`).
MASKING_EFFECT = 0.05
TARGET_POWER = 0.8
#: How a check decides (eval.json's ``sanity.rule``).
RULE = (f"a check fails when its exact one-sided binomial test rejects its null at alpha = {ALPHA:g} "
        "(p-value <= alpha); the unbounded-attack check is deterministic")



def robust_samples_needed(p0: float = NOISE_P0, effect: float = MASKING_EFFECT, alpha: float = ALPHA,
                          power: float = TARGET_POWER) -> int:
    """PGD-robust samples the noise check needs to detect ``effect`` (the share broken by
    noise under masking) with ``power``: 383 for p0 2%, effect 5%, alpha 0.01, power 0.8
    (:func:`dhat_seg.evaluation.binomial.samples_for_power`). The sanity set must hold this many
    divided by the model's PGD-20 accuracy: about 1000 samples at 40%."""
    return samples_for_power(p0, effect, alpha, power)


# ---------------------------------------------------------------------------------
# Pass/fail rules (pure)
# ---------------------------------------------------------------------------------


@dataclass
class CheckResult:
    """One check. ``count`` of ``trials`` is the evidence the test weighs (e.g. PGD-robust
    samples broken by noise, of the PGD-robust samples), ``p_value`` its exact one-sided
    p-value under ``null`` (None for a deterministic check); the check fails when
    ``p_value <= alpha``."""

    name: str
    passed: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)
    null: str = ""
    alpha: float | None = None
    p0: float | None = None
    count: int | None = None
    trials: int | None = None
    p_value: float | None = None

    @property
    def evidence(self) -> str:
        """"4 of 48, p = 0.003" (a test), "3 of 48 still correct" (the unbounded check), or ""."""
        return evidence(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evidence(check: Mapping[str, Any]) -> str:
    """The counts and p-value of one check entry (eval.json's ``sanity.checks``), e.g.
    "4 of 48, p = 0.003"; for the deterministic unbounded check (no p-value) the samples
    still correct, "3 of 48 still correct"; "" for entries written before the checks
    were tests."""
    if check.get("count") is None or check.get("trials") is None:
        return ""
    counts = f"{check['count']} of {check['trials']}"
    return f"{counts} still correct" if check.get("p_value") is None else f"{counts}, p = {format_p(check['p_value'])}"


def _flags(correct: Tensor | Sequence[bool]) -> Tensor:
    return torch.as_tensor(correct, dtype=torch.bool).flatten().cpu()


def _pct(flags: Tensor) -> float:
    """Accuracy in percent, 2 decimals (as :func:`dhat_seg.evaluation.evaluate.percent`); 0 without samples."""
    return round(100.0 * float(flags.float().mean()), 2) if len(flags) else 0.0


def _paired(weaker: Tensor, stronger: Tensor) -> tuple[int, int]:
    """(samples only the supposedly weaker attack breaks, samples only the stronger one
    breaks), from per-sample "still correct" flags."""
    return int((~weaker & stronger).sum()), int((weaker & ~stronger).sum())


def _sign_test(name: str, weaker_name: str, stronger_name: str, weaker: Tensor, stronger: Tensor, alpha: float,
               values: dict[str, Any], keys: tuple[str, str]) -> CheckResult:
    """The paired rule of checks 1 and 4: exact sign test on the discordant samples
    (``keys``: the ``values`` names of the weaker-only and stronger-only counts)."""
    if len(weaker) != len(stronger):
        raise ValueError(f"{name}: {len(weaker)} and {len(stronger)} samples; expected the same samples for both attacks")
    weaker_only, stronger_only = _paired(weaker, stronger)
    trials = weaker_only + stronger_only
    p = binomial_tail(weaker_only, trials, SIGN_P0)
    ok = p > alpha
    detail = (f"{stronger_name} {_pct(stronger):.2f}%, {weaker_name} {_pct(weaker):.2f}% (n={len(weaker)}); "
              f"{weaker_name} alone broke {weaker_only} and {stronger_name} alone {stronger_only} samples; "
              f"sign test p = {format_p(p)} ({'>' if ok else '<='} {alpha:g})")
    null = (f"{stronger_name} is at least as strong as {weaker_name}: of the samples exactly one of them breaks, "
            f"{weaker_name} is the one with probability <= 1/2")
    return CheckResult(name, ok, detail, {**values, "n": len(weaker), keys[0]: weaker_only, keys[1]: stronger_only},
                       null=null, alpha=alpha, p0=SIGN_P0, count=weaker_only, trials=trials, p_value=p)


def check_iterative_beats_single_step(fgsm_correct: Tensor | Sequence[bool], pgd_correct: Tensor | Sequence[bool], *,
                                      alpha: float = ALPHA) -> CheckResult:
    """Athalye et al. 2018 sec. 3.1 / PART H.3 (i): iterative PGD must be at least as
    strong as single-step FGSM; otherwise gradients mislead the iterative attack.

    Arguments: per-sample "still correct" flags under FGSM and PGD-20 on the same samples.
    Null: PGD-20 is at least as strong as FGSM. Test: exact one-sided sign (McNemar) test
    on the samples exactly one attack breaks, p0 = 1/2 (equal strength is the null's
    boundary, so no rate needs to be guessed); fails when FGSM alone breaks improbably many.
    """
    fgsm, pgd = _flags(fgsm_correct), _flags(pgd_correct)
    return _sign_test("iterative beats single-step", "FGSM", "PGD-20", fgsm, pgd, alpha,
                      {"fgsm": _pct(fgsm), "pgd20": _pct(pgd)}, ("broken_by_fgsm_only", "broken_by_pgd20_only"))


def check_monotone_in_eps(correct_by_eps: Mapping[float, Tensor | Sequence[bool]], *, alpha: float = ALPHA) -> CheckResult:
    """FSR sec. 3 (iii) / PART H.3 (v): robustness must not rise with the budget.

    Arguments: per-sample "still correct" flags of PGD-20 at each eps (1/255 units), on
    the same samples. Null: at every step of the sweep the larger budget is at least as
    strong as the smaller one. Test: per adjacent pair, the exact sign test of check 1
    (p0 = 1/2) on the samples exactly one of the two budgets breaks; Bonferroni over the
    pairs (the check's p-value is the smallest pair p-value times the number of pairs,
    at most 1), so the check as a whole keeps ``alpha``. Count and trials are those of
    the pair with the smallest p-value.
    """
    eps = sorted(correct_by_eps)
    flags = {e: _flags(correct_by_eps[e]) for e in eps}
    if len({len(f) for f in flags.values()}) > 1:
        raise ValueError("robustness falls as eps grows: the budgets were evaluated on different samples")
    pairs = []
    for a, b in zip(eps, eps[1:]):
        smaller_only, larger_only = _paired(flags[a], flags[b])
        pairs.append({"from": f"{a:g}", "to": f"{b:g}", "smaller_only": smaller_only, "larger_only": larger_only,
                      "p_value": binomial_tail(smaller_only, smaller_only + larger_only, SIGN_P0)})
    worst = min(pairs, key=lambda q: q["p_value"]) if pairs else None
    p = min(1.0, worst["p_value"] * len(pairs)) if worst else 1.0
    ok = p > alpha
    curve = ", ".join(f"{e:g}/255: {_pct(flags[e]):.2f}%" for e in eps)
    detail = curve
    if worst:
        detail += (f"; weakest step {worst['from']} -> {worst['to']}/255: the smaller budget alone broke "
                   f"{worst['smaller_only']}, the larger alone {worst['larger_only']} samples; sign test p = "
                   f"{format_p(p)} (Bonferroni over {len(pairs)} steps; {'>' if ok else '<='} {alpha:g})")
    null = ("PGD-20 with a larger eps is at least as strong as with the next smaller one: of the samples exactly "
            "one of the two breaks, the smaller budget is the one with probability <= 1/2 (every step)")
    return CheckResult("robustness falls as eps grows", ok, detail,
                       {"accuracy_by_eps": {f"{e:g}": _pct(flags[e]) for e in eps}, "n": len(flags[eps[0]]) if eps else 0,
                        "steps": pairs, "correction": "bonferroni"},
                       null=null, alpha=alpha, p0=SIGN_P0, count=worst["smaller_only"] if worst else 0,
                       trials=worst["smaller_only"] + worst["larger_only"] if worst else 0, p_value=p)


def check_unbounded(correct: Tensor | Sequence[bool], max_acc: float = UNBOUNDED_MAX_ACC) -> CheckResult:
    """FSR sec. 3 (iii) / PART H.3 (iii): an unbounded attack (eps = 1) must reach
    (nearly) 100% success; anything else means the attack is not really following
    the gradient.

    Arguments: per-sample "still correct" flags under PGD-20 at eps = 255/255.
    Deterministic (no null, no p-value): any image is in reach, so a gradient that
    leads anywhere breaks every sample; ``max_acc`` percent are allowed for the 20-step
    limit. Count = samples still correct, of all.
    """
    flags = _flags(correct)
    acc, kept = _pct(flags), int(flags.sum())
    ok = acc <= max_acc
    return CheckResult("unbounded attack succeeds", ok,
                       f"PGD-20 at eps 255/255: {acc:.2f}% ({kept} of {len(flags)} still correct; "
                       f"{'<=' if ok else '>'} {max_acc:g}%)",
                       {"accuracy": acc, "max_accuracy": max_acc, "n": len(flags)},
                       null=f"deterministic: at most {max_acc:g}% of the samples survive an unbounded attack",
                       count=kept, trials=len(flags))


def check_white_box_beats_transfer(white_correct: Tensor | Sequence[bool], transfer_correct: Tensor | Sequence[bool], *,
                                   alpha: float = ALPHA) -> CheckResult:
    """FSR sec. 3 (i) / PART H.3 (ii): attacks that see the model's gradients must be
    at least as strong as attacks transferred from a surrogate model.

    Arguments: per-sample "still correct" flags under white-box PGD-20 and under PGD-20
    transferred from the surrogate, on the same samples. Null: the white-box attack is
    at least as strong as the transfer attack. Test: the exact sign test of check 1
    (p0 = 1/2, equal strength being the null's boundary) on the samples exactly one of
    them breaks; fails when the transfer attack alone breaks improbably many.
    """
    white, transfer = _flags(white_correct), _flags(transfer_correct)
    return _sign_test("white-box beats transfer", "transfer PGD-20", "white-box PGD-20", transfer, white, alpha,
                      {"white_box": _pct(white), "transfer": _pct(transfer)},
                      ("broken_by_transfer_only", "broken_by_white_box_only"))


def check_random_sampling(n_pgd_robust: int, n_broken_by_noise: int, *, p0: float = NOISE_P0,
                          alpha: float = ALPHA) -> CheckResult:
    """PART H.3 (iv): random points in the eps-ball must not break samples that PGD
    could not break.

    Null: random noise of the same budget breaks at most ``p0`` of the PGD-robust samples
    (p0 = 2%: healthy quick runs measured about 1.5%, see :data:`NOISE_P0`). Test: exact
    one-sided binomial test of ``n_broken_by_noise`` of ``n_pgd_robust``. ``values``
    also gives the power this n has against a masking effect of :data:`MASKING_EFFECT`
    (5% broken by noise).
    """
    if not 0 <= n_broken_by_noise <= n_pgd_robust:
        raise ValueError(f"{n_broken_by_noise} of {n_pgd_robust} PGD-robust samples broken by noise is impossible")
    share = round(100.0 * n_broken_by_noise / n_pgd_robust, 2) if n_pgd_robust else 0.0
    p = binomial_tail(n_broken_by_noise, n_pgd_robust, p0)
    ok = p > alpha
    power = binomial_power(n_pgd_robust, p0, MASKING_EFFECT, alpha)
    return CheckResult("random sampling finds nothing PGD misses", ok,
                       f"{n_broken_by_noise} of {n_pgd_robust} PGD-robust samples broken by random noise ({share:.2f}%); "
                       f"binomial test against {100 * p0:g}%: p = {format_p(p)} ({'>' if ok else '<='} {alpha:g}; "
                       f"power {power:.2f} against {100 * MASKING_EFFECT:g}%)",
                       {"pgd_robust": n_pgd_robust, "broken_by_noise": n_broken_by_noise, "percent": share,
                        "fails_from": critical_count(n_pgd_robust, p0, alpha),
                        "power": {"effect": MASKING_EFFECT, "power": power}},
                       null=f"random noise in the eps-ball breaks at most {100 * p0:g}% of the PGD-robust samples",
                       alpha=alpha, p0=p0, count=n_broken_by_noise, trials=n_pgd_robust, p_value=p)


# ---------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------


def sweep_step_size(eps: float, steps: int) -> float:
    """Step size of the eps sweep: the protocol's 2/255, or 2.5 eps / steps when that is
    larger (Madry et al. 2018), so that 20 steps can reach the edge of any ball."""
    return max(2 / 255, 2.5 * eps / steps)


def _pgd_flags(model, x, y, eps, alpha, steps, batch_size, device, seed, source=None, counted: str = "any-iterate",
               clean: Tensor | None = None) -> Tensor:
    """Per-sample flags of ``model`` on PGD examples crafted on ``source`` (default: the model).

    ``counted`` as in :func:`dhat_seg.evaluation.evaluate.correct_under_attack`: with "any-iterate" a
    sample is broken once ``model`` misclassifies the clean input (``clean``: shared flags,
    None: computed per batch) or any iterate, and leaves the batch
    (:func:`dhat_seg.attacks.pgd_any_iterate`; for the transfer attack every iterate
    crafted on ``source`` is judged by ``model``); "last-iterate": the last iterate only."""
    source = source if source is not None else model
    torch.manual_seed(seed)
    out = []
    for s in range(0, len(x), batch_size):
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        if counted == "any-iterate":
            cc = None if clean is None else clean[s : s + batch_size].to(device)
            correct, _ = attacks.pgd_any_iterate(model, xb, yb, eps, alpha, steps, random_start=True, clean_correct=cc,
                                                 source=source, mode="eval")
            out.append(correct.cpu())
            continue
        x_adv = attacks.pgd(source, xb, yb, eps, alpha, steps, random_start=True, mode="eval")
        with torch.no_grad():
            out.append((model(x_adv).argmax(1) == yb).cpu())
    return torch.cat(out)


@torch.no_grad()
def _broken_by_noise(model, x, y, eps, samples, batch_size, device, seed, among: Tensor | None = None) -> Tensor:
    """Per-sample: does any of ``samples`` uniform points in the eps-ball fool the model?

    A sample stops being sampled once a point fools it; ``among`` (bool per sample): only
    those are sampled, the others are reported False. The noise is drawn for every sample
    in every round, so each sample sees the same points whichever samples are skipped."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    broken = torch.zeros(len(x), dtype=torch.bool)
    todo = torch.ones(len(x), dtype=torch.bool) if among is None else among.bool().cpu().clone()
    for _ in range(samples):
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size]
            noise = (torch.rand(xb.shape, generator=g) * 2 - 1) * eps
            active = (todo[s : s + batch_size] & ~broken[s : s + batch_size]).nonzero().flatten()
            if not len(active):
                continue
            pred = model((xb[active] + noise[active]).clamp(0, 1).to(device)).argmax(1).cpu()
            broken[s + active] |= pred != y[s : s + batch_size][active]
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
    counted: str = "any-iterate",
) -> list[CheckResult]:
    """Run the five checks on (x, y). ``surrogate=None`` skips the transfer check.

    ``counted`` (:data:`dhat_seg.evaluation.evaluate.ROBUST_ACCURACY`): how every attack's flags are
    counted. With "any-iterate" (default) the clean predictions are computed once and
    shared, and a sample is broken once the clean input or any iterate fools the model."""
    evaluate.check_counted(counted)
    model.eval()
    clean = evaluate.predict(model, x, batch_size=batch_size, device=device) == y if counted == "any-iterate" else None
    kw = dict(batch_size=batch_size, device=device, seed=seed, counted=counted)
    pgd_kw = dict(kw, clean=clean)
    n_steps = 4 + len(EPS_SWEEP) + (1 if surrogate is not None else 0)
    with evaluate.progress_bar("sanity checks", n_steps, show_progress) as bar:
        fgsm = evaluate.correct_under_attack(model, x, y, "fgsm", eps=eps, clean_correct=clean, **kw)
        bar.update()
        pgd = _pgd_flags(model, x, y, eps, 2 / 255, steps, **pgd_kw)
        bar.update()
        results = [check_iterative_beats_single_step(fgsm, pgd)]
        sweep = {}
        for e in EPS_SWEEP:
            sweep[e] = _pgd_flags(model, x, y, e / 255, sweep_step_size(e / 255, steps), steps, **pgd_kw)
            bar.update()
        results.append(check_monotone_in_eps(sweep))
        results.append(check_unbounded(_pgd_flags(model, x, y, 1.0, sweep_step_size(1.0, steps), steps, **pgd_kw)))
        bar.update()
        if surrogate is not None:
            surrogate.eval()
            transfer = _pgd_flags(model, x, y, eps, 2 / 255, steps, source=surrogate, **pgd_kw)
            results.append(check_white_box_beats_transfer(pgd, transfer))
            bar.update()
        noise = _broken_by_noise(model, x, y, eps, RANDOM_SAMPLES, batch_size, device, seed, among=pgd)
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
    from dhat_seg.attention.model import cache_root, find_attention_model, frozen
    from dhat_seg.run.checkpoint import load_weights
    from dhat_seg.data import split_for

    train_ds = split_for(cfg, "train")
    path = find_attention_model(cfg, train_ds.fingerprint(), cache_root(cache_dir))
    if path is not None:
        return frozen(load_weights(path), torch.device(device)), f"normally trained attention model {path}"
    log("sanity: no attention model in the cache; training a small_cnn surrogate for 3 epochs for the transfer check")
    surrogate = train_surrogate(train_ds, train_ds.num_classes, device=device, seed=cfg.seed)
    return surrogate, "small_cnn trained normally for 3 epochs on up to 4000 training samples"
