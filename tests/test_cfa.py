"""CFA (Wei et al., CVPR 2023) and DHAT-CFA: class-wise margins and betas, FAWA, the losses
by hand, composition with DHAT, a training run and an exact resume."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from dhat_seg import attacks, losses, training_methods
from dhat_seg.studies import compare
from dhat_seg.config import TrainConfig, load_config
from dhat_seg.errors import UserError
from dhat_seg.run.experiment import Experiment
from dhat_seg.training_methods.cfa import CFA, fawa_update

T = [0.2, 0.5, 0.9, 0.0]  # fixed per-class train robust accuracies (4 classes)


def cfg_of(**overrides) -> TrainConfig:
    values = dict(method="cfa", model="small_cnn", attention="oracle", attack_steps=2, inv_steps=2, device="cpu",
                  lambda1=0.7, lambda2=0.3, floe_form="paper", trades_beta=6.0, cfa_begin=1, fawa_begin=0)
    values.update(overrides)
    return load_config(None, values)


class Tiny(nn.Module):
    """conv -> BatchNorm -> ReLU -> linear on 3 x 8 x 8 images, 4 classes."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])[:n]
    x_adv = (x + (torch.rand(x.shape, generator=g) - 0.5) * 0.06).clamp(0, 1)
    x_inv = (x + (torch.rand(x.shape, generator=g) - 0.5) * 0.03).clamp(0, 1)
    fg = torch.zeros(n, 1, 8, 8, dtype=torch.bool)
    fg[:, :, 2:6, 1:7] = True
    return x, y, x_adv, x_inv, fg


def calibrated(method: CFA, model: nn.Module, t=T, epoch=1) -> CFA:
    """``method`` in ``epoch`` after an epoch with per-class train robust accuracies ``t``."""
    method.on_fit_start(model, None)
    method.train_robust = torch.tensor(t)
    method.on_epoch_start(model, epoch)
    return method


def softmax(v):
    m = max(v)
    e = [math.exp(a - m) for a in v]
    return [a / sum(e) for a in e]


# ------------------------------------------------------------------ CCM and CCR
@pytest.mark.parametrize("variant, lambda1", [("at", 0.5), ("trades", 0.3)])
def test_class_margins_and_betas_by_hand(variant, lambda1):
    model = Tiny()
    method = training_methods.create_training_method(cfg_of(cfa_base=variant))
    assert method.lambda1 == lambda1  # the paper's per-variant lambda_1 (null in the config)
    calibrated(method, model, epoch=0)  # before cfa_begin: eps and beta for every class
    assert method.class_eps is None and method.class_beta is None
    calibrated(method, model, epoch=1)
    hand_eps = [(lambda1 + t) * 8 / 255 for t in T]
    assert method.class_eps.tolist() == pytest.approx(hand_eps, rel=1e-6)
    if variant == "trades":
        assert method.class_beta.tolist() == pytest.approx([(0.5 + t) * 6.0 for t in T], rel=1e-6)
    else:
        assert method.class_beta is None
    explicit = training_methods.create_training_method(cfg_of(cfa_base=variant, cfa_lambda1=0.1, cfa_lambda2=0.2,
                                                              eps=4.0, trades_beta=2.0))
    calibrated(explicit, model)
    assert explicit.class_eps.tolist() == pytest.approx([(0.1 + t) * 4 / 255 for t in T], rel=1e-6)
    if variant == "trades":
        assert explicit.class_beta.tolist() == pytest.approx([(0.2 + t) * 2.0 for t in T], rel=1e-6)


def test_the_attack_takes_each_samples_class_margin(monkeypatch):
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    seen = []
    monkeypatch.setattr(attacks, "pgd", lambda m, xx, yy, eps, alpha, steps, **k: seen.append((eps, alpha)) or x_adv)
    method = training_methods.create_training_method(cfg_of())
    method.on_fit_start(model, None)
    method.on_epoch_start(model, 0)
    method.adversarial(model, x, y)
    assert seen[-1] == (8 / 255, 2 / 255)  # not calibrated yet: AT's float radius
    calibrated(method, model).adversarial(model, x, y)
    eps, alpha = seen[-1]
    assert alpha == 2 / 255 and eps.tolist() == pytest.approx([(0.5 + T[c]) * 8 / 255 for c in y.tolist()], rel=1e-6)


