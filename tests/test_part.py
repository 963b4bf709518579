"""PART (pixel-reweighted adversarial training, training_methods/part.py): the per-pixel
projection (exact, also after many steps and at the clip to [0, 1]), the budget map, the float
path left bit for bit as it was, the loss = the base's loss on PART's x_adv, the settings,
the compare rows, and short runs on the built-in data (self-attention Grad-CAM; the oracle)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dhat_seg import attacks, training_methods
from dhat_seg.studies import ablate, compare
from dhat_seg.studies import rows as study_rows
from dhat_seg.attention import foreground_mask
from dhat_seg.config import TrainConfig, load_config
from dhat_seg.method_options import flat_settings, migrate
from dhat_seg.errors import UserError
from dhat_seg.evaluation.report import EvalOptions
from dhat_seg.run.experiment import Experiment
from dhat_seg.method_defaults import describe_part_masks
from dhat_seg.training_methods.part import PART, PART_BASES, eps_low_of, pixel_budget
from method_helpers import Tiny

ROOT = Path(__file__).resolve().parents[1]
EPS, LOW = 8 / 255, 7 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n=32, seed=1):
    """Images with exact 0s and 1s (the clip) and values within eps of them, labels, a random mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[:, :, 0] = 0.0
    x[:, :, 1] = 1.0
    x[:, :, 2] = 1.0 - 0.5 * EPS
    y = torch.randint(0, 4, (n,), generator=g)
    fg = torch.rand(n, 1, 8, 8, generator=g) > 0.6
    return x, y, fg


def cfg_of(**overrides) -> TrainConfig:
    values = dict(method="part", model="small_cnn", attention="oracle", attack_steps=2, device="cpu")
    values.update(overrides)
    return load_config(None, values)


# ------------------------------------------------------------------ the projection
def test_naive_bounds_overshoot_so_the_test_below_means_something():
    x, _, fg = batch()
    eps = pixel_budget(fg, EPS, LOW)
    assert ((x + eps) - x > eps).any()  # float rounding puts x + eps outside the budget somewhere
    lo, hi = attacks._box(x, attacks._per_sample(eps, x))
    assert ((hi - x) <= eps).all() and ((x - lo) <= eps).all()
    assert ((hi - x) >= eps - 1e-7).all() and ((x - lo) >= eps - 1e-7).all()  # moved by one float step at most


@pytest.mark.parametrize("per_channel", [False, True], ids=["pixel", "pixel-and-channel"])
def test_pgd_keeps_every_pixel_inside_its_own_budget_exactly(per_channel):
    model, (x, y, fg) = Tiny().eval(), batch()
    if per_channel:  # one budget per pixel and channel (B x C x H x W)
        g = torch.Generator().manual_seed(5)
        fg = torch.rand(x.shape, generator=g) > 0.5
    eps = pixel_budget(fg, EPS, LOW)
    torch.manual_seed(0)
    for x_adv in (attacks.pgd(model, x, y, eps, 3 / 255, 40),
                  attacks.trades_kl_attack(model, x, eps, 3 / 255, 40),
                  attacks.pgd(model, x, y, eps, 1.0, 3, random_start=False)):  # steps far beyond every bound
        d = (x_adv - x).abs()
        assert (d <= eps).all(), (d - eps).max().item()  # exact: no tolerance
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv[:, :, 1] <= 1).all() and (d[:, :, 0] <= eps.expand_as(d)[:, :, 0]).all()
    # the one-step attack with a step of 1 lands every moved interior pixel on its bound
    inside = (x > EPS) & (x < 1 - EPS) & (x_adv != x)
    assert torch.allclose(d[inside], eps.expand_as(d)[inside], atol=1e-7)
    assert d.expand_as(d)[fg.expand_as(d) & inside].max() > LOW + 1e-4  # important pixels use their larger budget
    assert d[~fg.expand_as(d)].max() <= LOW


