"""FSR (Kim et al., CVPR 2023): the Gumbel-sigmoid mask, the module's maps and the loss by
hand, y', train-mode noise vs. eval-mode determinism, every backbone, the checkpoint round
trip, configs and compare rows, and a one-epoch run evaluated with the sanity checks."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dhat_seg import training_methods
from dhat_seg.studies import compare
from dhat_seg.run.checkpoint import load_weights, resolve_weights, save_weights
from dhat_seg.config import TrainConfig, load_config
from dhat_seg.errors import UserError
from dhat_seg.run.experiment import Experiment
from dhat_seg.models.fsr_module import (FSRModule, FSRNet, FSROutputs, deterministic_masks, gumbel_sigmoid, recording,
                                        require_fsr, set_tau)
from dhat_seg.models import MODELS, create_model, module_mode
from dhat_seg.training_methods.fsr import FSR, fsr_loss, highest_wrong_class


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_of(**overrides) -> TrainConfig:
    values = dict(method="fsr", model="small_cnn_fsr", attention="oracle", attack_steps=2, device="cpu")
    values.update(overrides)
    return load_config(None, values)


def tiny_model(seed=0, classes=4):
    torch.manual_seed(seed)
    return create_model("small_cnn_fsr", classes)


def batch(n=6, seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x_adv = (x + (torch.rand(x.shape, generator=g) - 0.5) * 0.06).clamp(0, 1)
    return x, y, x_adv


# ------------------------------------------------------------------ the mask and the module
def test_gumbel_sigmoid_is_a_tempered_sigmoid_with_logistic_noise():
    s = torch.tensor([[-2.0, -0.05, 0.0, 0.03, 1.5]])
    assert torch.allclose(gumbel_sigmoid(s, 0.1, noise=False), torch.sigmoid(s / 0.1))
    u = torch.rand(s.shape, generator=torch.Generator().manual_seed(3)).clamp(1e-6, 1 - 1e-6)
    by_hand = [1 / (1 + math.exp(-(a + math.log(b) - math.log(1 - b)) / 0.1)) for a, b in zip(s[0].tolist(), u[0].tolist())]
    noisy = gumbel_sigmoid(s, 0.1, noise=True, generator=torch.Generator().manual_seed(3))
    assert noisy[0].tolist() == pytest.approx(by_hand, rel=1e-5)
    # the code's two-Gumbel form: softmax((log p + g1) / tau, (log(1 - p) + g2) / tau)[0], in distribution
    p = torch.sigmoid(torch.full((200000,), 0.3))
    g1, g2 = -torch.log(-torch.log(torch.rand(2, 200000, generator=torch.Generator().manual_seed(0))))
    code = torch.softmax(torch.stack([(p.log() + g1) / 0.1, ((1 - p).log() + g2) / 0.1]), dim=0)[0]
    ours = gumbel_sigmoid(torch.full((200000,), 0.3), 0.1, generator=torch.Generator().manual_seed(1))
    assert abs(code.mean() - ours.mean()) < 0.01 and abs((code > 0.5).float().mean() - (ours > 0.5).float().mean()) < 0.01


def test_module_maps_by_hand():
    torch.manual_seed(0)
    module = FSRModule(8, 5, hidden=4, tau=0.1).eval()
    f = torch.relu(torch.randn(3, 8, 4, 4))
    parts = module(f)
    m = torch.sigmoid(module.separation(f) / 0.1)
    assert torch.allclose(parts.mask, m)
    assert torch.allclose(parts.robust, f * m) and torch.allclose(parts.non_robust, f * (1 - m))
    rec = module.recalibration(f * (1 - m)) * (1 - m)
    assert torch.allclose(parts.recalibrated, f * (1 - m) + rec)
    assert torch.allclose(parts.output, f + rec, atol=1e-6)  # only the non-robust units change
    aux = module.aux_logits(parts.robust)
    assert torch.allclose(aux, module.aux(parts.robust.mean(dim=(2, 3))), atol=1e-6)


def test_train_mode_draws_noise_and_eval_mode_is_deterministic():
    model = tiny_model()
    x, _, _ = batch(size=16)
    with module_mode(model, training=True):
        assert not torch.equal(model(x), model(x))  # Gumbel noise (BN uses the batch's statistics either way)
        with deterministic_masks(model):
            assert torch.equal(model(x), model(x))
        assert model.net.fsr.noise  # restored
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    # eval mode: the mask is sigmoid(s / tau), no noise
    with torch.no_grad():
        f = model.net.base.feature_map((x - model.mean) / model.std)
        assert torch.equal(model.net.fsr.mask(f), torch.sigmoid(model.net.fsr.separation(f) / model.net.fsr.tau))


def test_highest_wrong_class():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0],    # top is y=0: the second, 2
                           [0.5, 4.0, 1.0, 3.0],    # top 1 is wrong (y=3): 1
                           [1.0, 1.0, 5.0, 2.0]])   # y=2 top: 3
    assert highest_wrong_class(logits, torch.tensor([0, 3, 2])).tolist() == [2, 1, 3]
    assert not highest_wrong_class(logits.requires_grad_(), torch.tensor([0, 3, 2])).requires_grad


def _ce(z, t):
    m = max(z)
    return -(z[t] - m - math.log(sum(math.exp(a - m) for a in z)))


def test_fsr_loss_on_fixed_tensors_by_hand():
    logits = torch.tensor([[2.0, 0.5, 1.0], [0.2, 0.1, 3.0]])
    r = torch.tensor([[1.0, -1.0, 0.0], [0.5, 0.5, 2.0]])
    nr = torch.tensor([[0.3, 0.2, 0.9], [1.0, 0.0, -1.0]])
    rec = torch.tensor([[0.0, 2.0, 1.0], [-0.5, 0.1, 0.4]])
    y = torch.tensor([0, 1])
    out = FSROutputs(logits, r, nr, rec, torch.tensor(0.4))
    base = torch.tensor(0.7)
    loss, stats = fsr_loss(base, out, y, lambda_sep=0.5, lambda_rec=2.0)
    y_wrong = [2, 2]  # row 0: y=0 is top, next is class 2; row 1: class 2 is top and wrong
    sep_r = (_ce(r[0].tolist(), 0) + _ce(r[1].tolist(), 1)) / 2
    sep_nr = (_ce(nr[0].tolist(), y_wrong[0]) + _ce(nr[1].tolist(), y_wrong[1])) / 2
    rec_ce = (_ce(rec[0].tolist(), 0) + _ce(rec[1].tolist(), 1)) / 2
    assert float(loss) == pytest.approx(0.7 + 0.5 * (sep_r + sep_nr) + 2.0 * rec_ce, rel=1e-6)
    assert float(stats["fsr_sep_robust"]) == pytest.approx(sep_r, rel=1e-6)
    assert float(stats["fsr_sep_non_robust"]) == pytest.approx(sep_nr, rel=1e-6)
    assert float(stats["fsr_rec"]) == pytest.approx(rec_ce, rel=1e-6)
    assert float(stats["fsr_mask"]) == pytest.approx(0.4)
    zero, _ = fsr_loss(base, out, y, 0.0, 0.0)
    assert float(zero) == pytest.approx(0.7)


@pytest.mark.parametrize("base", ["at", "trades", "mart"])
def test_method_adds_the_terms_of_the_x_adv_forward_to_the_base_loss(base):
    """In eval mode (no noise, fixed BN) the method's loss equals the base's loss plus FSR's
    terms computed by hand from a separate forward of x_adv."""
    cfg = cfg_of(base=base, fsr_lambda_sep=0.6, fsr_lambda_rec=1.3)
    method = training_methods.create_training_method(cfg)
    assert isinstance(method, FSR)
    model = tiny_model().eval()
    method.on_fit_start(model, None)
    x, y, x_adv = batch()
    loss, stats = method.loss(model, x, y, None, {"x_adv": x_adv})
    base_loss, z_adv, _ = training_methods.TRAINING_METHODS[base].cls(cfg).base_loss(model, x, y, x_adv)
    with recording(model) as outs:
        model(x_adv)
    (out,) = outs
    y_wrong = highest_wrong_class(z_adv, y)
    expected = (base_loss + 0.6 * (F.cross_entropy(out.robust, y) + F.cross_entropy(out.non_robust, y_wrong))
                + 1.3 * F.cross_entropy(out.recalibrated, y))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert {"fsr_sep", "fsr_rec", "fsr_mask"} <= set(stats)
    assert model.net.recording is None  # nothing kept after the loss
    loss.backward()
    fsr = model.net.fsr
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (fsr.aux.weight, fsr.separation[0].weight,
                                                                       fsr.recalibration[0].weight))


def test_terms_are_added_from_fsr_begin():
    method = training_methods.create_training_method(cfg_of(fsr_begin=2))
    model = tiny_model().eval()
    method.on_fit_start(model, None)
    x, y, x_adv = batch()
    base_loss, _, _ = training_methods.TRAINING_METHODS["at"].cls(method.cfg).base_loss(model, x, y, x_adv)
    for epoch, added in ((0, False), (1, False), (2, True), (5, True)):
        method.on_epoch_start(model, epoch)
        loss, stats = method.loss(model, x, y, None, {"x_adv": x_adv})
        expected = base_loss + (stats["fsr_sep"] + stats["fsr_rec"] if added else 0)
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5), epoch
        assert float(stats["fsr_sep"]) > 0  # logged before fsr_begin too


def test_attack_runs_without_noise_and_awp_proxy_works():
    cfg = cfg_of(awp=True, awp_gamma=0.01)
    method = training_methods.create_training_method(cfg)
    model = tiny_model().train()
    method.on_fit_start(model, None)
    x, y, _ = batch(size=16)
    seen = []
    original = FSRModule.mask

    def spy(self, f):
        seen.append(self.training and self.noise)
        return original(self, f)

    FSRModule.mask = spy
    try:
        method.prepare(model, x, y)
    finally:
        FSRModule.mask = original
    assert seen and not any(seen)  # every attack forward: no noise
    with method.weight_perturbation(model, x, y, None, epoch=0) as prepared:
        loss, _ = method.loss(model, x, y, None, prepared)
        loss.backward()
    assert math.isfinite(float(loss.detach()))


# ------------------------------------------------------------------ backbones and checkpoints
@pytest.mark.parametrize("name, channels", [("small_cnn", 128), ("resnet18", 512), ("preact_resnet18", 512),
                                            ("wrn28_10", 640)])
def test_every_backbone_takes_the_module_after_its_last_stage(name, channels):
    torch.manual_seed(0)
    model = create_model(name + "_fsr", 10).eval()
    assert isinstance(model.net, FSRNet) and model.net.fsr.aux.in_features == channels
    assert model.cam_layer is model.net.base.cam_layer
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad(), recording(model) as outs:
        z = model(x)
        assert model.features(x).shape == (1, channels)
    assert z.shape == (1, 10) and len(outs) == 1 and outs[0].logits is z
    assert all(t.shape == (1, 10) for t in (outs[0].robust, outs[0].non_robust, outs[0].recalibrated))


def test_every_registered_model_has_an_fsr_variant():
    plain = [n for n in MODELS if not n.endswith(("_fsr", "_again"))]
    assert [n for n in MODELS if n.endswith("_fsr")] == [n + "_fsr" for n in plain]
    with pytest.raises(UserError, match="resnet18_fsr"):
        require_fsr(create_model("small_cnn", 4))


def test_checkpoint_round_trip_rebuilds_the_fsr_model_with_its_tau(tmp_path):
    model = tiny_model().eval()
    set_tau(model, 0.25)
    save_weights(model, tmp_path / "model.safetensors", "small_cnn_fsr")
    loaded = load_weights(tmp_path / "model.safetensors").eval()
    assert isinstance(loaded.net, FSRNet) and float(loaded.net.fsr.tau) == 0.25
    x, _, _ = batch(size=16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(UserError, match="does not fit the model"):
        load_weights(tmp_path / "model.safetensors", create_model("small_cnn", 4))


# ------------------------------------------------------------------ settings and compare rows
@pytest.mark.parametrize("overrides, expected", [
    (dict(fsr_lambda_sep=-1), "non-negative"), (dict(fsr_lambda_rec=-0.5), "non-negative"), (dict(fsr_tau=0), "positive"),
    (dict(base="cfa"), "at, trades, mart"), (dict(fsr_tau="hot"), "a number"),
    (dict(fsr_begin=-1), "non-negative integer"),
])
def test_settings_are_validated(overrides, expected):
    with pytest.raises(UserError, match=expected):
        cfg_of(**overrides)


def test_method_fsr_picks_the_model_with_the_fsr_module():
    assert cfg_of(model="resnet18").model == "resnet18_fsr"  # load_config picks the variant (train says so)
    with pytest.raises(UserError, match="resnet18_fsr"):  # a config built without load_config is still checked
        TrainConfig(method="fsr", model="resnet18").validate()


def test_the_new_settings_leave_old_digests_alone():
    defaults = load_config(None, {})
    for key, value in (("fsr.lambda_sep", 1.0), ("fsr.lambda_rec", 1.0), ("fsr.tau", 0.1), ("fsr.begin", 0)):
        assert load_config(None, {key: value}).digest() == defaults.digest()  # the defaults: no digest change
    assert load_config(None, {"fsr.tau": 0.2}).digest() != defaults.digest()
    assert load_config(None, {"method": "at", "model": "resnet18_fsr"}).model == "resnet18_fsr"  # an ablation: allowed


def test_compare_rows_put_the_module_on_the_shared_model():
    from dhat_seg.studies import ablate

    base = ablate.base_config(ablate.ABLATE_PRESETS["quick"], {"image_size": 16, "train_size": 100, "test_size": 40,
                                                               "device": "cpu"})
    rows, skipped = compare.parse_methods("fsr,trades-fsr,fsr-m", "gradcam", {"gradcam": 1})
    assert rows == ["fsr", "fsr-trades", "fsr-mart"] and not skipped
    for name, row_base in zip(rows, ("at", "trades", "mart")):
        cfg = compare.method_config(base, name, "gradcam")
        assert (cfg.method, cfg.base, cfg.model) == ("fsr", row_base, "small_cnn_fsr")
    assert compare.method_config(base, "at", "gradcam").model == "small_cnn"
    wrn = compare.method_config(dataclasses.replace(base, model="wrn28_10"), "fsr", "gradcam")
    assert wrn.model == "wrn28_10_fsr"


# ------------------------------------------------------------------ end to end
def tiny_run(**overrides) -> TrainConfig:
    values = dict(data="synthetic", image_size=16, model="small_cnn_fsr", train_size=32, test_size=8, val_size=8,
                  epochs=1, batch_size=12, attack_steps=1, val_examples=8, val_attack_steps=1, device="cpu",
                  milestones=[], attention="oracle", method="fsr", fsr_tau=0.2)
    values.update(overrides)
    return load_config(None, values)


def test_one_epoch_trains(tmp_path):
    run = tmp_path / "run"
    summary = Experiment(tiny_run(), run, cache_dir=tmp_path / "c", progress=False, on_epoch=lambda r: None).run()
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train_fsr_sep", "train_fsr_rec", "train_fsr_mask", "train_ce_adv"} <= set(record)
    assert math.isfinite(record["train_loss"]) and summary["method"] == "fsr" and 0 <= summary["pgd10_acc"] <= 100


def test_eval_rebuilds_a_briefly_trained_model_which_passes_the_sanity_checks(tmp_path):
    """`dhat-seg eval RUN` (run_eval) rebuilds the FSR model from its checkpoint, tau included;
    the gradient-masking checks pass on it (2 epochs of 6 steps: after 1 epoch of 3 steps the
    model hardly depends on its input, FSR or not, and no attack can move it)."""
    from dhat_seg.evaluation.report import run_eval

    run = tmp_path / "run"
    Experiment(tiny_run(train_size=96, test_size=16, batch_size=16, epochs=2), run, cache_dir=tmp_path / "c",
               progress=False, on_epoch=lambda r: None).run()
    model = load_weights(resolve_weights(run))
    assert isinstance(model.net, FSRNet) and float(model.net.fsr.tau) == pytest.approx(0.2)
    report = run_eval(run, attacks="clean,pgd10", n_examples=16, gap_attack="none", bg_gap=False, iou_examples=0,
                      sanity=True, sanity_examples=16, device="cpu", cache_dir=str(tmp_path / "c"), show_progress=False,
                      output=str(tmp_path / "eval.json"), log=lambda m: None)
    assert report["sanity"]["passed"], report["sanity"]
    eval_copy = copy.deepcopy(model).eval()
    x, _, _ = batch(size=16)
    with torch.no_grad():
        assert torch.equal(eval_copy(x), eval_copy(x))


@pytest.mark.parametrize("base", ["trades", "mart"])
def test_one_epoch_trains_on_trades_and_mart(tmp_path, base):
    Experiment(tiny_run(base=base, train_size=24, val_examples=4), tmp_path / "run", cache_dir=tmp_path / "c",
               progress=False, on_epoch=lambda r: None).run()
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(record["train_loss"]) and "train_fsr_rec" in record
