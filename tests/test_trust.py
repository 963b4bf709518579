"""Numbers a reviewer can trust: attacks that cannot go blind, fp32 attacks under
autocast, divergence as an error, settings checked before work starts, BN statistics
and the self-attention burn-in (issue 8)."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dhat_seg import attacks, training_methods
from dhat_seg.run.checkpoint import read_pointers
from dhat_seg.cli import app
from dhat_seg.cli.common import config_base
from dhat_seg.config import PRESETS, TrainConfig, load_config
from dhat_seg.paper_settings import paper_differences
from dhat_seg.errors import DivergenceError, UserError
from dhat_seg.models import create_model, frozen_bn_statistics
from dhat_seg.run.experiment import Experiment
from cli_helpers import assert_one_line_error

runner = CliRunner()


def tiny(**overrides) -> TrainConfig:
    values = dict(method="dhat", attention="gradcam", data="synthetic", model="small_cnn", train_size=56, test_size=16,
                  val_size=8, epochs=2, batch_size=16, attack_steps=1, inv_steps=1, val_examples=8, val_attack_steps=1,
                  device="cpu", milestones=[], attention_model_arch="small_cnn", attention_model_epochs=1,
                  floe_form="relative")
    values.update(overrides)
    return load_config(None, values)


class Scaled(nn.Module):
    """A linear classifier whose logits are multiplied by ``scale`` (margins far above kappa)."""

    def __init__(self, scale: float):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3 * 8 * 8, 4)
        self.scale = scale

    def forward(self, x):
        return self.scale * self.linear(x.flatten(1))


# ------------------------------------------------------------------ 1. C&W-inf
def test_cw_margin_caps_the_misclassified_side_not_the_correct_one():
    logits = torch.tensor([[100.0, 0.0, -5.0], [0.0, 80.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    loss = attacks.cw_margin_loss(logits, y, kappa=50.0)
    # correct by a margin of 100 (far above kappa): the margin itself, with a gradient
    assert loss[0].item() == pytest.approx(-100.0)
    # misclassified by 80: capped at +kappa
    assert loss[1].item() == pytest.approx(50.0)
    (grad,) = torch.autograd.grad(loss[0], logits)
    assert grad[0].abs().sum() > 0


def test_cw_attack_moves_samples_with_huge_margins():
    model = Scaled(1e4).eval()
    torch.manual_seed(1)
    x = torch.rand(64, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample correct, margins in the thousands
    x_adv = attacks.pgd(model, x, y, 16 / 255, 4 / 255, 10, loss="cw")
    assert (x_adv - x).abs().max() > 0  # with the old floor at -kappa the gradient was 0: no move at all
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() < 1.0


# ------------------------------------------------------------------ 2. fp32 attacks under autocast
def _forward_dtypes(model):
    seen = []
    handle = model.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.dtype)))
    return seen, handle


@pytest.mark.parametrize("attack", ["pgd", "inverse"])
def test_attacks_run_in_fp32_inside_autocast(attack):
    model = create_model("small_cnn", 10).eval()
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    seen, handle = _forward_dtypes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if attack == "pgd":
            attacks.pgd(model, x, y, 8 / 255, 2 / 255, 2)
        else:
            p = torch.full((4, 10), 0.1)
            attacks.inverse_adversarial(model, x, y, p, p, 4 / 255, 2 / 255, 2)
        assert model(x).dtype == torch.bfloat16  # the region itself is bf16
    handle.remove()
    assert [d for _, d in seen[:-1]] == [torch.float32, torch.float32]
    # opting in keeps the ambient autocast
    seen.clear()
    handle = model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attacks.pgd(model, x, y, 8 / 255, 2 / 255, 1, precision="autocast")
    handle.remove()
    assert seen == [torch.bfloat16]


def test_dhat_step_under_bf16_autocast_attacks_fp32_training_bf16():
    cfg = tiny(amp=True)
    method = training_methods.create_training_method(cfg)
    model = create_model("small_cnn", 10).train()
    seen, handle = _forward_dtypes(model)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    fg = torch.zeros(8, 1, 32, 32, dtype=torch.bool)
    fg[:, :, 8:24, 8:24] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = method.loss(model, x, y, fg)
    handle.remove()
    assert torch.isfinite(loss)
    trained = [d for grad, d in seen if grad]
    # attack steps (grad on, fp32) then p_nat/p_adv (no grad, fp32), then the 3 training forwards in bf16
    assert trained[-3:] == [torch.bfloat16] * 3
    assert all(d == torch.float32 for grad, d in seen[:-3])


def test_training_with_amp_on_cpu_runs_bf16(tmp_path):
    logs = []
    summary = Experiment(tiny(amp=True, epochs=1), tmp_path / "run", log=logs.append, cache_dir=tmp_path / "c",
                      progress=False).run()
    assert any("bfloat16 autocast" in l and "attacks in fp32" in l for l in logs)
    assert 0 <= summary["clean_acc"] <= 100
    with pytest.raises(UserError, match="amp_dtype='float16' needs a CUDA device"):
        Experiment(tiny(amp=True, amp_dtype="float16"), tmp_path / "fp16", cache_dir=tmp_path / "c", progress=False)


# ------------------------------------------------------------------ 3. divergence
def _metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def test_logit_sizes_are_recorded_per_epoch(tmp_path):
    Experiment(tiny(epochs=1), tmp_path / "run", cache_dir=tmp_path / "c", progress=False).run()
    (record,) = _metrics(tmp_path / "run")
    assert record["train_max_logit_clean"] > 0 and record["train_max_logit_background"] > 0


def test_nan_loss_stops_with_the_last_good_checkpoint_kept(tmp_path, monkeypatch):
    cfg = tiny(epochs=3)
    batches_per_epoch = 3  # 48 training samples (56 - 8 validation), batches of 16
    real = training_methods.losses.floe_loss
    calls = {"n": 0}

    def floe_nan_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] > batches_per_epoch else value

    monkeypatch.setattr(training_methods.losses, "floe_loss", floe_nan_in_epoch_2)
    with pytest.raises(DivergenceError) as info:
        Experiment(cfg, tmp_path / "run", cache_dir=tmp_path / "c", progress=False).run()
    message = str(info.value)
    assert "epoch 2, batch 1" in message and "is nan" in message and "epoch_0001" in message
    assert read_pointers(tmp_path / "run" / "checkpoints")["last"] == "epoch_0001"
    assert [r["epoch"] for r in _metrics(tmp_path / "run")] == [1]


def test_exploding_logits_stop_training_from_the_cli(tmp_path):
    args = ["train", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"), "--method", "dhat",
            "--model", "small_cnn", "--epochs", "1"]
    for key, value in dict(train_size=40, val_size=8, test_size=8, batch_size=16, attack_steps=1, inv_steps=1,
                           val_examples=8, device="cpu", attention_model_arch="small_cnn", attention_model_epochs=1,
                           max_abs_logit=1e-3).items():
        args += ["--set", f"{key}={value}"]
    result = runner.invoke(app, args)
    assert_one_line_error(result, "training diverged in epoch 1, batch 1", "max_abs_logit=0.001", "no checkpoint")
    assert result.exit_code == 2


# ------------------------------------------------------------------ 3b. the paper path on a tiny CIFAR directory
def _write_tiny_cifar10(root, n_train=24, n_test=8):
    """A CIFAR-10 directory in torchvision's own format (pickled batches the test writes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {}
    per_batch = n_train // 5
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
        files[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    files["batches.meta"] = hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()
    return files


@pytest.mark.slow
def test_paper_preset_runs_end_to_end_on_a_tiny_cifar_directory(tmp_path, monkeypatch):
    """CIFAR-10 through torchvision's own loader and integrity check (md5s of the files the
    test wrote), a WRN-28-10 and the paper preset's schedule, sizes overridden. AMP is
    switched off here: bf16 convolutions of a WRN on a CPU without bf16 units take minutes;
    the bf16 autocast path is covered by ``test_training_with_amp_on_cpu_runs_bf16``."""
    from torchvision.datasets import CIFAR10

    md5 = _write_tiny_cifar10(tmp_path / "data")
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]})
    cfg = load_config("paper", dict(data_root=str(tmp_path / "data"), val_size=4, epochs=2, milestones=[1], batch_size=10,
                                    attack_steps=1, inv_steps=1, val_examples=4, val_attack_steps=1, test_examples=4,
                                    attention_model_epochs=1, device="cpu"))
    assert (cfg.data, cfg.model, cfg.amp) == ("cifar10", "wrn28_10", True)
    cfg.amp = False
    logs = []
    summary = Experiment(cfg, tmp_path / "run", log=logs.append, cache_dir=tmp_path / "c", progress=False).run()
    assert summary["model"] == "wrn28_10" and summary["n_test"] == 4
    records = _metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["lr"] == pytest.approx(cfg.lr * cfg.gamma)  # milestone 1: lr / 10 once
    assert summary["data"] == "cifar10" and summary["epochs"] == 2