def test_projection_at_the_clip_to_zero_and_one():
    x, _, fg = batch()
    eps = attacks._per_sample(pixel_budget(fg, EPS, LOW), x)
    box = attacks._box(x, eps)
    for far in (x + 1.0, x - 1.0):
        p = attacks._project(far.clone(), box)
        assert ((p - x).abs() <= eps).all() and p.min() >= 0 and p.max() <= 1
        assert torch.equal(p, torch.min(torch.max(far, box[0]), box[1]).clamp(0, 1))
    assert torch.equal(attacks._project((x + 1.0)[:, :, 1:2].clone(), (box[0][:, :, 1:2], box[1][:, :, 1:2])),
                       torch.ones_like(x[:, :, 1:2]))  # pixels at 1 stay at 1


def test_budget_map_by_hand():
    mask = torch.tensor([[[[True, False, True], [False, False, True]]]])
    hand = torch.tensor([[[[8, 7, 8], [7, 7, 8]]]], dtype=torch.float32) / 255
    assert torch.equal(pixel_budget(mask, 8 / 255, 7 / 255), hand)
    assert pixel_budget(mask, 8 / 255, 7 / 255).dtype == torch.float32
    method = training_methods.create_training_method(cfg_of())
    assert isinstance(method, PART) and torch.equal(method.budget(mask), hand)
    assert eps_low_of(cfg_of()) == 7 / 255  # the paper's eps - 1/255
    assert eps_low_of(cfg_of(part_eps_low=4)) == 4 / 255 and eps_low_of(cfg_of(eps=0.5)) == 0.0
    with pytest.raises(UserError, match="bool"):
        pixel_budget(mask.float(), EPS, LOW)


def test_budget_shapes_are_checked():
    model, (x, y, _) = Tiny(), batch(n=4)
    with pytest.raises(UserError, match="does not broadcast"):
        attacks.pgd(model, x, y, torch.full((4, 1, 4, 4), EPS), 2 / 255, 1)


# ------------------------------------------------------------------ the float path, bit for bit as before
def _old_project(x_adv, x, eps):
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _old_pgd(model, x, y, eps, alpha, steps):
    x = x.detach()
    x_adv = _old_project(x.clone() + torch.empty_like(x).uniform_(-eps, eps), x, eps)
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv).float(), y, reduction="none").sum(), x_adv)
            x_adv = _old_project(x_adv.detach() + alpha * grad.sign(), x, eps)
    return x_adv.detach()


