"""Speed options (issue "Fast on one GPU"): channels_last, torch.compile and bf16 autocast
train on CPU, keep attacks working, keep checkpoints plain and do not recompile on every
train/eval switch. The robustness comparison (PGD-10 with and without each option vs the
seed spread) is a benchmark, not a test: benchmarks/check_speed_options.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from typer.testing import CliRunner

from dhat_seg import attacks, training_methods
from dhat_seg.run import speed
from dhat_seg.run.checkpoint import load_weights, resolve_weights
from dhat_seg.cli import app
from dhat_seg.config import ALWAYS_DIGESTED, TrainConfig, load_config
from dhat_seg.errors import UserError
from dhat_seg.run.experiment import Experiment
from dhat_seg.models import create_model
from dhat_seg.run.trainer import Trainer
from cli_helpers import assert_one_line_error

NO_CXX = "torch.compile on CPU needs a C++ compiler (Inductor builds C++ kernels) and none was found"


def tiny(**overrides) -> TrainConfig:
    """AT on a few synthetic images (no attention model to train)."""
    values = dict(method="at", data="synthetic", model="small_cnn", train_size=48, test_size=16, val_size=8, epochs=1,
                  batch_size=16, attack_steps=1, val_examples=8, val_attack_steps=1, device="cpu", milestones=[])
    values.update(overrides)
    return load_config(None, values)


def fit(cfg: TrainConfig, out, cache, logs=None, on_epoch=None):
    """The trained model and the run's summary (an Experiment's run, keeping its parts)."""
    logs = logs if logs is not None else []
    experiment = Experiment(cfg, out, cache_dir=cache, log=logs.append, progress=False,
                            on_epoch=on_epoch or (lambda r: None))
    summary = experiment.run()
    return experiment.parts.model, summary


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_loads_into_plain_model(trained: nn.Module, out) -> None:
    """The checkpoint's keys are a plain model's, and the plain model computes what the trained one does."""
    plain = load_weights(resolve_weights(out))  # built from the metadata: a plain, eager, contiguous model
    assert set(plain.state_dict()) == set(trained.state_dict())
    assert not any(k.startswith("_orig_mod") for k in trained.state_dict())
    x = torch.rand(4, 3, 32, 32)
    trained.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(trained(x), plain(x), rtol=1e-4, atol=1e-5)


@pytest.fixture
def cheap_compile(monkeypatch):
    """TorchDynamo as in a real run (guards, recompiles, graph breaks) with AOTAutograd's
    eager backend: no C++ build, so trainer-level tests stay fast. The real backend is
    tested on a tiny network below."""
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


# ------------------------------------------------------------------ channels_last
def test_channels_last_run_trains_and_its_checkpoint_loads_into_a_plain_model(tmp_path):
    logs = []
    model, summary = fit(tiny(channels_last=True, epochs=2), tmp_path / "run", tmp_path / "c", logs)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    handle = conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    model(torch.rand(2, 3, 32, 32))  # an ordinary NCHW batch reaches the convolutions channels-last
    handle.remove()
    assert seen == [True]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in metrics(tmp_path / "run"))
    assert 0 <= summary["pgd10_acc"] <= 100
    assert logs.count("speed options: channels_last memory format") == 1
    assert_loads_into_plain_model(model, tmp_path / "run")


def test_attacks_through_a_channels_last_model_get_the_plain_models_input_gradients():
    torch.manual_seed(0)
    plain = create_model("small_cnn", 10).eval()
    fast = speed.prepare_model(copy.deepcopy(plain), tiny(channels_last=True))
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    grads = []
    for m in (plain, fast):
        xr = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(nn.functional.cross_entropy(m(xr), y), xr)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
    assert grads[1].shape == x.shape
    x_adv = attacks.pgd(fast, x, y, 8 / 255, 2 / 255, 3, mode="eval")
    assert 0 < (x_adv - x).abs().max() <= 8 / 255 + 1e-6


# ------------------------------------------------------------------ compile
def test_train_eval_switches_do_not_recompile(cheap_compile):
    """Each (mode, grad mode) the trainer uses compiles once; switching back and forth
    afterwards reuses the compiled graphs."""
    torch.manual_seed(0)
    model = speed.prepare_model(create_model("small_cnn", 10), tiny(compile=True))
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    after_round = []
    for _ in range(4):
        model.train()
        x_adv = attacks.pgd(model, x, y, 8 / 255, 2 / 255, 2, mode="train")  # input gradients, BN frozen or not
        loss = nn.functional.cross_entropy(model(x_adv), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            model(x)
        attacks.pgd(model, x, y, 8 / 255, 2 / 255, 2, mode="eval")  # validation's PGD
        after_round.append(compiled_graphs())
    assert after_round[0] >= 1
    assert after_round[1:] == [after_round[0]] * 3, after_round  # no recompile after the first round
    assert model._compiled_call_impl is not None
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())


def test_compiled_run_trains_without_recompiling_per_epoch_and_checkpoints_plain(tmp_path, cheap_compile):
    graphs, logs = [], []
    model, summary = fit(tiny(compile=True, channels_last=True, epochs=3), tmp_path / "run", tmp_path / "c", logs,
                         on_epoch=lambda r: graphs.append(compiled_graphs()))
    assert graphs[0] >= 1 and graphs[1:] == [graphs[0]] * 2, graphs  # epochs 2-3: no new graph despite train/eval switches
    assert model._compiled_call_impl is not None
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in metrics(tmp_path / "run"))
    assert 0 <= summary["pgd10_acc"] <= 100
    assert sum(l.startswith("speed options:") for l in logs) == 1
    assert any("channels_last" in l and "torch.compile" in l for l in logs)
    assert_loads_into_plain_model(model, tmp_path / "run")


def test_compiled_dhat_step_gives_input_gradients_and_finite_loss(cheap_compile):
    cfg = tiny(method="dhat", attention="oracle", compile=True, channels_last=True, inv_steps=1, amp=True,
               amp_dtype="bfloat16")
    method = training_methods.create_training_method(cfg)
    torch.manual_seed(0)
    model = speed.prepare_model(create_model("small_cnn", 10).train(), cfg)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    fg = torch.zeros(8, 1, 32, 32, dtype=torch.bool)
    fg[:, :, 8:24, 8:24] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = method.loss(model, x, y, fg)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in stats.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(speed._cpp_compiler() is None, reason=NO_CXX)
def test_inductor_compile_on_cpu_matches_eager_on_a_tiny_network():
    """The real backend (C++ kernels): forward, backward and an attack's input gradients
    equal the eager network's, and a second round of train/eval switches compiles nothing."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    eager = copy.deepcopy(net)
    speed.prepare_model(net, tiny(compile=True, channels_last=True))
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 3, (4,))
    graphs = []
    for _ in range(2):
        outs = []
        for m in (net, eager):
            m.train()
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            torch.manual_seed(1)  # the same random start
            x_adv = attacks.pgd(m, x, y, 8 / 255, 2 / 255, 1, mode="eval")
            with torch.no_grad():
                outs.append((m.eval()(x), m[0].weight.grad.clone(), x_adv))
        graphs.append(compiled_graphs())
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert graphs[1] == graphs[0]
    assert set(net.state_dict()) == set(eager.state_dict())
    torch._dynamo.reset()