def test_pgd_and_the_trades_attack_take_a_radius_per_sample():
    model, (x, y, _, _, _) = Tiny(), batch()
    model.eval()
    eps = torch.tensor([0.0, 2, 4, 8, 16, 1, 3, 5]) / 255
    torch.manual_seed(0)
    for x_adv in (attacks.pgd(model, x, y, eps, 2 / 255, 5), attacks.trades_kl_attack(model, x, eps, 2 / 255, 5)):
        dist = (x_adv - x).abs().flatten(1).max(1).values
        assert (dist <= eps + 1e-6).all() and torch.equal(x_adv[0], x[0]) and (dist[1:] > 0).all()
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    # a tensor of equal radii gives the float path's result bit for bit (no random start)
    same = torch.full((len(x),), 8 / 255)
    assert torch.equal(attacks.pgd(model, x, y, same, 2 / 255, 3, random_start=False),
                       attacks.pgd(model, x, y, 8 / 255, 2 / 255, 3, random_start=False))


def test_train_robust_accuracy_is_counted_per_class_for_the_trained_model_only():
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    method = training_methods.create_training_method(cfg_of(fawa_begin=99))
    method.on_fit_start(model, None)
    method.on_epoch_start(model, 0)
    _, z_adv, _ = method.base_loss(model, x[:6], y[:6], x_adv[:6])
    _, z2, _ = method.base_loss(model, x[6:], y[6:], x_adv[6:])
    method.base_loss(copy.deepcopy(model), x, y, x_adv)  # e.g. AWP's proxy: not counted
    correct = torch.cat([z_adv, z2]).argmax(1) == y
    stats = method.on_epoch_end(model, 0, x, y, "cpu")
    hand = [correct[y == c].float().mean().item() for c in range(4)]
    assert method.train_robust.tolist() == pytest.approx(hand)
    assert stats["cfa_worst_train_acc"] == pytest.approx(100 * min(hand), abs=0.01)
    assert stats["fawa_worst_val_acc"] is None and stats["fawa_updates"] == 0  # before fawa_begin
    method.on_epoch_start(model, 1)  # the counts start again; a class not seen in an epoch has t = 0
    method.base_loss(model, x[:2], y[:2], x_adv[:2])
    method.on_epoch_end(model, 1, x, y, "cpu")
    assert method.train_robust[2:].tolist() == [0.0, 0.0]


# ------------------------------------------------------------------ FAWA
def test_fawa_update_by_hand():
    average, model = Tiny(0), Tiny(1)
    model.bn.num_batches_tracked += 7
    before = {k: v.clone() for k, v in average.state_dict().items()}
    fawa_update(average, model, 0.85)
    for k, v in average.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.85 * before[k] + 0.15 * model.state_dict()[k], rtol=1e-6, atol=1e-7), k
        else:
            assert torch.equal(v, model.state_dict()[k]), k  # the batch counter is taken, not averaged


def test_fawa_averages_only_epochs_whose_worst_class_passes_the_threshold(monkeypatch):
    model = Tiny()
    method = training_methods.create_training_method(cfg_of(fawa_begin=1, fawa_threshold=0.2, fawa_decay=0.85))
    worst = iter([0.1, 0.3, 0.25, 0.19])
    monkeypatch.setattr(method, "worst_class_robustness", lambda *a, **k: next(worst))
    method.on_fit_start(model, None)

    def epoch(e):
        method.on_epoch_start(model, e)
        return method.on_epoch_end(model, e, None, None, "cpu")

    assert epoch(0)["fawa_worst_val_acc"] is None  # before fawa_begin: no gate, no average
    assert epoch(1)["fawa_worst_val_acc"] == 10.0 and method.evaluation_model(model) is model  # below 0.2
    assert epoch(2)["fawa_updates"] == 1
    average = method.evaluation_model(model)
    assert average is not model and all(torch.equal(a, b) for a, b in zip(average.state_dict().values(),
                                                                          model.state_dict().values()))
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    old = average.fc.weight.clone()
    assert epoch(3)["fawa_updates"] == 2
    assert torch.allclose(method.evaluation_model(model).fc.weight, 0.85 * old + 0.15 * model.fc.weight, rtol=1e-6)
    kept = average.fc.weight.clone()
    assert epoch(4)["fawa_updates"] == 2 and torch.equal(average.fc.weight, kept)  # 0.19 < 0.2: unchanged
    assert method.evaluation_model(model) is average and not any(p.requires_grad for p in average.parameters())


def test_the_gate_is_the_worst_class_accuracy_on_the_validation_samples():
    model, (x, y, _, _, _) = Tiny(), batch()
    method = training_methods.create_training_method(cfg_of(eps=0.0))  # radius 0: x_adv = x
    with torch.no_grad():
        correct = model.eval()(x).argmax(1) == y
    model.train()
    hand = min(correct[y == c].float().mean().item() for c in range(4))
    assert method.worst_class_robustness(model, x, y, "cpu", seed=0) == pytest.approx(hand)
    assert model.training  # the model's mode is restored
    only = y != 3  # a class absent from the samples does not count
    hand = min(correct[y == c].float().mean().item() for c in range(3))
    assert method.worst_class_robustness(model, x[only], y[only], "cpu", seed=0) == pytest.approx(hand)


