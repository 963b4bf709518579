"""Any-iterate robust accuracy (attacks stop on broken samples) and AutoAttack on what is left.

The fast (compacting) path must give exactly the flags of a reference that runs every
step on every sample and records each iterate's prediction.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dhat_seg import attacks
from dhat_seg.evaluation import autoattack
from dhat_seg.evaluation import evaluate, sanity
from dhat_seg.errors import UserError
from dhat_seg.evaluation.report import EvalOptions

pytestmark = pytest.mark.usefixtures("one_thread")

N, BATCH = 48, 16


class Counting(nn.Module):
    """A model that counts the samples it is run on."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.samples = inner, 0

    def forward(self, x):
        self.samples += len(x)
        return self.inner(x)


@pytest.fixture(scope="module")
def problem():
    """A fixed small random CNN; labels are its own predictions (clean right) except every
    sixth (clean wrong); eps 3/255 breaks some samples and not others."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(N, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[::6] = (y[::6] + 1) % 10
    return net, x, y, 3 / 255


def reference(model, x, y, eps, alpha, steps, loss, random_start, seed):
    """(any-iterate, last-iterate) flags: every step on every sample, each iterate judged.

    Written independently of :mod:`dhat_seg.attacks`; batches of BATCH as the library
    draws its random starts per batch."""
    torch.manual_seed(seed)
    loss_fn = attacks.LOSSES[loss]
    any_ok, last_ok = [], []
    for s in range(0, len(x), BATCH):
        xb, yb = x[s : s + BATCH], y[s : s + BATCH]
        lo, hi = xb - eps, xb + eps
        proj = lambda z: torch.min(torch.max(z, lo), hi).clamp(0, 1)  # noqa: E731
        with torch.no_grad():
            ok = model(xb).argmax(1) == yb  # clean
        xa = proj(xb + torch.empty_like(xb).uniform_(-eps, eps)) if random_start else xb.clone()
        for _ in range(steps):
            with torch.no_grad():
                ok &= model(xa).argmax(1) == yb  # iterate t (t = 0: the start point)
            xa.requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(model(xa), yb).sum(), xa)
            xa = proj(xa.detach() + alpha * grad.sign())
        with torch.no_grad():
            last = model(xa).argmax(1) == yb
        any_ok.append(ok & last)
        last_ok.append(last)
    return torch.cat(any_ok), torch.cat(last_ok)


@pytest.mark.parametrize("attack", ["fgsm", "pgd10", "pgd20", "cw"])
def test_fast_path_equals_the_full_iterate_reference(problem, attack):
    model, x, y, eps = problem
    spec = evaluate.EVAL_ATTACKS[attack]
    alpha = eps if attack == "fgsm" else 1 / 255
    want_any, want_last = reference(model, x, y, eps, alpha, spec.steps, spec.loss, spec.random_start, seed=5)
    clean = evaluate.predict(model, x) == y
    fast = evaluate.correct_under_attack(model, x, y, attack, eps=eps, alpha=1 / 255, batch_size=BATCH, seed=5,
                                         clean_correct=clean)
    alone = evaluate.correct_under_attack(model, x, y, attack, eps=eps, alpha=1 / 255, batch_size=BATCH, seed=5)
    last = evaluate.correct_under_attack(model, x, y, attack, eps=eps, alpha=1 / 255, batch_size=BATCH, seed=5,
                                         counted="last-iterate")
    assert fast.tolist() == want_any.tolist() == alone.tolist()
    assert last.tolist() == want_last.tolist()
    assert not (fast & ~last).any() and evaluate.percent(fast) <= evaluate.percent(last)  # any <= last, per sample
    assert not fast[~clean].any()  # misclassified clean: broken
    assert 0 < int(fast.sum()) < int(clean.sum())  # some broken by the attack, some not: the test means something


def test_clean_misclassified_samples_are_not_attacked(problem):
    net, x, y, eps = problem
    model = Counting(net).eval()
    none = torch.zeros(N, dtype=torch.bool)
    assert not evaluate.correct_under_attack(model, x, y, "pgd20", eps=eps, batch_size=BATCH, clean_correct=none).any()
    assert model.samples == 0
    clean = evaluate.predict(net, x) == y
    flags = evaluate.correct_under_attack(model, x, y, "pgd20", eps=eps, batch_size=BATCH, clean_correct=clean)
    compacted = model.samples
    model.samples = 0
    evaluate.correct_under_attack(model, x, y, "pgd20", eps=eps, batch_size=BATCH, counted="last-iterate")
    assert compacted < model.samples  # 21 passes on every sample without compaction
    assert not flags[~clean].any()


def test_per_sample_eps_keeps_each_budget(problem):
    """Per-sample radii are compacted with their samples: equal to judging every iterate of
    the library's own (full-batch) pgd, iterate t being pgd with t steps from the same seed."""
    model, x, y, _ = problem
    eps = torch.linspace(1, 6, N) / 255
    torch.manual_seed(2)
    correct, kept = attacks.pgd_any_iterate(model, x, y, eps, 1 / 255, 8, mode="eval")
    ok = evaluate.predict(model, x) == y
    for t in range(9):
        torch.manual_seed(2)
        ok &= evaluate.predict(model, attacks.pgd(model, x, y, eps, 1 / 255, t, mode="eval")) == y
    assert correct.tolist() == ok.tolist() and 0 < ok.sum() < N
    assert ((kept - x).abs().flatten(1).amax(1) <= eps).all()