# ------------------------------------------------------------------ 5. no silent mixing with a preset
def test_settings_start_from_the_data_s_own_recipe(tmp_path):
    assert config_base(None, resume=False, out=None) == "quick"  # the built-in data by default
    assert config_base(None, resume=False, out=None, data="digits") == "quick"
    assert config_base(None, resume=False, out=None, data="cifar10") is None  # the paper's recipe
    assert config_base(None, resume=False, out=None, data="folder") is None
    assert config_base("paper", resume=False, out=None, data="synthetic") == "paper"
    (tmp_path / "config.yaml").write_text("method: uiat\n")
    assert config_base(None, resume=True, out=tmp_path) == tmp_path / "config.yaml"
    cfg = load_config(config_base(None, resume=False, out=None, data="cifar10"), {"data": "cifar10", "model": "wrn28_10"})
    assert (cfg.batch_size, cfg.milestones, cfg.attack_steps, cfg.step_size, cfg.floe_form) == (128, [80, 90], 10, 2.0, "paper")
    assert cfg.lr == 0.1 and cfg.epochs == 100
    quick = load_config("quick")
    assert quick.batch_size == 32  # the demo still is the demo


def test_differences_from_the_paper_are_listed():
    keys = {k for k, _, _ in paper_differences(load_config(None, {"data": "cifar10", "model": "wrn28_10"}))}
    assert keys == {"mask_source", "attack_bn_update"}  # the two defaults dhat-seg chose over the authors' code
    quick = {k: (v, p) for k, v, p in paper_differences(load_config("quick"))}
    assert quick["batch_size"] == (32, 128) and quick["floe_form"] == ("relative", "paper")
    assert quick["model"] == ("small_cnn", "wrn28_10 or resnet18")