# ------------------------------------------------------------------ the losses by hand
def hand_cfa_trades(z_nat, z_adv, y, betas):
    total = 0.0
    for zn, za, t in zip(z_nat, z_adv, y):
        pn, pa = softmax(zn), softmax(za)
        ce = -math.log(pn[t])
        kl = sum(p * math.log(p / q) for p, q in zip(pn, pa))
        total += (ce + betas[t] * kl) / (1 + betas[t])
    return total / len(y)


def rows(t):
    return t.detach().double().tolist()


def test_trades_cfa_loss_by_hand_with_class_betas():
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    model.eval()  # fixed BN statistics: the same logits in every forward
    method = training_methods.create_training_method(cfg_of(cfa_base="trades"))
    method.on_fit_start(model, None)
    method.on_epoch_start(model, 0)
    loss, _ = method.loss(model, x, y, None, {"x_adv": x_adv})  # not calibrated: TRADES / (1 + beta)
    with torch.no_grad():
        z_nat, z_adv = rows(model(x)), rows(model(x_adv))
    assert loss.item() == pytest.approx(hand_cfa_trades(z_nat, z_adv, y.tolist(), [6.0] * 4), rel=1e-5)
    calibrated(method, model)
    loss, stats = method.loss(model, x, y, None, {"x_adv": x_adv})
    assert loss.item() == pytest.approx(hand_cfa_trades(z_nat, z_adv, y.tolist(), [(0.5 + t) * 6 for t in T]), rel=1e-5)
    assert set(stats) == {"ce", "kl_adv", "max_logit_clean", "max_logit_adv"}
    # the logged KL is the plain TRADES regulariser (no class beta in it); it is ~3e-6 here, where float32 sums
    # in another order differ by ~1e-5 relative (seen: 3.1794843e-06 against 3.1794480e-06), hence the abs floor
    assert stats["kl_adv"].item() == pytest.approx(losses.trades_regulariser(model(x), model(x_adv)).item(),
                                                   rel=1e-4, abs=1e-9)


def test_at_cfa_loss_is_the_ce_on_its_x_adv():
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    model.eval()
    method = calibrated(training_methods.create_training_method(cfg_of()), model)
    loss, stats = method.loss(model, x, y, None, {"x_adv": x_adv})
    assert torch.equal(loss, F.cross_entropy(model(x_adv), y)) and set(stats) == {"ce_adv", "max_logit_adv"}


# ------------------------------------------------------------------ DHAT-CFA
@pytest.mark.parametrize("variant", ["at", "trades"])
def test_dhat_cfa_is_the_cfa_loss_plus_dhlr_and_floe(variant):
    model, (x, y, x_adv, x_inv, fg) = Tiny(), batch()
    model.eval()
    cfg = cfg_of(method="dhat", base="cfa", cfa_base=variant)
    dhat = training_methods.create_training_method(cfg)
    cfa = training_methods.create_training_method(cfg_of(cfa_base=variant, attack_mode="train"))  # DHAT's mode
    for m in (dhat, cfa):  # the hooks reach DHAT's base
        m.on_fit_start(model, None)
        (m.base if m is dhat else m).train_robust = torch.tensor(T)
        m.on_epoch_start(model, 1)
    assert torch.equal(dhat.base.class_eps, cfa.class_eps)
    prepared = {"x_adv": x_adv, "x_inv": x_inv, "z_nat": model(x).detach()}
    loss, stats = dhat.loss(model, x, y, fg, prepared)
    base_loss, _ = cfa.loss(model, x, y, None, {"x_adv": x_adv})
    z_adv, z_inv, z_b = model(x_adv), model(x_inv), model(losses.background_only(x_inv, fg))
    terms = (cfg.lambda1 * losses.dhlr_loss(z_adv, z_inv, z_b, form=cfg.dhlr_form)
             + cfg.lambda2 * losses.floe_loss(z_inv, z_b, form=cfg.floe_form, p=cfg.floe_p))
    assert torch.allclose(loss, base_loss + terms, rtol=1e-6, atol=0)
    assert {"dhlr", "floe", "fg_frac"} <= set(stats)
    # DHAT's x_adv is CFA's, with the class-wise radii
    torch.manual_seed(5)
    p = dhat.prepare(model, x, y)
    torch.manual_seed(5)
    assert torch.equal(p["x_adv"], cfa.adversarial(model, x, y))
    # FAWA and its state come from the base
    dhat.base.accept(model)
    assert dhat.evaluation_model(model) is dhat.base.average and dhat.state_dict()["updates"] == 1


