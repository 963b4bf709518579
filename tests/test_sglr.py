"""SGLR (Li et al., CVPR 2024): the refined labels and the loss by hand, the per-sample label
table (one write per batch, only by the trained model), BN statistics, composition with DHAT,
a training run and an exact resume."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dhat_seg import losses, training_methods
from dhat_seg.studies import compare
from dhat_seg.run.checkpoint import load_state
from dhat_seg.config import TrainConfig, load_config
from dhat_seg.errors import UserError
from dhat_seg.run.experiment import Experiment
from dhat_seg.training_methods.sglr import SGLR, refine_labels, soft_cross_entropy, start_epoch
from method_helpers import Tiny, TinyBN, batch

INDEX = torch.tensor([7, 0, 3, 9, 2, 5])  # dataset indices of the batch's 6 samples


def cfg_of(**overrides) -> TrainConfig:
    values = dict(method="sglr", model="small_cnn", attention="oracle", attack_steps=2, inv_steps=2, device="cpu",
                  lambda1=0.7, lambda2=0.3, floe_form="paper", sglr_start=0)
    values.update(overrides)
    return load_config(None, values)


def sglr(cfg=None, model=None, epoch=0, index=INDEX) -> SGLR:
    method = training_methods.create_training_method(cfg or cfg_of())
    if model is not None:
        method.on_fit_start(model, None)
    method.on_epoch_start(model, epoch)
    method.on_batch_start(index)
    return method


# ------------------------------------------------------------------ hand computations (plain Python)
def softmax(v):
    m = max(v)
    e = [math.exp(a - m) for a in v]
    return [a / sum(e) for a in e]


def hand_refine(previous, y, p_adv, p_clean, m, w):
    out = []
    for prev, t, pa, pc in zip(previous, y, p_adv, p_clean):
        if sum(prev) == 0:
            prev = [1.0 if c == t else 0.0 for c in range(len(pa))]
        out.append([m * a + (1 - m) * (w * c + (1 - w) * b) for a, b, c in zip(prev, pa, pc)])
    return out


def hand_soft_ce(z, targets):
    return sum(-sum(t * math.log(p) for t, p in zip(tr, softmax(zr))) for zr, tr in zip(z, targets)) / len(z)


def rows(t):
    return t.detach().double().tolist()


def flat(matrix):
    return [v for row in matrix for v in row]


# ------------------------------------------------------------------ the formulas
def test_refined_labels_by_hand():
    previous = torch.tensor([[0.0, 0.0, 0.0], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])  # row 0: never refined = one-hot
    y = torch.tensor([1, 0, 2])
    p_adv = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    p_clean = torch.tensor([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    got = refine_labels(previous, y, p_adv, p_clean, 0.9, 0.2)
    assert flat(rows(got)) == pytest.approx(flat(hand_refine(rows(previous), y.tolist(), rows(p_adv), rows(p_clean), 0.9,
                                                             0.2)))
    assert got[0].tolist() == pytest.approx([0.1 * (0.2 * 0.1 + 0.8 * 0.2), 0.9 + 0.1 * (0.2 * 0.8 + 0.8 * 0.5),
                                             0.1 * (0.2 * 0.1 + 0.8 * 0.3)])
    assert torch.allclose(got.sum(1), torch.ones(3))  # still distributions
    # w = 0 (no clean forward): p_adv alone; m = 1: the labels never move
    assert torch.allclose(refine_labels(previous, y, p_adv, None, 0.9, 0.0), refine_labels(previous, y, p_adv, p_clean, 0.9, 0.0))
    assert torch.equal(refine_labels(previous[1:], y[1:], p_adv[1:], p_clean[1:], 1.0, 0.2), previous[1:])


def test_the_loss_by_hand_over_two_visits():
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    method = sglr(model=model)
    loss, stats = method.loss(model, x, y, None, {"x_adv": x_adv})
    with torch.no_grad():
        z_adv, p_clean = rows(model(x_adv)), [softmax(r) for r in rows(model(x))]
    p_adv = [softmax(r) for r in z_adv]
    first = hand_refine([[0.0] * 4] * 6, y.tolist(), p_adv, p_clean, 0.9, 0.2)
    assert loss.item() == pytest.approx(hand_soft_ce(z_adv, first), rel=1e-5)
    assert flat(rows(method.labels[INDEX])) == pytest.approx(flat(first), rel=1e-5)
    assert len(method.labels) == 10 and method.labels[[1, 4, 6, 8]].abs().sum() == 0  # rows of unseen samples
    assert stats["ce_soft"].item() == pytest.approx(loss.item())
    assert stats["ce_adv"].item() == pytest.approx(F.cross_entropy(model(x_adv), y).item())
    assert stats["soft_label_y"].item() == pytest.approx(sum(r[t] for r, t in zip(first, y.tolist())) / 6, rel=1e-5)
    assert set(stats) == {"ce_adv", "ce_soft", "soft_label_y", "max_logit_adv"}
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    # the next epoch: the stored labels are refined again, from the new predictions
    x_adv2 = (x_adv + 0.02).clamp(0, 1)
    method.on_epoch_start(model, 1)
    method.on_batch_start(INDEX)
    loss2, _ = method.loss(model, x, y, None, {"x_adv": x_adv2})
    with torch.no_grad():
        z_adv2 = rows(model(x_adv2))
    second = hand_refine(first, y.tolist(), [softmax(r) for r in z_adv2], p_clean, 0.9, 0.2)
    assert loss2.item() == pytest.approx(hand_soft_ce(z_adv2, second), rel=1e-5)
    assert flat(rows(method.labels[INDEX])) == pytest.approx(flat(second), rel=1e-5)


def test_other_momentum_and_clean_weight():
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    method = sglr(cfg_of(sglr_momentum=0.5, sglr_clean_weight=0.0), model=model)
    loss, _ = method.loss(model, x, y, None, {"x_adv": x_adv})
    with torch.no_grad():
        z_adv = rows(model(x_adv))
    p_adv = [softmax(r) for r in z_adv]
    expected = hand_refine([[0.0] * 4] * 6, y.tolist(), p_adv, p_adv, 0.5, 0.0)
    assert loss.item() == pytest.approx(hand_soft_ce(z_adv, expected), rel=1e-5)


def test_before_the_start_epoch_it_is_at_bit_for_bit():
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    method = sglr(cfg_of(sglr_start=3), model=model, epoch=2)
    loss, stats = method.loss(model, x, y, None, {"x_adv": x_adv})
    at_loss, _ = training_methods.create_training_method(cfg_of(method="at")).loss(model, x, y, None, {"x_adv": x_adv})
    assert torch.equal(loss, at_loss) and method.labels is None
    assert stats["soft_label_y"].item() == 1.0 and torch.equal(stats["ce_soft"], stats["ce_adv"])
    method.on_epoch_start(model, 3)
    method.on_batch_start(INDEX)
    assert not torch.equal(method.loss(model, x, y, None, {"x_adv": x_adv})[0], at_loss)


def test_the_start_epoch_default_sits_ten_epochs_before_the_first_decay():
    assert start_epoch(load_config(None, {})) == 70  # DHAT's milestones [80, 90]
    assert start_epoch(load_config(None, {"epochs": 200, "milestones": [100, 150]})) == 90  # the official script
    assert start_epoch(load_config(None, {"epochs": 6, "milestones": [5]})) == 0
    assert start_epoch(load_config(None, {"epochs": 30, "milestones": []})) == 20
    assert start_epoch(load_config(None, {"sglr_start": 4})) == 4


# ------------------------------------------------------------------ the label table
def test_gradients_flow_only_through_the_trained_logits():
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    method = sglr(model=model)
    loss, _ = method.loss(model, x, y, None, {"x_adv": x_adv})
    assert not method.labels.requires_grad and method.labels.grad_fn is None
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    soft_cross_entropy(model(x_adv), method.labels[INDEX].clone()).backward()  # the targets as constants
    assert all(torch.allclose(a, p.grad, rtol=1e-5, atol=1e-7) for a, p in zip(got, model.parameters()))


def test_only_the_trained_model_writes_the_labels_and_indices_are_required():
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    method = sglr(model=model)
    proxy = copy.deepcopy(model)  # e.g. AWP's proxy
    proxy_loss, _ = method.loss(proxy, x, y, None, {"x_adv": x_adv})
    assert method.labels is None  # read, not written
    loss, _ = method.loss(model, x, y, None, {"x_adv": x_adv})
    assert torch.equal(loss, proxy_loss) and len(method.labels) == 10
    stored = method.labels.clone()
    method.loss(proxy, x, y, None, {"x_adv": x_adv})
    assert torch.equal(method.labels, stored)
    # growth: a batch with a larger index extends the table with zero rows, keeping the old ones
    method.on_batch_start(torch.tensor([12, 0, 3, 9, 2, 5]))
    method.loss(model, x, y, None, {"x_adv": x_adv})
    assert len(method.labels) == 13 and torch.equal(method.labels[7], stored[7]) and method.labels[10:12].abs().sum() == 0
    # no indices for the batch: a clear error
    method.on_epoch_start(model, 1)
    with pytest.raises(UserError, match="needs the dataset indices"):
        method.loss(model, x, y, None, {"x_adv": x_adv})
    method.on_batch_start(INDEX[:4])
    with pytest.raises(UserError, match="4 sample indices for a batch of 6"):
        method.loss(model, x, y, None, {"x_adv": x_adv})


def test_the_state_round_trips():
    model, (x, y, x_adv, _, _) = Tiny(), batch()
    method = sglr(model=model)
    method.loss(model, x, y, None, {"x_adv": x_adv})
    state = method.state_dict()
    assert set(state) == {"labels"} and state["labels"].device.type == "cpu"
    fresh = training_methods.create_training_method(cfg_of())
    fresh.on_fit_start(model, state)
    assert torch.equal(fresh.labels, method.labels)
    fresh.on_fit_start(model, None)
    assert fresh.labels is None and fresh.state_dict() == {"labels": None}


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def test_the_attack_and_the_clean_forward_leave_bn_statistics_alone():
    model, (x, y, _, _, _) = TinyBN().train(), batch()
    method = sglr(model=model)
    before = _buffers(model)
    prepared = method.prepare(model, x, y)
    assert all(torch.equal(v, before[k]) for k, v in _buffers(model).items())  # the attack
    reference = copy.deepcopy(model)
    method.loss(model, x, y, None, prepared)
    reference(prepared["x_adv"])  # the only forward that may update them: the trained x_adv one
    assert all(torch.equal(v, dict(reference.named_buffers())[k]) for k, v in model.named_buffers())
    assert not torch.equal(model.bn.running_mean, before["bn.running_mean"])
    # attack_bn_update: true (the authors' code) lets the clean forward update them too
    model = TinyBN().train()
    method = sglr(cfg_of(attack_bn_update=True), model=model)
    reference = copy.deepcopy(model)
    method.loss(model, x, y, None, prepared)
    reference(prepared["x_adv"])
    assert not torch.equal(model.bn.running_mean, reference.bn.running_mean)


# ------------------------------------------------------------------ composition: DHAT on SGLR
def test_dhat_on_sglr_is_the_sglr_loss_plus_dhlr_and_floe():
    model, (x, y, x_adv, x_inv, fg) = Tiny(), batch()
    cfg = cfg_of(method="dhat", base="sglr")
    dhat = sglr(cfg, model=model)
    prepared = {"x_adv": x_adv, "x_inv": x_inv, "z_nat": model(x).detach()}
    loss, stats = dhat.loss(model, x, y, fg, prepared)
    base_loss, _ = sglr(model=model).loss(model, x, y, None, {"x_adv": x_adv})
    z_adv, z_inv, z_b = model(x_adv), model(x_inv), model(losses.background_only(x_inv, fg))
    terms = (cfg.lambda1 * losses.dhlr_loss(z_adv, z_inv, z_b, form=cfg.dhlr_form)
             + cfg.lambda2 * losses.floe_loss(z_inv, z_b, form=cfg.floe_form, p=cfg.floe_p))
    assert torch.allclose(loss, base_loss + terms, rtol=1e-6, atol=0)
    assert {"ce_adv", "ce_soft", "soft_label_y", "dhlr", "floe", "fg_frac"} <= set(stats)
    # the hooks reach the base: its labels are written, saved and restored through DHAT
    assert len(dhat.base.labels) == 10 and torch.equal(dhat.state_dict()["labels"], dhat.base.labels)
    other = training_methods.create_training_method(cfg)
    other.on_fit_start(model, dhat.state_dict())
    assert torch.equal(other.base.labels, dhat.base.labels)


def test_sglr_is_a_base_a_row_and_a_method():
    assert "sglr" in training_methods.base_methods() and "sglr" in training_methods.TRAINING_METHODS
    assert isinstance(training_methods.create_training_method(cfg_of(method="uiat", base="sglr")).base, SGLR)
    assert compare.METHOD_ROWS["sglr"].method == "sglr"
    rows, skipped = compare.parse_methods("sglr", "gradcam", {"gradcam": 1})
    assert rows == ["sglr"] and "sglr" not in skipped


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("key, value, expected", [
    ("sglr.momentum", 1.5, "[0, 1]"), ("sglr.momentum", -0.1, "[0, 1]"), ("sglr.clean_weight", 2, "[0, 1]"),
    ("sglr.start", -1, "non-negative integer"), ("sglr.start", 2.5, "an integer"), ("sglr.momentum", "high", "a number"),
])
def test_settings_are_validated(key, value, expected):
    with pytest.raises(UserError) as info:
        load_config(None, {key: value})
    message = str(info.value)
    assert key in message and repr(value) in message and expected in message, message


def test_the_new_settings_leave_old_digests_alone():
    defaults = load_config(None, {})
    for key, value in (("sglr.momentum", 0.9), ("sglr.clean_weight", 0.2), ("sglr.start", None)):
        assert load_config(None, {key: value}).digest() == defaults.digest()  # the defaults: no digest change
    assert load_config(None, {"sglr.momentum": 0.8}).digest() != defaults.digest()


# ------------------------------------------------------------------ end to end
def tiny_run(**overrides) -> TrainConfig:
    values = dict(data="synthetic", image_size=16, model="small_cnn", train_size=32, test_size=8, val_size=8, epochs=1,
                  batch_size=12, attack_steps=1, inv_steps=1, val_examples=8, val_attack_steps=1, device="cpu",
                  milestones=[], attention="oracle", floe_form="relative", method="sglr", sglr_start=0)
    values.update(overrides)
    return load_config(None, values)


def metrics(run):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("settings", [dict(method="sglr"), dict(method="dhat", base="sglr")], ids=["sglr", "dhat-sglr"])
def test_one_epoch_trains(tmp_path, settings):
    summary = Experiment(tiny_run(**settings), tmp_path / "run", cache_dir=tmp_path / "c", progress=False,
                         on_epoch=lambda r: None).run()
    (record,) = metrics(tmp_path / "run")
    assert {"train_ce_adv", "train_ce_soft", "train_soft_label_y"} <= set(record) and math.isfinite(record["train_loss"])
    assert 0.9 <= record["train_soft_label_y"] < 1  # softened, m = 0.9 after one visit
    assert summary["method"] == settings["method"] and 0 <= summary["pgd10_acc"] <= 100


def test_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    """Epoch 2 refines the labels epoch 1 stored: an interrupted and resumed run ends like an
    uninterrupted one (the labels travel in the checkpoint)."""
    cfg = tiny_run(epochs=2)
    reference = Experiment(cfg, tmp_path / "straight", cache_dir=tmp_path / "c", progress=False,
                           on_epoch=lambda r: None).run()
    straight = metrics(tmp_path / "straight")
    assert straight[1]["train_soft_label_y"] < straight[0]["train_soft_label_y"]  # refined twice
    original = SGLR.on_epoch_start

    def interrupted(self, model, epoch):  # killed when epoch 2 starts, after epoch 1's checkpoint
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, model, epoch)

    monkeypatch.setattr(SGLR, "on_epoch_start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Experiment(cfg, tmp_path / "resumed", cache_dir=tmp_path / "c", progress=False, on_epoch=lambda r: None).run()
    monkeypatch.setattr(SGLR, "on_epoch_start", original)
    assert len(metrics(tmp_path / "resumed")) == 1
    resumed = Experiment(cfg, tmp_path / "resumed", cache_dir=tmp_path / "c", progress=False,
                         on_epoch=lambda r: None).run(resume=True)
    assert resumed == reference and metrics(tmp_path / "resumed") == straight
    labels = load_state(tmp_path / "resumed" / "checkpoints" / "epoch_0002" / "state.pt")["method"]["labels"]
    visited = labels.sum(1) > 0
    assert visited.sum() >= 24 and torch.allclose(labels[visited].sum(1), torch.ones(int(visited.sum())))
