"""The gradient-masking sanity checks as statistical tests: the exact binomial tail, the
power calculation behind the quick preset's sample count, the false-positive rate under
each check's null (simulated), a real healthy tiny model over 10 seeds, and a real
masked one (an 8-bit input quantiser with zero gradient) that still fails."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dhat_seg.evaluation import binomial, sanity
from dhat_seg.studies.rows import ABLATE_PRESETS, failed_checks, sanity_status, sanity_summary
from dhat_seg.presets import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_tail(k: int, n: int, p: Fraction) -> Fraction:
    """P(X >= k), X ~ Binomial(n, p), in exact rational arithmetic."""
    return sum((comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k, 0), n + 1)), Fraction(0))


# ---------------------------------------------------------------------------------
# the statistics
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [Fraction(0), Fraction(1, 50), Fraction(3, 10), Fraction(1, 2), Fraction(97, 100), Fraction(1)])
def test_binomial_tail_matches_a_brute_force_sum(p):
    for n in (0, 1, 2, 7, 30, 60):
        for k in range(-1, n + 2):
            assert binomial.binomial_tail(k, n, float(p)) == pytest.approx(float(brute_tail(k, n, p)), rel=1e-9, abs=1e-300)


def test_binomial_tail_for_large_n_and_bad_input():
    # no overflow (comb(5000, 2500) has 1504 digits); the tail falls from 1 and matches the brute force
    tails = [binomial.binomial_tail(k, 5000, 0.02) for k in (0, 50, 100, 130, 200)]
    assert tails[0] == 1.0 and tails == sorted(tails, reverse=True) and 0 < tails[-1] < 1e-12
    assert binomial.binomial_tail(30, 800, 0.02) == pytest.approx(float(brute_tail(30, 800, Fraction(1, 50))), rel=1e-9)
    for args in ((1, -1, 0.5), (1, 10, 1.5), (1, 2.5, 0.5)):
        with pytest.raises(ValueError):
            binomial.binomial_tail(*args)


def test_critical_count_and_power_by_brute_force():
    for n, p0, p1, alpha in ((50, 0.02, 0.05, 0.01), (200, 0.02, 0.05, 0.01), (30, 0.5, 0.8, 0.05), (5, 0.5, 0.9, 0.01)):
        c = binomial.critical_count(n, p0, alpha)
        # the smallest count that rejects: its tail is <= alpha, the one below is not
        assert float(brute_tail(c, n, Fraction(p0))) <= alpha < float(brute_tail(c - 1, n, Fraction(p0)))
        assert binomial.binomial_power(n, p0, p1, alpha) == pytest.approx(float(brute_tail(c, n, Fraction(p1))), rel=1e-9)
    assert binomial.critical_count(5, 0.5, 0.01) == 6  # 5 of 5 has p = 1/32 > 0.01: no count rejects
    assert binomial.binomial_power(5, 0.5, 0.9, 0.01) == 0.0


def test_samples_for_power():
    """The n behind the quick preset: 5% broken by noise against p0 = 2% at alpha 0.01 with power 0.8."""
    n = binomial.samples_for_power(0.02, 0.05, 0.01, 0.8)
    assert n == sanity.robust_samples_needed() == 383
    powers = [binomial.binomial_power(m, 0.02, 0.05, 0.01) for m in range(n - 1, 2 * n + 1)]
    assert powers[0] < 0.8 and min(powers[1:]) >= 0.8  # from n on (up to 2n), never below 0.8
    first = next(m for m in range(1, n + 1) if binomial.binomial_power(m, 0.02, 0.05, 0.01) >= 0.8)
    assert first == 339  # the power reaches 0.8 earlier, then dips below it again (the critical count steps up)
    assert binomial.samples_for_power(0.01, 0.05, 0.01, 0.8) == 157  # a smaller p0 needs fewer samples
    with pytest.raises(ValueError):
        binomial.samples_for_power(0.05, 0.02, 0.01, 0.8)


def test_quick_preset_evaluates_enough_samples_for_the_power():
    """At a PGD-20 accuracy of 40% (the quick AT-family rows measured 42-48% PGD-10 on the first
    generator) the quick preset's sanity set holds the PGD-robust samples the noise check needs,
    and the quick test split has that many samples."""
    n = ABLATE_PRESETS["quick"].eval["sanity_examples"]
    assert 0.40 * n >= sanity.robust_samples_needed()
    assert n <= PRESETS["quick"]["test_size"]
    assert binomial.binomial_power(int(0.40 * n), sanity.NOISE_P0, sanity.MASKING_EFFECT, sanity.ALPHA) >= 0.8


# ---------------------------------------------------------------------------------
# false positives under the nulls, detection under masking (simulated outcomes)
# ---------------------------------------------------------------------------------


def simulated_run(g: torch.Generator, n: int = 1000, noise_rate: float = sanity.NOISE_P0) -> list[sanity.CheckResult]:
    """The four statistical checks on per-sample "still correct" outcomes drawn at the
    boundary of their nulls: every pair of attacks equally strong (each sample is broken by
    one of the two only with probability 0.1, either one with probability 1/2), noise
    breaking ``noise_rate`` of the PGD-robust samples."""

    def pair(correct: float = 0.4, discordant: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.rand(n, generator=g)
        both = u < correct
        first_only = (u >= correct) & (u < correct + discordant / 2)  # broken by the first attack only
        second_only = (u >= correct + discordant / 2) & (u < correct + discordant)
        return both | second_only, both | first_only

    def flipped(flags: torch.Tensor, share: float = 0.1) -> torch.Tensor:
        # at 50% accuracy, flipping a random tenth breaks and restores as many samples on average
        return torch.where(torch.rand(n, generator=g) < share, ~flags, flags)

    fgsm, pgd = pair()
    transfer, white = pair()
    sweep = {2.0: torch.rand(n, generator=g) < 0.5}
    for e in (4.0, 8.0, 16.0):
        sweep[e] = flipped(sweep[max(sweep)])
    robust = int(pgd.sum())
    broken = int((torch.rand(robust, generator=g) < noise_rate).sum())
    return [sanity.check_iterative_beats_single_step(fgsm, pgd), sanity.check_monotone_in_eps(sweep),
            sanity.check_white_box_beats_transfer(white, transfer), sanity.check_random_sampling(robust, broken)]


def test_false_positive_rate_under_the_nulls_is_at_most_alpha():
    g = torch.Generator().manual_seed(0)
    runs = [simulated_run(g) for _ in range(600)]
    for i, name in enumerate(r.name for r in runs[0]):
        rate = sum(not run[i].passed for run in runs) / len(runs)
        print(f"{name}: false-positive rate {rate:.4f} at the null's boundary")
        assert rate <= sanity.ALPHA + 3 * (sanity.ALPHA / len(runs)) ** 0.5, (name, rate)  # 0.01 + 3 standard errors
    flagged = sum(not all(r.passed for r in run) for run in runs) / len(runs)
    assert flagged <= 4 * sanity.ALPHA  # the union bound over the four tests


def test_ten_seeds_at_the_null_boundary_flag_at_most_the_expected_count():
    """10 simulated healthy runs at the worst case of every null: expected flags <= 10 x 0.04 = 0.4."""
    flagged = [seed for seed in range(10)
               if not all(r.passed for r in simulated_run(torch.Generator().manual_seed(100 + seed)))]
    assert len(flagged) <= 1, flagged


def test_a_masking_effect_of_five_percent_is_detected_with_power():
    """Noise breaking 5% of 383 PGD-robust samples: the noise check fails in >= 80% of runs."""
    g = torch.Generator().manual_seed(1)
    n = sanity.robust_samples_needed()
    caught = sum(not sanity.check_random_sampling(n, int((torch.rand(n, generator=g) < 0.05).sum())).passed
                 for _ in range(1000))
    assert caught / 1000 >= 0.8 - 3 * (0.16 / 1000) ** 0.5


# ---------------------------------------------------------------------------------
# real tiny models: healthy over 10 seeds, and masked
# ---------------------------------------------------------------------------------

SIGNAL = 0.08  # brightness of the class's quadrant: PGD at 8/255 breaks about a third of the samples


def quadrant_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 RGB images on the 8-bit grid; the label (0-3) is the quadrant made brighter by SIGNAL."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.rand(n, 3, 8, 8, generator=g) * (1 - SIGNAL)
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += SIGNAL
    return torch.round(x * 255) / 255, y


def tiny_cnn(seed: int, steps: int = 150) -> nn.Module:
    """A conv-ReLU-pool-linear classifier trained normally (clean CE, SGD) for a few seconds."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 4))
    x, y = quadrant_data(2000, seed + 1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


class QuantisedInput(nn.Module):
    """Gradient masking by construction: inputs rounded to 8 bits with round(), whose
    gradient is 0 (the images are 8-bit already, so clean predictions do not change)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 255) / 255)


@pytest.fixture(scope="module")
def surrogate():
    return tiny_cnn(100)


def test_healthy_tiny_models_over_ten_seeds_are_not_flagged(surrogate):
    """Ten independently trained models, attacked with ten seeds, on 200 samples each: under
    the nulls at most 0.4 flags are expected; a healthy model lies far inside them."""
    flagged, robust = {}, []
    for seed in range(10):
        x, y = quadrant_data(200, seed + 5000)
        results = sanity.run_checks(tiny_cnn(seed), x, y, surrogate=surrogate, seed=seed, show_progress=False)
        assert len(results) == 5
        robust.append(results[-1].trials)
        failed = [f"{r.name} ({r.evidence})" for r in results if not r.passed]
        if failed:
            flagged[seed] = failed
    assert min(robust) >= 30  # PGD leaves enough samples for the noise check to weigh
    assert len(flagged) <= 1, flagged


def test_a_masked_tiny_model_still_fails(surrogate):
    x, y = quadrant_data(200, 5000)
    model = tiny_cnn(0)
    results = {r.name: r for r in sanity.run_checks(QuantisedInput(model), x, y, surrogate=surrogate, seed=0,
                                                      show_progress=False)}
    # PGD cannot move (zero gradient): it leaves far more than 1% at eps 1, the transfer attack
    # is stronger, and random points break many samples that PGD's one random start left alone
    for name in ("unbounded attack succeeds", "white-box beats transfer", "random sampling finds nothing PGD misses"):
        assert not results[name].passed, results[name]
    noise = results["random sampling finds nothing PGD misses"]
    assert noise.p_value <= sanity.ALPHA and noise.count / noise.trials > 0.05
    assert noise.null.startswith("random noise") and noise.p0 == sanity.NOISE_P0 and noise.alpha == sanity.ALPHA
    # eval.json's entry and the table's status carry the counts and the p-value
    entry = noise.to_dict()
    assert {"null", "alpha", "p0", "count", "trials", "p_value", "passed"} <= set(entry)
    report = {"n": 200, "passed": False, "alpha": sanity.ALPHA, "checks": [r.to_dict() for r in results.values()]}
    status = sanity_status(report, reused=False)
    assert status.startswith("suspect: ") and f"random sampling finds nothing PGD misses failed ({noise.count} of " \
        f"{noise.trials}, p = " in status
    unbounded = results["unbounded attack succeeds"]
    assert f"unbounded attack succeeds failed ({unbounded.count} of 200 still correct)" in status
    assert failed_checks(report) == [n for n, r in results.items() if not r.passed]
    assert sanity_summary(report).startswith("failed: ") and f"{noise.count} of {noise.trials}, p = " in sanity_summary(report)


def test_old_results_without_counts_keep_their_old_status():
    old = {"n": 100, "passed": False, "checks": [{"name": "a", "passed": False, "detail": "", "values": {}},
                                                 {"name": "b", "passed": True, "detail": "", "values": {}}]}
    assert sanity_status(old, reused=True) == "suspect: a failed (reused)"
    assert sanity_summary(old) == "failed: a"
