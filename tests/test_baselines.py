"""TRADES, MART, DHAT on another method's loss (``base``) and AWP (issue 11, parts 1-2),
checked against hand computations of the official formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dhat_seg import attacks, losses, training_methods
from dhat_seg.training_methods import awp
from dhat_seg.cli import app
from dhat_seg.config import TrainConfig, load_config
from dhat_seg.errors import UserError
from dhat_seg.run.experiment import Experiment
from method_helpers import Tiny, TinyBN, batch


def cfg_of(**overrides) -> TrainConfig:
    values = dict(method="at", model="small_cnn", attention="oracle", attack_steps=2, inv_steps=2, device="cpu",
                  lambda1=0.7, lambda2=0.3, floe_form="paper", trades_beta=6.0, mart_beta=5.0)
    values.update(overrides)
    return load_config(None, values)


# ------------------------------------------------------------------ hand computations (plain Python)
def softmax(v):
    m = max(v)
    e = [math.exp(a - m) for a in v]
    return [a / sum(e) for a in e]


def hand_trades(z_nat, z_adv, y, beta):
    ce, kl = 0.0, 0.0
    for zn, za, t in zip(z_nat, z_adv, y):
        pn, pa = softmax(zn), softmax(za)
        ce += -math.log(pn[t])
        kl += sum(p * math.log(p / q) for p, q in zip(pn, pa))
    return (ce + beta * kl) / len(y)


def hand_mart(z_nat, z_adv, y, beta):
    bce, robust = 0.0, 0.0
    for zn, za, t in zip(z_nat, z_adv, y):
        pn, pa = softmax(zn), softmax(za)
        wrong = max((k for k in range(len(pa)) if k != t), key=lambda k: pa[k])  # most probable wrong class
        bce += -math.log(pa[t]) - math.log(1.0001 - pa[wrong] + 1e-12)
        kl = sum(p * (math.log(p) - math.log(q + 1e-12)) for p, q in zip(pn, pa))
        robust += kl * (1.0000001 - pn[t])
    return bce / len(y) + beta * robust / len(y)


def rows(t):
    return t.detach().double().tolist()


# ------------------------------------------------------------------ TRADES
def test_trades_loss_by_hand_with_a_fixed_x_adv():
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    method = training_methods.create_training_method(cfg_of(method="trades"))
    loss, stats = method.loss(model, x, y, None, {"x_adv": x_adv})
    with torch.no_grad():
        expected = hand_trades(rows(model(x)), rows(model(x_adv)), y.tolist(), 6.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(stats["ce"].item() + 6.0 * stats["kl_adv"].item(), rel=1e-6)


def test_trades_kl_attack_raises_the_kl_and_stays_in_the_ball():
    model, (x, _, _, _, _) = Tiny(), batch(16)
    eps = 8 / 255
    torch.manual_seed(0)
    x_adv = attacks.trades_kl_attack(model, x, eps, 2 / 255, 10)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        z = model(x)
        start = losses.trades_regulariser(z, model((x + 0.001 * torch.randn_like(x)).clamp(0, 1)))
        assert losses.trades_regulariser(z, model(x_adv)) > 10 * start


def test_trades_uses_its_kl_attack_not_pgd(monkeypatch):
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    monkeypatch.setattr(attacks, "pgd", lambda *a, **k: pytest.fail("TRADES attacked with PGD-CE"))
    seen = {}

    def kl_attack(m, xx, eps, alpha, steps, **kw):
        seen.update(eps=eps, alpha=alpha, steps=steps, **kw)
        return x_adv

    monkeypatch.setattr(attacks, "trades_kl_attack", kl_attack)
    method = training_methods.create_training_method(cfg_of(method="trades", attack_mode="eval"))
    assert method.prepare(model, x, y)["x_adv"] is x_adv
    assert seen == dict(eps=8 / 255, alpha=2 / 255, steps=2, mode="eval", precision="fp32")


# ------------------------------------------------------------------ MART
Z_NAT = [[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 0.2, -0.5], [1.5, 1.4, 0.0, 0.3]]
Z_ADV = [[1.0, 1.5, -0.5, 0.0], [0.3, 2.0, 0.1, 0.0], [0.2, 0.1, 1.0, 0.9]]
Y = [0, 1, 3]  # sample 0: top class is wrong; sample 1: top class is y (runner-up taken); sample 2: y not in the top 2


def test_mart_terms_by_hand():
    bce, robust = losses.mart_terms(torch.tensor(Z_NAT), torch.tensor(Z_ADV), torch.tensor(Y))
    assert (bce + 5.0 * robust).item() == pytest.approx(hand_mart(Z_NAT, Z_ADV, Y, 5.0), rel=1e-5)
    assert (bce + 0.0 * robust).item() == pytest.approx(hand_mart(Z_NAT, Z_ADV, Y, 0.0), rel=1e-5)


def test_mart_loss_by_hand_with_a_fixed_x_adv():
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    loss, stats = training_methods.create_training_method(cfg_of(method="mart")).loss(model, x, y, None, {"x_adv": x_adv})
    with torch.no_grad():
        expected = hand_mart(rows(model(x)), rows(model(x_adv)), y.tolist(), 5.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(stats) == {"bce_adv", "kl_weighted", "max_logit_clean", "max_logit_adv"}


# ------------------------------------------------------------------ composition: DHAT on a base
def _dhat_terms(model, cfg, x_adv, x_inv, fg):
    z_adv, z_inv, z_b = model(x_adv), model(x_inv), model(losses.background_only(x_inv, fg))
    return (cfg.lambda1 * losses.dhlr_loss(z_adv, z_inv, z_b, form=cfg.dhlr_form)
            + cfg.lambda2 * losses.floe_loss(z_inv, z_b, form=cfg.floe_form, p=cfg.floe_p))


@pytest.mark.parametrize("base", ["trades", "mart"])
def test_dhat_on_a_base_is_the_base_loss_plus_dhlr_and_floe(base):
    model, (x, y, x_adv, x_inv, fg) = Tiny(), batch()
    cfg = cfg_of(method="dhat", base=base)
    prepared = {"x_adv": x_adv, "x_inv": x_inv, "z_nat": model(x).detach()}
    loss, stats = training_methods.create_training_method(cfg).loss(model, x, y, fg, prepared)
    base_loss, _ = training_methods.create_training_method(cfg_of(method=base)).loss(model, x, y, None, {"x_adv": x_adv})
    assert torch.allclose(loss, base_loss + _dhat_terms(model, cfg, x_adv, x_inv, fg), rtol=1e-6, atol=0)
    base_terms = {"trades": {"ce", "kl_adv"}, "mart": {"bce_adv", "kl_weighted"}}[base]
    assert base_terms | {"dhlr", "floe", "fg_frac"} <= set(stats)


def test_dhat_on_trades_makes_x_inv_from_the_trades_x_adv(monkeypatch):
    model, (x, y, x_adv, x_inv, _) = Tiny(), batch()
    monkeypatch.setattr(attacks, "pgd", lambda *a, **k: pytest.fail("base trades attacked with PGD-CE"))
    monkeypatch.setattr(attacks, "trades_kl_attack", lambda *a, **k: x_adv)
    seen = {}

    def inverse(m, xx, yy, p_nat, p_adv, *a, **k):
        seen["p_adv"] = p_adv
        return x_inv

    monkeypatch.setattr(attacks, "inverse_adversarial", inverse)
    prepared = training_methods.create_training_method(cfg_of(method="dhat", base="trades")).prepare(model, x, y)
    assert prepared["x_adv"] is x_adv and prepared["x_inv"] is x_inv
    with torch.no_grad():
        assert torch.allclose(seen["p_adv"], F.softmax(model(x_adv), dim=1))


def test_dhat_on_at_is_the_paper_loss_bit_for_bit():
    model, (x, y, _, _, fg) = Tiny(), batch()
    cfg = cfg_of(method="dhat")  # base: at
    torch.manual_seed(3)
    loss, stats = training_methods.create_training_method(cfg).loss(model, x, y, fg)
    # the reference, from the attacks and losses directly
    torch.manual_seed(3)
    x_adv = attacks.pgd(model, x, y, 8 / 255, 2 / 255, 2, mode="train")
    with torch.no_grad():
        p_nat, p_adv = F.softmax(model(x), dim=1), F.softmax(model(x_adv), dim=1)
    x_inv = attacks.inverse_adversarial(model, x, y, p_nat, p_adv, 4 / 255, 2 / 255, 2, mode="train")
    expected = F.cross_entropy(model(x_adv), y) + _dhat_terms(model, cfg, x_adv, x_inv, fg)
    assert torch.equal(loss, expected)
    assert set(stats) == {"ce_adv", "dhlr", "floe", "fg_frac", "max_logit_clean", "max_logit_background"}


def test_uiat_takes_a_base_too():
    model, (x, y, x_adv, x_inv, _) = Tiny(), batch()
    cfg = cfg_of(method="uiat", base="mart")
    prepared = {"x_adv": x_adv, "x_inv": x_inv, "z_nat": model(x).detach()}
    loss, stats = training_methods.create_training_method(cfg).loss(model, x, y, None, prepared)
    base_loss, _ = training_methods.create_training_method(cfg_of(method="mart")).loss(model, x, y, None, {"x_adv": x_adv})
    expected = base_loss + cfg.lambda1 * losses.uiat_regulariser(model(x_adv), model(x_inv))
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0) and "kl_inv" in stats and "bce_adv" in stats


# ------------------------------------------------------------------ AWP
def _state(model):
    return {**{k: v.detach().clone() for k, v in model.named_parameters()},
            **{k: v.clone() for k, v in model.named_buffers()}}


@pytest.mark.parametrize("method", ["at", "trades", "dhat"])
def test_awp_restores_every_weight_bit_for_bit_after_a_step(method):
    model, (x, y, _, _, fg) = TinyBN().train(), batch()
    m = training_methods.create_training_method(cfg_of(method=method, base="mart", awp=True, awp_gamma=0.01))
    before = _state(model)
    with m.weight_perturbation(model, x, y, fg, epoch=0) as prepared:
        inside = _state(model)
        # the proxy step left the model's BN statistics alone; only weights with dim > 1 moved
        for k, v in model.named_buffers():
            assert torch.equal(v, before[k]), k
        for k, p in model.named_parameters():
            assert torch.equal(p, before[k]) == (p.dim() <= 1), k
        loss, _ = m.loss(model, x, y, fg, prepared)
        loss.backward()
    after = _state(model)
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]), k  # restored bit for bit
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not torch.equal(inside["conv.weight"], after["conv.weight"])
    # without a training forward inside, the buffers are untouched as well
    before = _state(model)
    with m.weight_perturbation(model, x, y, fg, epoch=0):
        pass
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_awp_restores_the_weights_when_the_step_fails():
    model, (x, y, _, _, _) = TinyBN().train(), batch()
    m = training_methods.create_training_method(cfg_of(awp=True))
    before = _state(model)
    with pytest.raises(RuntimeError, match="diverged"):
        with m.weight_perturbation(model, x, y, None, epoch=0):
            raise RuntimeError("diverged")
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_awp_perturbation_is_gamma_times_each_layer_norm_and_raises_the_loss():
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    adversary = awp.AdversarialWeightPerturbation(gamma=0.02)
    loss_fn = lambda m: F.cross_entropy(m(x_adv), y)  # noqa: E731  (AT-AWP)
    clean_loss = loss_fn(model).item()
    before = _state(model)
    with adversary.perturbed(model, loss_fn) as v:
        assert set(v) == {"conv.weight", "fc.weight"}  # dim > 1 only: no biases
        for name, p in model.named_parameters():
            if name in v:
                assert torch.linalg.vector_norm(v[name]).item() == pytest.approx(
                    0.02 * torch.linalg.vector_norm(before[name]).item(), rel=1e-5)
                assert torch.equal(p, before[name] + v[name])
            else:
                assert torch.equal(p, before[name])
        perturbed_loss = loss_fn(model).item()
    assert perturbed_loss > clean_loss  # an ascent direction: the proxy stepped on the negative loss
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_awp_warm_up_epochs_do_nothing():
    model, (x, y, _, _, _) = TinyBN().train(), batch()
    m = training_methods.create_training_method(cfg_of(awp=True, awp_warmup=2, epochs=3))
    before = _state(model)
    for epoch in (0, 1):
        with m.weight_perturbation(model, x, y, None, epoch) as prepared:
            assert prepared is None
            assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
    assert m._awp is None  # no proxy was even built
    with m.weight_perturbation(model, x, y, None, 2) as prepared:
        assert set(prepared) == {"x_adv"} and not torch.equal(model.conv.weight, before["conv.weight"])
    # awp off: a no-op whatever the epoch
    off = training_methods.create_training_method(cfg_of())
    with off.weight_perturbation(model, x, y, None, 5) as prepared:
        assert prepared is None


# ------------------------------------------------------------------ end to end, one epoch each
def tiny_run(**overrides) -> TrainConfig:
    values = dict(data="synthetic", image_size=16, model="small_cnn", train_size=32, test_size=8, val_size=8, epochs=1,
                  batch_size=12, attack_steps=1, inv_steps=1, val_examples=8, val_attack_steps=1, device="cpu",
                  milestones=[], attention="oracle", floe_form="relative")
    values.update(overrides)
    return load_config(None, values)


@pytest.mark.parametrize("settings, terms", [
    (dict(method="trades"), {"train_ce", "train_kl_adv"}),
    (dict(method="mart"), {"train_bce_adv", "train_kl_weighted"}),
    (dict(method="at", awp=True, awp_gamma=0.01), {"train_ce_adv"}),
    (dict(method="dhat", base="trades", awp=True), {"train_ce", "train_kl_adv", "train_dhlr", "train_floe"}),
], ids=["trades", "mart", "at-awp", "dhat-trades-awp"])
def test_one_epoch_of_each_new_method_trains(tmp_path, settings, terms):
    summary = Experiment(tiny_run(**settings), tmp_path / "run", cache_dir=tmp_path / "c", progress=False,
                         on_epoch=lambda r: None).run()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert terms <= set(record) and math.isfinite(record["train_loss"])
    assert summary["method"] == settings["method"] and 0 <= summary["pgd10_acc"] <= 100


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("key, value, expected", [
    ("base", "fgsm", "at, trades, mart"), ("trades.beta", -1, "non-negative"), ("mart.beta", -0.5, "non-negative"),
    ("awp_gamma", -0.01, "non-negative"), ("awp_warmup", 5, "smaller than epochs"), ("awp_warmup", -1, "smaller than epochs"),
    ("awp", "yes", "true or false"), ("trades.beta", "six", "a number"),
])
def test_new_settings_are_validated(key, value, expected):
    with pytest.raises(UserError) as info:
        load_config(None, {key: value, "epochs": 3})
    message = str(info.value)
    assert key in message and repr(value) in message and expected in message, message


def test_base_is_validated_for_every_method_and_defaults_to_at():
    with pytest.raises(UserError, match="base 'fgsm' is unknown"):
        load_config(None, {"method": "at", "base": "fgsm"})
    assert load_config(None, {}).base == "at" and not load_config(None, {}).awp


def test_train_help_lists_every_training_method():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in training_methods.TRAINING_METHODS:
        assert name in result.output, name
    assert "base=at|trades|mart" in result.output and "awp=true" in result.output


def test_cli_refuses_a_bad_base_before_any_work(tmp_path):
    from cli_helpers import assert_one_line_error

    result = CliRunner().invoke(app, ["train", "--method", "dhat", "--out", str(tmp_path / "run"), "--cache-dir",
                                      str(tmp_path / "c"), "--set", "base=fgsm"])
    assert_one_line_error(result, "base", "fgsm", "at, trades, mart")
    assert not (tmp_path / "run").exists()