def test_transfer_flags_judge_every_iterate_with_the_model(problem):
    model, x, y, eps = problem
    torch.manual_seed(7)
    source = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    got = sanity._pgd_flags(model, x, y, eps, 1 / 255, 5, BATCH, "cpu", 4, source=source)
    last = sanity._pgd_flags(model, x, y, eps, 1 / 255, 5, BATCH, "cpu", 4, source=source, counted="last-iterate")
    want = []
    for s in range(0, N, BATCH):
        xb, yb = x[s : s + BATCH], y[s : s + BATCH]
        ok = evaluate.predict(model, xb) == yb
        for t in range(6):  # the whole batch's random start is drawn first, as in the first batch's call
            torch.manual_seed(4)
            for _ in range(s // BATCH):  # the batches before consumed their starts
                torch.empty_like(xb).uniform_(-eps, eps)
            ok &= evaluate.predict(model, attacks.pgd(source, xb, yb, eps, 1 / 255, t, mode="eval")) == yb
        want.append(ok)
    assert got.tolist() == torch.cat(want).tolist() and not (got & ~last).any()


def test_noise_check_stops_sampling_broken_samples(problem):
    net, x, y, _ = problem
    eps = 40 / 255
    model = Counting(net).eval()
    fast = sanity._broken_by_noise(model, x, y, eps, 10, BATCH, "cpu", 0)
    compacted, model.samples = model.samples, 0
    g = torch.Generator().manual_seed(0)
    full = torch.zeros(N, dtype=torch.bool)
    for _ in range(10):
        for s in range(0, N, BATCH):
            noise = (torch.rand(x[s : s + BATCH].shape, generator=g) * 2 - 1) * eps
            full[s : s + BATCH] |= net((x[s : s + BATCH] + noise).clamp(0, 1)).argmax(1) != y[s : s + BATCH]
    assert fast.tolist() == full.tolist() and 0 < fast.sum() < N and compacted < 10 * N
    among = ~full.clone()
    among[:4] = True
    assert sanity._broken_by_noise(net, x, y, eps, 10, BATCH, "cpu", 0, among=among).tolist() == (full & among).tolist()


# ---------------------------------------------------------------------------------
# AutoAttack on what is left
# ---------------------------------------------------------------------------------


def test_autoattack_runs_on_the_samples_no_other_attack_broke(problem, monkeypatch):
    model, x, y, eps = problem
    seen, states = [], []

    def fake_aa(model_, xs, ys, **kwargs):
        seen.append((xs.clone(), ys.clone()))
        return torch.arange(len(xs)) % 2 == 0  # AutoAttack breaks every other sample it gets

    monkeypatch.setattr(evaluate, "autoattack_flags", fake_aa)
    state = lambda subset, xs, ys: states.append(subset) or None  # noqa: E731
    flags = evaluate.flags_for_attacks(model, x, y, ["aa", "clean", "pgd10", "fgsm"], eps=eps, batch_size=BATCH,
                                       aa_examples=40, aa_state_path=state, show_progress=False)
    assert list(flags) == ["aa", "clean", "pgd10", "fgsm"]  # the order asked for; AutoAttack ran last
    unbroken = (flags["clean"] & flags["pgd10"] & flags["fgsm"])[:40]
    idx = unbroken.nonzero().flatten()
    assert len(seen) == 1 and torch.equal(seen[0][0], x[idx]) and torch.equal(seen[0][1], y[idx])
    assert 0 < len(idx) < 40 and torch.equal(states[0], idx)
    expected = torch.zeros(40, dtype=torch.bool)
    expected[idx] = torch.arange(len(idx)) % 2 == 0
    assert flags["aa"].tolist() == expected.tolist()  # the union: right under AutoAttack and every other attack
    settings = evaluate.attack_settings(flags, eps)["aa"]
    assert settings["counted"].startswith("union") and "pgd10" in settings["counted"]

    seen.clear()  # last-iterate: AutoAttack alone, on all (aa_examples) samples
    flags = evaluate.flags_for_attacks(model, x, y, ["pgd10", "aa"], eps=eps, aa_examples=40, show_progress=False,
                                       counted="last-iterate")
    assert torch.equal(seen[0][0], x[:40]) and flags["aa"].tolist() == (torch.arange(40) % 2 == 0).tolist()


def test_autoattack_state_files_differ_by_subset(problem):
    _, x, y, _ = problem
    name = lambda subset, xs, ys: autoattack.autoattack_state_file(  # noqa: E731
        "st", "test", xs, ys, eps=0.03, seed=0, weights_sha="w", subset=subset)
    a, b = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3])
    names = {name(a, x[a], y[a]), name(b, x[b], y[b]), name(None, x[:3], y[:3]), name(a, x[3:6], y[3:6])}
    assert len(names) == 4  # other samples, other indices, or the whole set: never the same state


def test_autoattack_progress_advances_per_batch_to_an_honest_total():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.rand(12, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    ticks = []
    evaluate.autoattack_flags(model, x, y, eps=1 / 255, batch_size=4, seed=0, progress=ticks.append)
    assert sum(ticks) == autoattack.progress_total(12) == 48
    assert len(ticks) > len(autoattack.AUTOATTACK_STANDARD)  # per batch, not per sub-attack


def test_robust_accuracy_option_is_checked_and_part_of_the_settings():
    with pytest.raises(UserError, match="'best-iterate' is unknown; expected one of any-iterate, last-iterate"):
        EvalOptions(robust_accuracy="best-iterate").validate()
    assert EvalOptions().validate().result_settings()["robust_accuracy"] == "any-iterate"
    last = EvalOptions(robust_accuracy="last-iterate").validate().result_settings()
    assert last != EvalOptions().validate().result_settings()  # ablate/compare never reuse the other definition
    assert evaluate.attack_settings(["pgd10"], 8 / 255, counted="last-iterate")["pgd10"]["counted"].startswith("last")