def test_train_prints_the_settings_that_differ_from_the_paper(tmp_path):
    args = ["train", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"), "--model", "small_cnn",
            "--epochs", "1", "--batch-size", "16", "--lr", "0.1"]
    for key, value in dict(train_size=40, val_size=8, test_size=8, attack_steps=1, inv_steps=1, val_examples=8,
                           device="cpu", attention_model_arch="small_cnn", attention_model_epochs=1,
                           floe_form="relative").items():
        args += ["--set", f"{key}={value}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "settings that differ from the DHAT paper's" in result.output
    assert "batch_size = 16  (paper: 128)" in result.output and "floe_form = 'relative'  (paper: 'paper')" in result.output
    assert "lr = " not in result.output  # the paper's own lr is not listed


# ------------------------------------------------------------------ 6. validation before any work
BAD_VALUES = [
    ("method", "magic", "standard, at, uiat, dhat"), ("model", "vgg99", "small_cnn"), ("data", "imagenet42", "cifar10"),
    ("attention_model_arch", "vgg", "resnet18"), ("attention", "nosuch", "gradcam"), ("dhlr_form", "x", "paper-adv"),
    ("floe_form", "x", "relative"), ("threshold_policy", "x", "otsu"), ("attack_mode", "x", "train, eval"),
    ("mask_source", "x", "cache, online"), ("attention_source", "x", "frozen, self"),
    ("attack_precision", "fp16", "fp32, autocast"), ("amp_dtype", "fp8", "bfloat16"),
    ("omega", 0.0, "(0, 1)"), ("omega", 1.0, "(0, 1)"), ("omega", 2, "(0, 1)"), ("eps", -1, "non-negative"),
    ("lr", 0, "positive"), ("lr", "abc", "a number"), ("batch_size", 0, "positive"), ("batch_size", 2.5, "an integer"),
    ("floe_p", 0.5, ">= 1"), ("epochs", 0, "positive"), ("epochs", True, "an integer"), ("momentum", 1.0, "[0, 1)"),
    ("milestones", [5, 3], "strictly increasing"), ("milestones", "80", "a list"), ("val_size", 0, "fraction"),
    ("quantile", 1.5, "(0, 1)"), ("attack_bn_update", "yes", "true or false"), ("max_abs_logit", -1, "non-negative"),
    ("attention_burn_in", -1, "smaller than epochs"), ("seed", -2, "non-negative"), ("lambda2", -1, "non-negative"),
    ("attention_options", "n_steps=3", "a mapping"),
]


@pytest.mark.parametrize("key, value, expected", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_every_setting_is_validated_at_load(key, value, expected):
    with pytest.raises(UserError) as info:
        load_config(None, {key: value})
    message = str(info.value)
    assert key in message and repr(value) in message and expected in message, message


def test_cli_refuses_bad_settings_before_any_work(tmp_path, monkeypatch):
    import dhat_seg.run.experiment

    monkeypatch.setattr(dhat_seg.run.experiment, "split_for", lambda *a, **k: pytest.fail("data was built before validation"))
    for pair in ("omega=2", "floe_form=paperr", "attention_source=selff", "lr=abc", "model=nosuch", "epochs=0"):
        result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"),
                                     "--set", pair])
        assert_one_line_error(result, pair.split("=")[0], pair.split("=")[1])
        assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def test_a_flag_and_set_that_disagree_are_an_error(tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--lr", "0.1", "--set", "lr=0.2"])
    assert_one_line_error(result, "lr is set twice", "0.1", "0.2")
    assert not (tmp_path / "run").exists()


def test_presets_are_valid():
    for name in PRESETS:
        load_config(name)


# ------------------------------------------------------------------ 7. BN statistics
def _bn_updates(model):
    return sum(int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_frozen_bn_statistics_uses_batch_stats_without_updating():
    model = create_model("resnet18", 10).train()
    x = torch.rand(4, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen_bn_statistics(model):
        out = model(x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.allclose(out, model(x), atol=1e-5)  # same batch statistics as a plain train-mode forward
    assert not torch.equal(before["net.bn1.running_mean"], model.state_dict()["net.bn1.running_mean"])


@pytest.mark.parametrize("update, expected", [(False, 2), (True, 2 + 2 + 2 + 2 + 1)])
def test_only_the_loss_forwards_update_bn_statistics(update, expected):
    """DHAT with 2 PGD and 2 inverse steps: x_adv and x_inv update BN running statistics;
    with attack_bn_update=true (the authors' code) also every attack step, p_nat/p_adv and x_B."""
    cfg = tiny(attack_steps=2, inv_steps=2, attack_bn_update=update)
    method = training_methods.create_training_method(cfg)
    model = create_model("resnet18", 10).train()
    layers = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fg = torch.zeros(4, 1, 32, 32, dtype=torch.bool)
    method.loss(model, torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)), fg)
    assert _bn_updates(model) == expected * layers


def test_uiat_and_dhat_update_bn_statistics_alike():
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    fg = torch.ones(4, 1, 32, 32, dtype=torch.bool)
    counts = []
    for name in ("uiat", "dhat"):
        model = create_model("resnet18", 10).train()
        training_methods.create_training_method(tiny(method=name)).loss(model, x, y, fg)
        counts.append(_bn_updates(model))
    assert counts[0] == counts[1]


# ------------------------------------------------------------------ 8. self attention needs a burn-in
def test_self_attention_without_burn_in_is_refused():
    with pytest.raises(UserError, match="attention_burn_in=0 is invalid with attention_source='self'"):
        tiny(attention_source="self")
    tiny(attention_source="self", attention_burn_in=1)  # fine
    tiny(method="uiat", attention_source="self")  # no attention terms: nothing to refuse


def test_self_attention_masks_come_from_the_trained_model_after_burn_in(tmp_path):
    logs = []
    Experiment(tiny(attention_source="self", attention_burn_in=1, epochs=2), tmp_path / "run", log=logs.append,
            cache_dir=tmp_path / "c", progress=False).run()
    built = [l for l in logs if "building self-attention masks" in l]
    assert len(built) == 1 and "of epoch 1" in built[0]  # from the weights after one epoch, not the random init
    records = _metrics(tmp_path / "run")
    assert "train_dhlr" not in records[0] and "train_dhlr" in records[1]  # epoch 1 trained as UIAT