def _old_trades(model, x, eps, alpha, steps):
    with torch.no_grad():
        p_nat = F.softmax(model(x).float(), dim=1)
    x_adv = _old_project(x + 0.001 * torch.randn_like(x), x, eps)
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            objective = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), p_nat, reduction="sum")
            (grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = _old_project(x_adv.detach() + alpha * grad.sign(), x, eps)
    return x_adv.detach()


def test_a_float_eps_gives_the_results_of_before_bit_for_bit():
    model, (x, y, _) = Tiny().eval(), batch()
    for new, old in ((lambda: attacks.pgd(model, x, y, EPS, 3 / 255, 12), lambda: _old_pgd(model, x, y, EPS, 3 / 255, 12)),
                     (lambda: attacks.trades_kl_attack(model, x, EPS, 3 / 255, 12), lambda: _old_trades(model, x, EPS, 3 / 255, 12))):
        torch.manual_seed(7)
        a = new()
        torch.manual_seed(7)
        assert torch.equal(a, old())


# ------------------------------------------------------------------ the method
@pytest.fixture
def recorded(monkeypatch):
    """Every attack's name and radius, around the real attacks."""
    seen = []
    for name in ("pgd", "trades_kl_attack"):
        real = getattr(attacks, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            eps = args[3] if _name == "pgd" else args[2]
            seen.append((_name, eps))
            return _real(*args, **kwargs)

        monkeypatch.setattr(attacks, name, spy)
    return seen


@pytest.mark.parametrize("base, attack", [("at", "pgd"), ("trades", "trades_kl_attack"), ("mart", "pgd")])
def test_part_loss_is_the_base_loss_on_the_part_x_adv(base, attack, recorded):
    model, (x, y, fg) = Tiny(), batch(n=8)
    method = training_methods.create_training_method(cfg_of(base=base))
    plain = training_methods.create_training_method(cfg_of(method=base))
    torch.manual_seed(3)
    x_adv = method.adversarial(model, x, y, fg)
    name, eps = recorded[-1]
    assert name == attack and torch.equal(eps, pixel_budget(fg, EPS, LOW))  # the base's own attack, PART's budget
    assert ((x_adv - x).abs() <= eps).all() and ((x_adv - x).abs()[~fg.expand_as(x)] <= LOW).all()
    loss, stats = method.loss(model, x, y, fg, {"x_adv": x_adv})
    reference, _, reference_stats = plain.base_loss(model, x, y, x_adv)
    assert torch.equal(loss, reference)
    assert stats["fg_frac"].item() == pytest.approx(fg.float().mean().item())
    assert set(reference_stats) < set(stats)
    torch.manual_seed(3)
    assert torch.equal(method.loss(model, x, y, fg)[0], loss)  # x_adv made inside: the same
    # the burn-in: the base method unchanged (a float radius eps on every pixel)
    torch.manual_seed(4)
    warm, _ = method.warmup_loss(model, x, y)
    assert recorded[-1] == (attack, EPS)
    torch.manual_seed(4)
    assert torch.equal(warm, plain.loss(model, x, y)[0])
    with pytest.raises(UserError, match="needs foreground masks"):
        method.loss(model, x, y, None)


def test_awp_prepares_x_adv_with_the_batch_mask(recorded):
    model, (x, y, fg) = Tiny(), batch(n=8)
    method = training_methods.create_training_method(cfg_of(awp=True, awp_gamma=0.01))
    with method.weight_perturbation(model, x, y, fg, 3) as prepared:
        assert torch.equal(recorded[-1][1], pixel_budget(fg, EPS, LOW))
        assert ((prepared["x_adv"] - x).abs()[~fg.expand_as(x)] <= LOW).all()
        loss, _ = method.loss(model, x, y, fg, prepared)
    assert math.isfinite(loss.item()) and method._foreground is None
    with method.weight_perturbation(model, x, y, fg, 3, warmup=True) as prepared:
        assert recorded[-1][1] == EPS  # the burn-in: no mask
        method.warmup_loss(model, x, y, prepared)


def test_mean_std_policy_is_the_standardised_map_above_one():
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(5, 1, 6, 6, generator=g) ** 3
    flat = maps.flatten(1).double()
    z = (flat - flat.mean(1, keepdim=True)) / flat.std(1, unbiased=False, keepdim=True)
    assert torch.equal(foreground_mask(maps, "mean_std").flatten(1), z > 1)
    assert not foreground_mask(torch.full((1, 1, 4, 4), 0.5), "mean_std").any()  # a flat map: nothing important


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("overrides, expected", [
    ({"part.eps_low": 9.0}, "part.eps_low=9.0 is invalid"), ({"part.eps_low": -1.0}, "part.eps_low=-1.0 is invalid"),
    ({"base": "cfa"}, "expected one of at, trades, mart"), ({"base": "sglr"}, "expected one of at, trades, mart"),
])
def test_settings_are_validated(overrides, expected):
    with pytest.raises(UserError, match=expected):
        cfg_of(**overrides)


def test_the_new_setting_leaves_old_digests_alone():
    assert TrainConfig().options("part").eps_low is None
    assert load_config(None, {"part.eps_low": None}).digest() == load_config(None, {}).digest()
    assert load_config(None, {"part.eps_low": 5.0}).digest() != load_config(None, {}).digest()
    assert PART_BASES == ("at", "trades", "mart") and "part" in training_methods.TRAINING_METHODS


def test_the_config_file_holds_the_paper_schedule_of_the_compare_preset():
    values = flat_settings(migrate(yaml.safe_load((ROOT / "configs" / "part.yaml").read_text())))
    assert {k: values[k] for k in study_rows.PART_PAPER_TRAIN} == study_rows.PART_PAPER_TRAIN
    cfg = load_config(str(ROOT / "configs" / "part.yaml"))
    assert (cfg.method, cfg.model, cfg.epochs, cfg.lr, cfg.weight_decay, cfg.milestones) == ("part", "resnet18", 80, 0.01,
                                                                                            2e-4, [60])
    assert (cfg.attention_source, cfg.attention_burn_in, cfg.mask_refresh_every, cfg.threshold_policy) == ("self", 20, 1,
                                                                                                           "mean_std")
    assert cfg.attention_options == {"target": "pred"} and eps_low_of(cfg) == LOW
    paper = ablate.base_config(ablate.ABLATE_PRESETS["part-paper"], {})
    assert (paper.model, paper.epochs, paper.lr, paper.milestones, paper.attack_mode) == ("resnet18", 80, 0.01, [60], "eval")


def test_method_part_alone_takes_the_paper_masks_and_the_user_s_settings_win():
    # `dhat-seg train --method part`: the paper's masks, not DHAT's frozen Grad-CAM defaults
    cfg = load_config(None, {"method": "part"})
    assert (cfg.attention, cfg.attention_source, cfg.attention_options, cfg.threshold_policy, cfg.mask_refresh_every,
            cfg.attention_burn_in) == ("gradcam", "self", {"target": "pred"}, "mean_std", 1, 25)  # 20/80 of 100 epochs
    quick = load_config("quick", {"method": "part", "base": "trades"})
    assert (quick.attention_source, quick.attention_burn_in, quick.threshold_policy) == ("self", 4, "mean_std")
    given = load_config("quick", {"method": "part", "threshold_policy": "otsu", "attention_burn_in": 3,
                                  "mask_refresh_every": 2, "attention_options": {"target": "label"}})
    assert (given.threshold_policy, given.attention_burn_in, given.mask_refresh_every, given.attention_options) == (
        "otsu", 3, 2, {"target": "label"})
    oracle = load_config("quick", {"method": "part", "attention": "oracle"})
    assert (oracle.attention_source, oracle.mask_refresh_every, oracle.threshold_policy, oracle.attention_burn_in) == (
        "frozen", 0, "fixed", 4)
    assert load_config("quick", {"method": "dhat"}).attention_source == "frozen"  # other methods: untouched
    line = describe_part_masks(quick)
    assert "gradcam of the model being trained" in line and "mean_std" in line and "4 burn-in epoch(s) of plain TRADES" in line
    assert "frozen, from the mask cache" in describe_part_masks(oracle)


# ------------------------------------------------------------------ compare rows
def quick_base(**more):
    return ablate.base_config(ablate.ABLATE_PRESETS["quick"], {"image_size": 16, "train_size": 100, "test_size": 40,
                                                               "device": "cpu", **more})


def test_compare_rows():
    base, options = quick_base(), ablate.ABLATE_PRESETS["quick"].attention_options
    rows, skipped = compare.parse_methods("part,PART_T,part-mart", "gradcam", {"gradcam": 1})
    assert rows == ["part", "part-t", "part-m"] and not skipped
    for name, row_base in zip(rows, PART_BASES):
        cfg = compare.method_config(base, name, "gradcam", options)
        assert (cfg.method, cfg.base, cfg.attention, cfg.attention_options) == ("part", row_base, "gradcam", {"target": "pred"})
        assert (cfg.attention_source, cfg.mask_refresh_every, cfg.threshold_policy) == ("self", 1, "mean_std")
        assert cfg.attention_burn_in == 4  # 20 of the paper's 80 epochs -> 4 of the quick preset's 15
    assert compare.method_config(quick_base(epochs=80), "part", "gradcam").attention_burn_in == 20
    assert [compare.method_config(quick_base(epochs=e), "part", "gradcam").attention_burn_in for e in (2, 3, 6)] == [1, 1, 2]
    with pytest.raises(UserError, match="needs >= 2 epochs"):  # 1 epoch: no room for the burn-in the model's masks need
        compare.method_config(quick_base(epochs=1), "part", "gradcam")
    # a segmenter's or the ground truth's masks do not depend on the model: frozen, thresholded as the base says
    for attention in ("u2net", "oracle"):
        cfg = compare.method_config(base, "part-t", attention, options)
        assert (cfg.attention, cfg.attention_source, cfg.mask_refresh_every, cfg.threshold_policy) == (
            attention, "frozen", 0, "fixed")
        assert cfg.attention_burn_in == 4 and "target" not in cfg.attention_options
    # --set wins; the other rows are untouched
    kept = compare.method_config(quick_base(mask_refresh_every=10, attention_burn_in=3, threshold_policy="otsu",
                                            attention_options={"target": "label"}), "part", "gradcam")
    assert (kept.mask_refresh_every, kept.attention_burn_in, kept.threshold_policy) == (10, 3, "otsu")
    assert kept.attention_options == {"target": "label"}
    at = compare.method_config(base, "at", "gradcam")
    assert (at.attention_source, at.attention_burn_in, at.threshold_policy) == ("frozen", 0, "fixed")
    assert set(compare.PAPER_PART_RESULTS) <= set(compare.METHOD_ROWS)
    assert compare.PAPER_PART_RESULTS["part-t"] == {"clean": 79.36, "pgd20": 48.90, "aa": 45.97}


# ------------------------------------------------------------------ end to end on the built-in data
def tiny_run(**overrides) -> TrainConfig:
    values = dict(data="synthetic", image_size=16, model="small_cnn", train_size=32, test_size=8, val_size=8, epochs=1,
                  batch_size=12, attack_steps=1, val_examples=8, val_attack_steps=1, device="cpu", milestones=[],
                  method="part", attention="oracle")
    values.update(overrides)
    return load_config(None, values)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_self_attention_grad_cam_after_a_burn_in_epoch(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_run(attention="gradcam", attention_options={"target": "pred"}, attention_source="self", attention_burn_in=1,
                   mask_refresh_every=1, threshold_policy="mean_std", epochs=2)
    summary = Experiment(cfg, run, cache_dir=tmp_path / "c", progress=False, on_epoch=lambda r: None).run()
    burn_in, part = records(run)
    assert "train_fg_frac" not in burn_in and "train_ce_adv" in burn_in  # plain AT
    assert 0 < part["train_fg_frac"] < 0.5 and math.isfinite(part["train_loss"])  # mean + std: a minority of pixels
    assert len([p for p in (run / "masks").iterdir() if p.is_dir()]) == 1  # the masks of epoch 2's weights
    assert summary["method"] == "part" and summary["attention"] == "gradcam" and 0 <= summary["pgd10_acc"] <= 100
    assert not (tmp_path / "c" / "attention-models").exists()  # no separate attention model was trained


def test_frozen_oracle_masks_on_trades(tmp_path):
    run = tmp_path / "run"
    summary = Experiment(tiny_run(base="trades"), run, cache_dir=tmp_path / "c", progress=False,
                         on_epoch=lambda r: None).run()
    (record,) = records(run)
    assert {"train_ce", "train_kl_adv", "train_fg_frac"} <= set(record) and 0 < record["train_fg_frac"] < 1
    assert summary["attention"] == "oracle" and math.isfinite(record["train_loss"])


def test_a_quick_compare_row_trains_and_evaluates(tmp_path):
    preset = ablate.ABLATE_PRESETS["quick"]
    base = quick_base(epochs=2, train_size=48, test_size=16, val_size=0.25, batch_size=24, attack_steps=1,
                      val_examples=8, val_attack_steps=1)
    options = dataclasses.replace(EvalOptions(), **{**preset.eval, "attacks": "clean,pgd10", "n_examples": 16,
                                                    "gap_examples": 16, "iou_examples": 16, "sanity_examples": 8},
                                  device="cpu").validate()
    out = tmp_path / "out"
    result = compare.run_comparison(["part-m"], base, options, out, attention="gradcam", cache_dir=tmp_path / "cache",
                                    preset=preset, log=lambda m: None, progress=False)
    (row,) = result["rows"]
    assert row["status"] == "ok", row["status"]
    assert row["trains"] == "part (base mart) + gradcam" and (row["method"], row["base"]) == ("part", "mart")
    assert all(isinstance(row[k], float) for k in ("clean", "pgd10", "robust_gap", "bg_gap"))
    config = yaml.safe_load((out / "part-m" / "config.yaml").read_text())
    assert (config["attention_source"], config["attention_burn_in"], config["threshold_policy"]) == ("self", 1, "mean_std")