def test_compile_without_a_cpp_compiler_is_one_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "_cpp_compiler", lambda: None)
    with pytest.raises(UserError, match="compile=true needs a C\\+\\+ compiler on CPU"):
        Experiment(tiny(compile=True), tmp_path / "run", cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "run").exists()  # refused before any work
    result = CliRunner().invoke(app, ["train", "--compile", "--device", "cpu", "--out", str(tmp_path / "cli")])
    assert_one_line_error(result, "needs a C++ compiler", "drop --compile")


# ------------------------------------------------------------------ bf16 autocast
def test_bf16_autocast_trains_end_to_end_on_cpu(tmp_path):
    logs = []
    model, summary = fit(tiny(method="uiat", inv_steps=1, amp=True, amp_dtype="bfloat16"), tmp_path / "run",
                         tmp_path / "c", logs)
    assert logs.count("speed options: bfloat16 autocast for the training passes (attacks in fp32)") == 1
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in metrics(tmp_path / "run"))
    assert 0 <= summary["clean_acc"] <= 100 and 0 <= summary["pgd10_acc"] <= 100
    assert next(model.parameters()).dtype == torch.float32  # autocast: fp32 weights
    assert_loads_into_plain_model(model, tmp_path / "run")


# ------------------------------------------------------------------ config
def test_speed_options_are_digest_neutral_off_and_do_not_block_a_resume(tmp_path):
    assert "channels_last" not in ALWAYS_DIGESTED and "compile" not in ALWAYS_DIGESTED  # hashed only when on
    cfg = tiny()
    assert tiny(channels_last=False, compile=False).digest() == cfg.digest()
    # on, they enter the digest, as amp does (same method, other rounding: not the same run's numbers)
    assert tiny(channels_last=True).digest() != cfg.digest() and tiny(compile=True).digest() != cfg.digest()
    Trainer.prepare_out_dir(cfg, tmp_path / "run", resume=False)
    Trainer.prepare_out_dir(tiny(channels_last=True, compile=True, amp=True), tmp_path / "run", resume=True)
    with pytest.raises(UserError, match="option lr="):
        Trainer.prepare_out_dir(tiny(lr=0.5), tmp_path / "run", resume=True)


def test_cli_flags_set_the_options(tmp_path):
    result = CliRunner().invoke(app, ["train", "--channels-last", "--set", "channels_last=false", "--out", str(tmp_path)])
    assert_one_line_error(result, "channels_last is set twice", "--channels-last")
    result = CliRunner().invoke(app, ["train", "--compile", "--set", "compile=false", "--out", str(tmp_path)])
    assert_one_line_error(result, "compile is set twice", "--compile")
