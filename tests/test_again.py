"""AGAIN (Yin et al., CVPR 2023; training_methods/again.py): the mixed-logit loss and HFF by hand,
the i/N schedule (never at iteration 0, almost always near N, reproducible and resumable), the
feature split of every registered model, settings and compare rows, short runs on the built-in
data (the schedule's N from the real loader), and the trained model's label-free evaluation
with the gradient-masking sanity checks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dhat_seg import training_methods
from dhat_seg.studies import compare
from dhat_seg.run.checkpoint import load_weights, resolve_weights
from dhat_seg.config import TrainConfig, load_config
from dhat_seg.errors import UserError
from dhat_seg.run.experiment import Experiment
from dhat_seg.models.feature_split import first_stage, last_linear, penultimate_and_head
from dhat_seg.models import MODELS, create_model
from dhat_seg.run.determinism import seed_everything
from dhat_seg.run.train_loop import EpochLoader, batches_per_epoch
from dhat_seg.training_methods import again_hff as hff_module
from dhat_seg.training_methods.again import (AGAIN, again_loss, again_probability, channel_statistics,
                                             hybrid_feature_fusion, random_wrong_class, simplex_weights)
from method_helpers import Tiny


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_of(**overrides) -> TrainConfig:
    values = dict(method="again", model="small_cnn", attack_steps=1, device="cpu", epochs=4)
    values.update(overrides)
    return load_config(None, values)


def batch(n=6, seed=1, size=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x_adv = (x + (torch.rand(x.shape, generator=g) - 0.5) * 0.06).clamp(0, 1)
    return x, y, x_adv


def tiny_model(seed=0, classes=4):
    torch.manual_seed(seed)
    return create_model("small_cnn", classes)


# ------------------------------------------------------------------ 1. the mixed-logit loss by hand
def test_mixed_logit_loss_on_fixed_tensors_by_hand():
    """Eq. (1): -log(exp(A^T(alpha W^y + (1 - alpha) W^y') + alpha b_y + (1 - alpha) b_y') / sum_k exp(A^T W^k + b_k))."""
    A = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]])
    W = torch.tensor([[0.5, 0.0, -1.0], [1.0, 1.0, 0.0], [-0.5, 2.0, 0.5], [0.0, -1.0, 1.0]])
    b = torch.tensor([0.1, -0.2, 0.0, 0.3])
    y, y_fake, alpha = torch.tensor([0, 2]), torch.tensor([3, 1]), 0.6
    head = nn.Linear(3, 4)
    with torch.no_grad():
        head.weight.copy_(W), head.bias.copy_(b)
    expected = []
    for a, t, f in zip(A.tolist(), y.tolist(), y_fake.tolist()):
        z = [sum(ai * wi for ai, wi in zip(a, W[k].tolist())) + b[k].item() for k in range(4)]
        w_mix = [alpha * W[t, d].item() + (1 - alpha) * W[f, d].item() for d in range(3)]
        mixed = sum(ai * wi for ai, wi in zip(a, w_mix)) + alpha * b[t].item() + (1 - alpha) * b[f].item()
        expected.append(math.log(sum(math.exp(v) for v in z)) - mixed)
    loss = again_loss(head(A), y, y_fake, alpha)
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    z = head(A)
    soft = alpha * F.cross_entropy(z, y) + (1 - alpha) * F.cross_entropy(z, y_fake)  # the same, as a soft label
    assert loss.item() == pytest.approx(soft.item(), abs=1e-6)
    assert again_loss(z, y, y_fake, 1.0).item() == pytest.approx(F.cross_entropy(z, y).item(), abs=1e-6)


def test_the_normaliser_is_that_of_the_plain_logits_as_theorem_1_needs():
    """Two classes: L(X) with X = z_y - z_y' is smallest at X = log(alpha / (1 - alpha)) (Theorem 1, c = 1),
    which holds only when sum_k exp(z_k) uses class y's own logit (not the mixed one)."""
    alpha = 0.6
    xs = torch.linspace(-3, 3, 6001)
    logits = torch.stack([xs, torch.zeros_like(xs)], dim=1)  # z_y = X, z_y' = 0
    y, y_fake = torch.zeros(len(xs), dtype=torch.long), torch.ones(len(xs), dtype=torch.long)
    per_sample = [again_loss(logits[i : i + 1], y[:1], y_fake[:1], alpha).item() for i in range(0, len(xs), 10)]
    best = xs[::10][int(torch.tensor(per_sample).argmin())].item()
    assert best == pytest.approx(math.log(alpha / (1 - alpha)), abs=0.011)


def test_fake_labels_are_wrong_and_cover_every_wrong_class():
    y = torch.arange(10).repeat(200)
    torch.manual_seed(0)
    fake = random_wrong_class(y, 10)
    assert (fake != y).all() and fake.min() >= 0 and fake.max() <= 9
    assert all(set(fake[y == k].tolist()) == set(range(10)) - {k} for k in range(10))
    method = AGAIN(cfg_of(again_fake_label="highest"))
    z = torch.tensor([[5.0, 1.0, 3.0], [0.0, 2.0, 1.0]])
    assert method.fake_labels(z, torch.tensor([0, 1])).tolist() == [2, 2]


# ------------------------------------------------------------------ 2. HFF by hand (the official code's definition)
def _stats(values):
    """Mean and sqrt(unbiased variance + 1e-5) of a list (the official calc_mean_std)."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((t - m) ** 2 for t in values) / (len(values) - 1) + 1e-5)


def test_hff_on_fixed_tensors_by_hand():
    """HFF(content, style) of wideresnet_AGAIN_woHFF.py: content normalised, rescaled to the lam-mix of the
    statistics of content, style, adain(content, style) and adain(style, content)."""
    content = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[0.0, 0.0], [2.0, 2.0]]],
                            [[[2.0, 2.0], [2.0, 6.0]], [[1.0, -1.0], [1.0, -1.0]]]])  # 2 samples x 2 channels x 2 x 2
    style = content[[1, 0]]
    lam = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = hybrid_feature_fusion(content, style, lam)
    for i in range(2):
        for c in range(2):
            cv, sv = content[i, c].flatten().tolist(), style[i, c].flatten().tolist()
            (mc, sc), (ms, ss) = _stats(cv), _stats(sv)
            o1 = [(t - mc) / sc * ss + ms for t in cv]  # adain(content, style)
            o2 = [(t - ms) / ss * sc + mc for t in sv]  # adain(style, content)
            parts = [(mc, sc), (ms, ss), _stats(o1), _stats(o2)]
            m_mix = sum(l * m for l, (m, _) in zip(lam.tolist(), parts))
            s_mix = sum(l * s for l, (_, s) in zip(lam.tolist(), parts))
            want = [(t - mc) / sc * s_mix + m_mix for t in cv]
            assert out[i, c].flatten().tolist() == pytest.approx(want, abs=1e-5)
    own = hybrid_feature_fusion(content, style, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(own, content, atol=1e-5)  # all weight on the content's statistics: unchanged
    mu, _ = channel_statistics(hybrid_feature_fusion(content, style, torch.tensor([0.0, 1.0, 0.0, 0.0])))
    assert torch.allclose(mu, channel_statistics(style)[0], atol=1e-5)  # all on the style's: its mean
    with pytest.raises(UserError, match="B x C x H x W"):
        hybrid_feature_fusion(content.flatten(1), style.flatten(1), lam)


def test_hff_weights_are_uniform_on_the_simplex_and_gradients_reach_the_statistics():
    torch.manual_seed(0)
    lams = torch.stack([simplex_weights() for _ in range(4000)])
    assert torch.allclose(lams.sum(1), torch.ones(4000)) and (lams >= 0).all()
    assert torch.allclose(lams.mean(0), torch.full((4,), 0.25), atol=0.01)  # Dirichlet(1, 1, 1, 1): mean 1/4 each
    assert lams.max(0).values.min() > 0.8  # every weight can take nearly all the mass
    f = torch.rand(3, 2, 4, 4, requires_grad=True)
    out = hybrid_feature_fusion(f, f[[2, 0, 1]], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    out[0].sum().backward()  # statistics not detached (as the code): sample 2's style reaches sample 0's output
    assert f.grad[2].abs().sum() > 0


def test_again_batches_call_hff_and_at_batches_do_not(monkeypatch):
    """The official code defines HFF and never calls it; here every AGAIN batch does, in its x_adv forward only."""
    calls = []
    real = hff_module.hybrid_feature_fusion
    monkeypatch.setattr(hff_module, "hybrid_feature_fusion", lambda f, *a: calls.append(f.shape) or real(f, *a))
    model, (x, y, x_adv) = tiny_model(), batch()
    method = AGAIN(cfg_of())
    method.again_now = True
    loss, stats = method.loss(model, x, y, None, {"x_adv": x_adv})
    assert calls == [(6, 32, 8, 8)] and stats["again"].item() == 1.0
    method.again_now = False
    at_loss, at_stats = method.loss(model, x, y, None, {"x_adv": x_adv})
    assert len(calls) == 1 and at_stats["again"].item() == 0.0
    assert at_loss.item() == pytest.approx(F.cross_entropy(model(x_adv), y).item(), abs=1e-5)
    assert set(stats) == set(at_stats)  # the same statistics every batch (epoch means stay means)
    method = AGAIN(cfg_of(again_hff=False))
    method.again_now = True
    method.loss(model, x, y, None, {"x_adv": x_adv})
    assert len(calls) == 1
    assert not [m for m in model.modules() if m._forward_hooks]  # the hook is gone after the loss


def test_again_loss_is_the_mixed_loss_of_the_x_adv_forward():
    model, (x, y, x_adv) = tiny_model(), batch()
    method = AGAIN(cfg_of(again_hff=False, again_fake_label="highest", again_alpha=0.7))
    method.again_now = True
    loss, stats = method.loss(model, x, y, None, {"x_adv": x_adv})
    z = model(x_adv)
    from dhat_seg.training_methods.fsr import highest_wrong_class

    assert loss.item() == pytest.approx(again_loss(z, y, highest_wrong_class(z, y), 0.7).item(), abs=1e-5)
    assert stats["ce_adv"].item() == pytest.approx(F.cross_entropy(z, y).item(), abs=1e-5)


# ------------------------------------------------------------------ 3. the i/N schedule
def decisions(method, epoch, seed=0, batches=None):
    """The AGAIN draws of one epoch, after the trainer's per-epoch reseeding."""
    seed_everything(seed * 100_003 + epoch)
    method.on_epoch_start(None, epoch)
    out = []
    for _ in range(batches or method.batches_per_epoch):
        method.on_batch_start(torch.arange(4))
        out.append(method.again_now)
    return out


def test_schedule_never_at_iteration_zero_almost_always_near_the_end_and_reproducible():
    assert [again_probability(i, 8) for i in (0, 2, 7)] == [0.0, 0.25, 0.875]
    method = AGAIN(cfg_of(epochs=4))
    method.on_train_data(1000, 50)  # N = 4 x 50 = 200
    first = [decisions(method, 0, seed=s, batches=1)[0] for s in range(300)]
    assert not any(first) and method.probability == 0.0
    late = [d for s in range(30) for d in decisions(method, 3, seed=s)[40:]]  # i/N from 0.95 to 0.995
    assert method.probability == pytest.approx(199 / 200) and sum(late) / len(late) > 0.9
    run = [d for e in range(4) for d in decisions(method, e)]
    assert 0.35 < sum(run) / len(run) < 0.65  # the mean of i/N over the run: about 1/2
    fresh = AGAIN(cfg_of(epochs=4))
    fresh.on_train_data(1000, 50)
    assert [d for e in range(4) for d in decisions(fresh, e)] == run  # same seed, same draws
    resumed = AGAIN(cfg_of(epochs=4))  # a run resumed after epoch 2 redoes epochs 3 and 4 exactly
    resumed.on_train_data(1000, 50)
    assert decisions(resumed, 2) + decisions(resumed, 3) == run[100:]


def test_schedule_needs_the_number_of_batches():
    method = AGAIN(cfg_of())
    with pytest.raises(UserError, match="batches per epoch"):
        method.on_batch_start(torch.arange(4))


@pytest.mark.parametrize("n", [5, 12, 13, 24, 25])
def test_batches_per_epoch_is_what_the_loader_yields(n):
    data = torch.utils.data.TensorDataset(torch.arange(n))
    assert len(EpochLoader(batch_size=12, num_workers=0, seed=0, pin_memory=False).epoch(data, 0)) == batches_per_epoch(n, 12)


# ------------------------------------------------------------------ the split of every model
@pytest.mark.parametrize("name", list(MODELS))
def test_every_registered_model_splits_into_features_and_its_last_linear_layer(name):
    model = create_model(name, 5).eval()
    x = torch.rand(2, 3, 8, 8)
    features, head = penultimate_and_head(model, x)
    assert head is last_linear(model) and isinstance(head, nn.Linear) and head.out_features == 5
    assert torch.allclose(head(features), model(x), atol=1e-5)
    seen = []
    handle = first_stage(model).register_forward_hook(lambda m, i, o: seen.append(o.dim()))
    model(x)
    handle.remove()
    assert seen == [4]


def test_models_that_cannot_be_split_are_refused():
    with pytest.raises(UserError, match="registry model"):
        first_stage(Tiny())
    model = create_model("small_cnn", 4)
    model.net.fc = nn.Sequential(nn.Linear(128, 4))
    with pytest.raises(UserError, match="one linear layer"):
        last_linear(model)


# ------------------------------------------------------------------ settings and compare rows
@pytest.mark.parametrize("overrides, expected", [
    (dict(again_alpha=1.5), r"a number in \[0, 1\]"), (dict(again_alpha=-0.1), r"\[0, 1\]"),
    (dict(again_fake_label="nearest"), "random, highest"), (dict(again_hff="yes"), "true or false"),
])
def test_settings_are_validated(overrides, expected):
    with pytest.raises(UserError, match=expected):
        cfg_of(**overrides)


def test_the_new_settings_leave_old_digests_alone():
    """Old digests themselves: tests/test_method_settings.py (a fixture of 0.1 digests)."""
    defaults = TrainConfig()
    assert defaults.options("again").hff is None and defaults.options("again").hff_on  # null: on for paper
    for key, value in (("again.alpha", 0.6), ("again.fake_label", "random"), ("again.form", "paper")):
        assert load_config(None, {key: value}).digest() == load_config(None, {}).digest()
    assert load_config(None, {"again.alpha": 0.5}).digest() != load_config(None, {}).digest()
    assert load_config(None, {"again.hff": True}).digest() == load_config(None, {}).digest()  # = its null default
    # AGAIN with HFF: its formula (the official code's, no longer MixStyle) is part of the digest
    with_hff = load_config(None, {"method": "again", "model": "small_cnn"})
    no_hff = load_config(None, {"method": "again", "model": "small_cnn", "again.hff": False})
    assert with_hff.digest() != no_hff.digest()
    assert with_hff.digest() == load_config(None, {"method": "again", "model": "small_cnn", "again.hff": True}).digest()
    code = load_config(None, {"method": "again", "again.form": "code", "model": "small_cnn_again"})
    assert code.digest() != load_config(None, {"method": "again", "again.form": "code", "model": "small_cnn_again",
                                                "again.hff": True}).digest()


def test_compare_row_is_again_on_at():
    from dhat_seg.studies import ablate

    base = ablate.base_config(ablate.ABLATE_PRESETS["quick"], {"image_size": 16, "train_size": 100, "test_size": 40,
                                                               "device": "cpu"})
    rows, skipped = compare.parse_methods("again,at-again", "gradcam", {"gradcam": 1})
    assert rows == ["again"] and not skipped and "again" in compare.parse_methods("all", "gradcam", {"gradcam": 1})[0]
    cfg = compare.method_config(base, "again", "gradcam")
    assert (cfg.method, cfg.base, cfg.awp, cfg.model) == ("again", "at", False, "small_cnn")
    assert compare.METHOD_ROWS["again"].label == "AT+AGAIN" and "again" in training_methods.TRAINING_METHODS


def test_cli_help_lists_the_method_and_the_row():
    from typer.testing import CliRunner

    from dhat_seg.cli import app

    for command in ("train", "compare"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "again" in result.output.replace("\n", " "), result.output


def test_awp_wraps_an_again_batch_and_restores_the_weights():
    model, (x, y, _) = tiny_model(), batch()
    method = AGAIN(cfg_of(awp=True, awp_gamma=0.01))
    method.again_now = True
    before = copy.deepcopy(model.state_dict())
    with method.weight_perturbation(model, x, y, None, 0) as prepared:
        loss, stats = method.loss(model, x, y, None, prepared)
        loss.backward()
    assert math.isfinite(loss.item()) and stats["again"].item() == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k)


# ------------------------------------------------------------------ 4-5. runs, label-free evaluation, sanity checks
def tiny_run(**overrides) -> TrainConfig:
    values = dict(data="synthetic", image_size=16, model="small_cnn", train_size=32, test_size=8, val_size=8,
                  epochs=2, batch_size=12, attack_steps=1, val_examples=8, val_attack_steps=1, device="cpu",
                  milestones=[], method="again")  # no decay (a milestone past the last epoch is refused)
    values.update(overrides)
    return load_config(None, values)


def test_a_short_run_trains_with_the_schedule_of_the_real_loader(tmp_path):
    run = tmp_path / "run"
    summary = Experiment(tiny_run(), run, cache_dir=tmp_path / "c", progress=False, on_epoch=lambda r: None).run()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 24 training samples (32 minus the 8 of validation) in batches of 12: N = 2 epochs x 2 batches
    assert [r["train_again_prob"] for r in records] == [pytest.approx(0.125), pytest.approx(0.625)]
    assert records[0]["train_again"] in (0.0, 0.5) and 0.0 <= records[1]["train_again"] <= 1.0
    assert all(math.isfinite(r["train_loss"]) and "train_ce_adv" in r for r in records)
    assert summary["method"] == "again" and 0 <= summary["pgd10_acc"] <= 100


def test_eval_predictions_do_not_depend_on_labels():
    """After AGAIN losses with different labels (same x_adv, no step), the eval-mode model is the same:
    no label-dependent mask, mixing or hook stays in it, and the evaluated model is the trained one."""
    x, y, x_adv = batch()
    outputs = []
    for labels in (y, (y + 1) % 4, torch.zeros_like(y)):
        model = tiny_model()
        method = AGAIN(cfg_of())
        method.again_now = True
        torch.manual_seed(3)
        method.loss(model, x, labels, None, {"x_adv": x_adv})[0].backward()
        evaluated = method.evaluation_model(model)
        assert evaluated is model and not [m for m in model.modules() if m._forward_hooks]
        with torch.no_grad():
            outputs.append(evaluated.eval()(x))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_a_briefly_trained_model_passes_the_sanity_checks(tmp_path):
    """`dhat-seg eval RUN --sanity` on 2 epochs of 6 steps (about half of them AGAIN batches with HFF)."""
    from dhat_seg.evaluation.report import run_eval

    run = tmp_path / "run"
    Experiment(tiny_run(train_size=96, test_size=16, batch_size=16), run, cache_dir=tmp_path / "c", progress=False,
               on_epoch=lambda r: None).run()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["train_again"] for r in records) > 0  # AGAIN batches happened
    report = run_eval(run, attacks="clean,pgd10", n_examples=16, gap_attack="none", bg_gap=False, iou_examples=0,
                      sanity=True, sanity_examples=16, device="cpu", cache_dir=str(tmp_path / "c"), show_progress=False,
                      output=str(tmp_path / "eval.json"), log=lambda m: None)
    assert report["sanity"]["passed"], report["sanity"]
    model = load_weights(resolve_weights(run)).eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