# ------------------------------------------------------------------ settings and rows
@pytest.mark.parametrize("key, value, expected", [
    ("cfa.base", "mart", "at, trades"), ("cfa.lambda1", -0.1, "non-negative"), ("cfa.lambda2", -1, "non-negative"),
    ("cfa.begin", -1, "non-negative"), ("cfa.fawa_decay", 1.0, "[0, 1)"), ("cfa.fawa_threshold", 1.5, "[0, 1]"),
    ("cfa.fawa_begin", -2, "non-negative"),
])
def test_cfa_settings_are_validated(key, value, expected):
    with pytest.raises(UserError) as info:
        load_config(None, {"method": "cfa", key: value})
    assert key in str(info.value) and repr(value) in str(info.value) and expected in str(info.value)


def test_defaults_are_the_papers_and_leave_old_digests_alone():
    cfg = TrainConfig()
    cfa = cfg.options("cfa")
    assert (cfa.base, cfa.lambda1, cfa.lambda2, cfa.begin) == ("at", None, 0.5, 10)
    assert (cfa.fawa_decay, cfa.fawa_threshold, cfa.fawa_begin) == (0.85, 0.2, 50)
    assert load_config(None, {"method": "cfa"}).digest() == TrainConfig(method="cfa").digest()  # defaults: not hashed
    assert load_config(None, {"cfa.fawa_decay": 0.88}).digest() != cfg.digest()
    assert training_methods.TRAINING_METHODS["cfa"].cls is CFA and "cfa" in training_methods.base_methods()
    rows = compare.METHOD_ROWS
    assert (rows["cfa"].method, rows["dhat-cfa"].method, rows["dhat-cfa"].base) == ("cfa", "dhat", "cfa")


# ------------------------------------------------------------------ end to end
def tiny_run(**overrides) -> TrainConfig:
    values = dict(method="cfa", data="synthetic", image_size=16, model="small_cnn", train_size=32, test_size=8,
                  val_size=8, epochs=1, batch_size=12, attack_steps=1, inv_steps=1, val_examples=8,
                  val_attack_steps=1, device="cpu", milestones=[], attention="oracle", floe_form="relative",
                  cfa_begin=1, fawa_begin=0, fawa_threshold=0.0)
    values.update(overrides)
    return load_config(None, values)


def metrics(run) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k != "seconds"}
            for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("settings, terms", [
    (dict(method="cfa"), {"train_ce_adv"}),
    (dict(method="dhat", base="cfa", cfa_base="trades"), {"train_ce", "train_kl_adv", "train_dhlr", "train_floe"}),
], ids=["cfa", "dhat-cfa-trades"])
def test_one_epoch_trains_and_saves_the_average_apart(tmp_path, settings, terms):
    summary = Experiment(tiny_run(**settings), tmp_path / "run", cache_dir=tmp_path / "c", progress=False,
                         on_epoch=lambda r: None).run()
    (record,) = metrics(tmp_path / "run")
    assert terms <= set(record) and math.isfinite(record["train_loss"])
    assert record["fawa_updates"] == 1 and 0 <= record["cfa_worst_train_acc"] <= 100
    assert summary["method"] == settings["method"] and 0 <= summary["pgd10_acc"] <= 100
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("epoch_*")
    assert (ckpt / "train_model.safetensors").is_file()  # the trained weights, for resume
    assert load_file(ckpt / "model.safetensors").keys() == load_file(ckpt / "train_model.safetensors").keys()


def test_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    """Epoch 2 needs epoch 1's class accuracies (CCM) and its weight average (FAWA): an
    interrupted and resumed run ends like an uninterrupted one."""
    cfg = tiny_run(epochs=2, cfa_base="trades")
    reference = Experiment(cfg, tmp_path / "straight", cache_dir=tmp_path / "c", progress=False,
                           on_epoch=lambda r: None).run()
    straight = metrics(tmp_path / "straight")
    assert straight[1]["cfa_eps_min"] is not None and straight[1]["fawa_updates"] == 2
    original = CFA.on_epoch_start

    def interrupted(self, model, epoch):  # killed when epoch 2 starts, after epoch 1's checkpoint
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, model, epoch)

    monkeypatch.setattr(CFA, "on_epoch_start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Experiment(cfg, tmp_path / "resumed", cache_dir=tmp_path / "c", progress=False, on_epoch=lambda r: None).run()
    monkeypatch.setattr(CFA, "on_epoch_start", original)
    assert len(metrics(tmp_path / "resumed")) == 1
    resumed = Experiment(cfg, tmp_path / "resumed", cache_dir=tmp_path / "c", progress=False,
                         on_epoch=lambda r: None).run(resume=True)
    assert resumed == reference and metrics(tmp_path / "resumed") == straight
    for name in ("model.safetensors", "train_model.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoints" / "epoch_0002" / name) for run in ("straight", "resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
