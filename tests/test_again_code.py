"""AGAIN as released (``again.form: code``; training_methods/again_code.py, again_net.py): the
modulation and the loss against a hand computation of the official formulas
(InsLin/AGAIN, AGAIN_with_AWP/models/wideresnet_AGAIN_woHFF.py and train_awp_again_cifar.py),
W[pred] in eval mode, the attack (eval mode, x + 0.001 N(0, 1), the auxiliary term in its
objective), AWP as released, the heads on every registry model, a one-epoch run of each form,
an exact resume and the compare rows."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dhat_seg.studies import compare
from dhat_seg.models.again_net import AgainGate, AgainNet, labelled, recording, require_again
from dhat_seg.config import TrainConfig, load_config
from dhat_seg.errors import UserError
from dhat_seg.run.experiment import Experiment
from dhat_seg.method_defaults import again_code_awp_warmup
from dhat_seg.models import MODELS, create_model
from dhat_seg.training_methods import create_training_method
from dhat_seg.training_methods import again_hff as hff_module
from dhat_seg.training_methods.again_code import AGAINCode, code_loss
from run_helpers import killed_after_first_epoch, metrics

pytestmark = pytest.mark.usefixtures("one_thread")
PLAIN = [n for n in MODELS if not n.endswith(("_fsr", "_again"))]


def cfg_of(**overrides):
    values = dict(method="again", again_form="code", model="small_cnn_again", attack_steps=1, device="cpu", epochs=4)
    values.update(overrides)
    return load_config(None, values)


def tiny_model(seed=0, classes=4):
    torch.manual_seed(seed)
    return create_model("small_cnn_again", classes)


def batch(n=6, seed=1, size=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y, (x + (torch.rand(x.shape, generator=g) - 0.5) * 0.06).clamp(0, 1)


# ------------------------------------------------------------------ the official formulas, by hand
def official_site(f, fc, labels, training, perm=None):
    """One site of the official model, line by line (BasicBlock_ASE.forward / WideResNet.forward):
    fc_in = mean over H x W, fc_out = fc(fc_in); train: f * (0.6 W[label] + 0.4 W[label[randperm]]);
    eval: f * W[argmax fc_out]. ``perm``: the randperm the site draws."""
    N, C = f.shape[:2]
    fc_out = fc(torch.mean(f.view(N, C, -1), dim=-1).view(N, C))
    if training:
        mask = 0.6 * fc.weight[labels, :].view(N, C, 1, 1) + 0.4 * fc.weight[labels[perm], :].view(N, C, 1, 1)
    else:
        mask = fc.weight[torch.max(fc_out, dim=1)[1], :].view(N, C, 1, 1)
    return f * mask, fc_out


def official_forward(model, x, y, training, perms=(None, None)):
    """The official forward on dhat-seg's small CNN: the last block's input and the final map pass a site;
    returns (output, [class-wise outputs])."""
    net = model.net
    gate1, conv = net.base.cam_layer[0].gate, net.base.cam_layer[0].layer
    h = net.base.body((x - model.mean) / model.std)
    h, aux1 = official_site(h, gate1.fc, y, training, perms[0])
    h = net.base.cam_layer[2](net.base.cam_layer[1](conv(h)))
    h, aux2 = official_site(h, net.gate.fc, y, training, perms[1])
    return net.base.fc(F.avg_pool2d(h, h.shape[-1]).flatten(1)), [aux1, aux2]


def official_loss(output, class_wise_output, target):
    """train(): loss = CE(output) + 2 * (sum of CE(extra_output)) / len."""
    loss = F.cross_entropy(output, target)
    channel_reg_loss = 0.0
    for extra_output in class_wise_output:
        channel_reg_loss += F.cross_entropy(extra_output, target)
    return loss + 2 * channel_reg_loss / len(class_wise_output)


# ------------------------------------------------------------------ 1. modulation and loss by hand
def test_the_modulation_on_fixed_tensors_by_hand():
    gate = AgainGate(3, 4)
    W = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0], [-0.5, 0.5, 0.0], [2.0, 0.0, -1.0]])
    with torch.no_grad():
        gate.fc.weight.copy_(W), gate.fc.bias.copy_(torch.tensor([0.0, 0.1, 0.0, -0.1]))
    f = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2) / 10
    y = torch.tensor([1, 3])
    assert gate.fc.bias.abs().sum() > 0 and AgainGate(3, 4).fc.bias.abs().sum() == 0  # zeroed at init, as released
    gate.train()
    gate.labels, gate.alpha = y, 0.6
    torch.manual_seed(5)
    out = gate(f)
    torch.manual_seed(5)
    fake = y[torch.randperm(2)].tolist()
    for i in range(2):
        for c in range(3):
            w = 0.6 * W[y[i], c].item() + 0.4 * W[fake[i], c].item()
            assert out[i, c].flatten().tolist() == pytest.approx([w * v for v in f[i, c].flatten().tolist()], abs=1e-6)
    gate.eval()
    out = gate(f)
    for i in range(2):
        pooled = [sum(f[i, c].flatten().tolist()) / 4 for c in range(3)]
        logits = [sum(p * W[k, c].item() for c, p in enumerate(pooled)) + gate.fc.bias[k].item() for k in range(4)]
        pred = max(range(4), key=logits.__getitem__)
        for c in range(3):
            assert out[i, c].flatten().tolist() == pytest.approx([W[pred, c].item() * v for v in f[i, c].flatten().tolist()],
                                                                 abs=1e-6)


def test_the_fake_label_is_a_permutation_of_the_batch_labels_and_can_equal_y():
    gate = AgainGate(2, 3).train()
    y = torch.tensor([0, 0, 1, 2])
    gate.labels = y
    seen_equal = False
    for seed in range(20):
        torch.manual_seed(seed)
        perm = torch.randperm(4)
        seen_equal |= bool((y[perm] == y).any())
        torch.manual_seed(seed)
        mask = gate.mask(torch.zeros(4, 3))
        assert torch.allclose(mask, 0.6 * gate.fc.weight[y] + 0.4 * gate.fc.weight[y[perm]])
    assert seen_equal


def test_the_training_loss_is_the_official_one_on_the_labelled_forward():
    model, (x, y, x_adv) = tiny_model(), batch()
    method = AGAINCode(cfg_of())
    torch.manual_seed(7)
    loss, stats = method.loss(model, x, y, None, {"x_adv": x_adv})
    torch.manual_seed(7)
    perms = (torch.randperm(6), torch.randperm(6))  # one fresh randperm per site, in forward order
    reference = copy.deepcopy(model).train()
    output, class_wise = official_forward(reference, x_adv, y, True, perms)
    assert loss.item() == pytest.approx(official_loss(output, class_wise, y).item(), abs=1e-5)
    assert stats["ce_adv"].item() == pytest.approx(F.cross_entropy(output, y).item(), abs=1e-5)
    assert stats["again_aux_ce"].item() == pytest.approx(sum(F.cross_entropy(a, y) for a in class_wise).item() / 2, abs=1e-5)
    assert "again" not in stats  # no i/N schedule: every batch


def test_eval_mode_predicts_with_w_pred_and_ignores_labels():
    model, (x, y, _) = tiny_model(), batch()
    model.eval()
    with torch.no_grad():
        plain = model(x)
        with labelled(model, y):
            assert torch.equal(model(x), plain)
        with labelled(model, (y + 1) % 4):
            assert torch.equal(model(x), plain)
        expected, aux = official_forward(model, x, y, training=False)
        assert torch.allclose(plain, expected, atol=1e-5)
        with recording(model) as outs:
            model(x)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outs[0].aux, aux))
    assert torch.equal(model(x), model(x))  # deterministic


# ------------------------------------------------------------------ 2. the attack
def test_the_attack_runs_in_eval_mode_from_a_small_gaussian_start_on_the_full_objective():
    model, (x, y, _) = tiny_model(), batch()
    model.train()
    modes = []
    handle = model.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    method = AGAINCode(cfg_of(attack_steps=0))
    torch.manual_seed(3)
    start = method.adversarial(model, x, y)
    torch.manual_seed(3)
    assert torch.equal(start, (x + 0.001 * torch.randn_like(x)).clamp(x - method.eps, x + method.eps).clamp(0, 1))
    method = AGAINCode(cfg_of(attack_steps=1))
    torch.manual_seed(3)
    x_adv = method.adversarial(model, x, y)
    handle.remove()
    assert modes == [False] and model.training  # one eval-mode forward; the mode restored
    torch.manual_seed(3)
    x0 = (x + 0.001 * torch.randn_like(x)).requires_grad_(True)
    reference = copy.deepcopy(model).eval()
    output, class_wise = official_forward(reference, x0, y, training=False)
    (grad,) = torch.autograd.grad(official_loss(output, class_wise, y), x0)
    expected = torch.min(torch.max(x0.detach() + method.alpha * grad.sign(), x - method.eps), x + method.eps).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)
    (main_only,) = torch.autograd.grad(F.cross_entropy(official_forward(reference, x0, y, False)[0], y), x0)
    assert not torch.equal(grad.sign(), main_only.sign())  # the auxiliary term changes the attack


# ------------------------------------------------------------------ 3. AWP as released, settings, HFF
def test_awp_is_on_as_released_unless_given():
    cfg = cfg_of(epochs=200)
    assert (cfg.awp, cfg.awp_gamma, cfg.awp_warmup) == (True, 5e-3, 9)  # 0-based 9 = the release's 10th epoch
    assert again_code_awp_warmup(100) == 5 and again_code_awp_warmup(15) == 1 and again_code_awp_warmup(2) == 0
    cfg = cfg_of(epochs=200, awp=False, awp_warmup=3)
    assert (cfg.awp, cfg.awp_warmup) == (False, 3)
    assert not load_config(None, dict(method="again", epochs=200)).awp  # the paper form: no AWP unless asked
    assert type(create_training_method(cfg_of())) is AGAINCode


def test_awp_wraps_a_code_batch_with_the_labelled_proxy_loss_and_restores_the_weights():
    model, (x, y, _) = tiny_model(), batch()
    method = AGAINCode(cfg_of())
    before = copy.deepcopy(model.state_dict())
    with method.weight_perturbation(model, x, y, None, 0) as prepared:
        assert prepared is not None
        loss, _ = method.loss(model, x, y, None, prepared)
        loss.backward()
    perturbed = dict(method._awp.proxy.named_parameters())
    assert "net.gate.fc.weight" in perturbed  # the auxiliary heads are weights AWP perturbs, as in utils_awp.py
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k)
    assert require_again(method._awp.proxy).gates()[0].labels is None  # the labels do not stay behind


@pytest.mark.parametrize("overrides, expected", [
    (dict(again_fake_label="highest"), "again.form=paper only"),
    (dict(again_form="released"), "paper, code"),
])
def test_settings_are_validated(overrides, expected):
    with pytest.raises(UserError, match=expected):
        cfg_of(**overrides)
    assert cfg_of(model="small_cnn").model == "small_cnn_again"  # load_config picks the variant (train says so)
    with pytest.raises(UserError, match="small_cnn_again"):  # a config built without load_config is still checked
        TrainConfig(method="again", method_options={"again": {"form": "code"}}, model="small_cnn").validate()
    with pytest.raises(UserError, match="auxiliary heads"):
        load_config(None, dict(method="at", model="resnet18_again"))


def test_hff_is_off_as_released_and_on_when_asked(monkeypatch):
    calls = []
    real = hff_module.hybrid_feature_fusion
    monkeypatch.setattr(hff_module, "hybrid_feature_fusion", lambda f, *a: calls.append(f.shape) or real(f, *a))
    model, (x, y, x_adv) = tiny_model(), batch()
    AGAINCode(cfg_of()).loss(model, x, y, None, {"x_adv": x_adv})
    assert calls == []
    AGAINCode(cfg_of(again_hff=True)).loss(model, x, y, None, {"x_adv": x_adv})
    assert calls == [(6, 32, 8, 8)] and not [m for m in model.modules() if m._forward_hooks]


# ------------------------------------------------------------------ 4. the heads on every model
@pytest.mark.parametrize("name", PLAIN)
def test_every_model_has_an_again_variant_with_both_sites(name):
    model = create_model(name + "_again", 5)
    net = require_again(model)
    entry, last = net.gates()
    assert isinstance(net, AgainNet) and last is net.gate and last.fc.in_features == net.head.in_features
    parent, attr = net.base.again_entry
    assert getattr(parent, attr).gate is entry and entry.fc.out_features == last.fc.out_features == 5
    assert model.cam_layer is net.base.cam_layer
    if name.startswith("wrn"):
        return  # built, not run: too slow for unit tests
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 4])
    seen = []
    handle = getattr(parent, attr).layer.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    with labelled(model.train(), y), recording(model) as outs:
        z = model(x)
    handle.remove()
    assert z.shape == (2, 5) and [a.shape for a in outs[0].aux] == [(2, 5), (2, 5)] and len(seen) == 1
    model.eval()
    assert model(x).shape == (2, 5)


# ------------------------------------------------------------------ 5. runs, resume, compare
def tiny_run(**overrides):
    values = dict(data="synthetic", image_size=16, model="small_cnn", train_size=100, test_size=16, val_size=16, epochs=1,
                  batch_size=28, attack_steps=1, val_examples=16, val_attack_steps=1, device="cpu", milestones=[],
                  method="again")
    values.update(overrides)
    return load_config(None, values)


@pytest.mark.parametrize("form", ["paper", "code"])
def test_one_epoch_of_each_form_trains(tmp_path, form):
    cfg = tiny_run(again_form=form, model="small_cnn_again" if form == "code" else "small_cnn")
    summary = Experiment(cfg, tmp_path / form, cache_dir=tmp_path / "c", progress=False, on_epoch=lambda r: None).run()
    (record,) = [json.loads(line) for line in (tmp_path / form / "metrics.jsonl").read_text().splitlines()]
    assert summary["method"] == "again" and summary["model"] == cfg.model and 0 <= summary["pgd10_acc"] <= 100
    assert math.isfinite(record["train_loss"])
    assert ("train_again_aux_ce" in record) == (form == "code") and ("train_again_prob" in record) == (form == "paper")
    assert summary["awp"] == (form == "code")


def test_the_code_form_resumes_exactly(tmp_path):
    cfg = tiny_run(again_form="code", model="small_cnn_again", train_size=48, batch_size=16, epochs=2)
    assert cfg.awp and cfg.awp_warmup == 0  # AWP from the first step at 2 epochs (its proxy is rebuilt on resume)
    straight = tmp_path / "straight"
    summary = Experiment(cfg, straight, cache_dir=tmp_path / "c", progress=False, on_epoch=lambda r: None).run()
    resumed = tmp_path / "resumed"
    killed_after_first_epoch(straight, resumed)
    again = Experiment(cfg, resumed, cache_dir=tmp_path / "c", progress=False, on_epoch=lambda r: None).run(resume=True)
    assert again == summary and metrics(resumed) == metrics(straight)
    assert (resumed / "checkpoints" / "epoch_0002" / "model.safetensors").read_bytes() == \
        (straight / "checkpoints" / "epoch_0002" / "model.safetensors").read_bytes()


def test_compare_has_both_rows():
    from dhat_seg.studies import ablate

    base = ablate.base_config(ablate.ABLATE_PRESETS["quick"], {"image_size": 16, "train_size": 100, "test_size": 40,
                                                               "device": "cpu"})
    rows, skipped = compare.parse_methods("again,again-code,again-released", "gradcam", {"gradcam": 1})
    assert rows == ["again", "again-code"] and not skipped
    assert {"again", "again-code"} <= set(compare.parse_methods("all", "gradcam", {"gradcam": 1})[0])
    paper, code = (compare.method_config(base, name, "gradcam") for name in rows)
    assert (paper.model, paper.options("again").form, paper.awp) == ("small_cnn", "paper", False)
    assert (code.model, code.options("again").form, code.awp, code.awp_gamma) == ("small_cnn_again", "code", True, 5e-3)
    assert code.awp_warmup == again_code_awp_warmup(base.epochs)
    assert compare.METHOD_ROWS["again-code"].label == "AT+AGAIN (as released)"
    with pytest.raises(UserError, match="again-code"):
        compare.check_overrides({"again.form": "code"})
    with pytest.raises(UserError, match="again-code"):
        compare.check_overrides({"again_form": "code"})  # the 0.1 name
