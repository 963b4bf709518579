"""Methods own their settings: a method is one module plus one registry line.

A test-only method (``toy``: AT plus a weighted clean CE, with one setting of its own) is
registered from here, with no file of the package touched, and it trains, is listed by
``dhat-seg methods``, is a base of DHAT, takes AWP and is a row of ``dhat-seg compare``.
Digests: the fixture tests/fixtures/digests-0.1.json was written by dhat-seg before the
settings moved (flat keys such as ``trades_beta``); every config it lists keeps its digest,
and a 0.1 ``config.yaml`` (tests/fixtures/config-0.1-*.yaml) still loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from dhat_seg import training_methods
from dhat_seg.studies import compare
from dhat_seg.studies import run as study_run
from dhat_seg.cli import app
from dhat_seg.config import load_config, save_config
from dhat_seg.method_options import migrate
from dhat_seg.errors import UserError
from dhat_seg.models import create_model
from dhat_seg.training_methods import TrainingMethodEntry, create_training_method, register_training_method
from dhat_seg.training_methods.adversarial import MadryAT, TradesSettings
from dhat_seg.training_methods.settings import MethodSettings

FIXTURES = Path(__file__).parent / "fixtures"
TINY = {"data": "synthetic", "image_size": 16, "model": "small_cnn", "train_size": 48, "test_size": 16, "val_size": 16,
        "epochs": 1, "milestones": [], "batch_size": 16, "attack_steps": 1, "inv_steps": 1, "val_examples": 8,
        "val_attack_steps": 1, "device": "cpu", "attention": "oracle"}


# ------------------------------------------------------------------ the test-only method (one "module")
@dataclass(frozen=True)
class ToySettings(MethodSettings):
    weight: float = 0.5

    def checks(self, cfg):
        return [(self.weight >= 0, "weight", "a non-negative number")]


class Toy(MadryAT):
    """AT + ``toy.weight`` x CE on the clean batch; a base too (it has AT's attack and a base_loss)."""

    def base_loss(self, model, x, y, x_adv):
        loss, z_adv, stats = super().base_loss(model, x, y, x_adv)
        ce = F.cross_entropy(model(x), y)
        return loss + self.cfg.options("toy").weight * ce, z_adv, {**stats, "toy_ce": ce.detach()}


@pytest.fixture
def toy():
    entry = register_training_method(TrainingMethodEntry("toy", "test-only: AT + weight x clean CE", Toy,
                                                         settings=ToySettings, is_base=True, attack_mode="train"))
    yield entry
    training_methods.TRAINING_METHODS.pop("toy")


def test_a_method_in_one_file_trains_and_is_listed(toy, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["methods"])
    assert listed.exit_code == 0 and "toy" in listed.output and "toy.weight=0.5" in listed.output
    assert "trades.beta=6.0" in listed.output and "cfa.fawa_begin=50" in listed.output
    args = ["train", "--method", "toy", "--set", "toy.weight=0.25", "--out", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache")]
    for key, value in TINY.items():
        if key not in ("attention", "inv_steps"):  # read by DHAT, UIAT and PART only: refused for toy
            args += ["--set", f"{key}={json.dumps(value) if isinstance(value, list) else value}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"] == "toy" and saved["method_options"] == {"toy": {"weight": 0.25}}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config_digest"] == load_config(tmp_path / "run" / "config.yaml").digest()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "train_toy_ce" in records[-1] and math.isfinite(records[-1]["train_loss"])


def test_a_method_in_one_file_composes(toy):
    torch.manual_seed(0)
    cfg = load_config(None, {**TINY, "method": "dhat", "base": "toy", "toy.weight": 0.3, "awp": True}, check_unread=True)
    assert cfg.options("toy").weight == 0.3 and "toy" in training_methods.base_methods()
    method = create_training_method(cfg)
    assert isinstance(method.base, Toy)
    model = create_model("small_cnn", 10).train()
    x, y = torch.rand(4, 3, 16, 16), torch.arange(4)
    foreground = torch.zeros(4, 1, 16, 16, dtype=torch.bool)
    foreground[..., 4:12, 4:12] = True
    with method.weight_perturbation(model, x, y, foreground, 0) as prepared:
        loss, stats = method.loss(model, x, y, foreground, prepared)
    assert math.isfinite(loss.item()) and "toy_ce" in stats
    with pytest.raises(UserError, match=r"toy.weight=0.3 is not read by method 'at'.*it is read by toy, uiat with base="):
        load_config(None, {"method": "at", "toy.weight": 0.3}, check_unread=True)


def test_a_method_in_one_file_is_a_row_of_compare(toy, tmp_path, monkeypatch):
    from dhat_seg.studies import ablate
    from dhat_seg.evaluation.report import EvalOptions

    rows, skipped = compare.parse_methods("toy,at", "gradcam", {"gradcam": 1})
    assert rows == ["toy", "at"] and not skipped and "toy" in compare.parse_methods("all", "gradcam", {"gradcam": 1})[0]
    base = ablate.base_config(ablate.ABLATE_PRESETS["quick"], {"image_size": 16, "train_size": 48, "test_size": 16})
    assert compare.method_config(base, "toy", "gradcam").method == "toy"
    runs = []

    class FakeRun:
        def __init__(self, cfg, run_dir, **_):
            self.cfg, self.run_dir = cfg, run_dir

        def run(self, resume=False):
            runs.append(self.cfg.method)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(f"method: {self.cfg.method}\n")
            (self.run_dir / "summary.json").write_text(json.dumps({"config_digest": self.cfg.digest()}))

    def fake_eval(run_dir, options, log=None):
        checks = [{"name": "iterative beats single-step", "passed": True, "detail": "", "values": {}}]
        report = {"accuracy": {"clean": 50.0, "pgd10": 20.0}, "examples": {"clean": 16},
                  "sanity": {"n": 16, "surrogate": "test", "passed": True, "alpha": 0.01, "checks": checks},
                  "config_digest": json.loads((run_dir / "summary.json").read_text())["config_digest"],
                  "eval_settings": options.result_settings()}
        (run_dir / "eval.json").write_text(json.dumps(report))
        return report

    monkeypatch.setattr(study_run, "run_eval", fake_eval)
    preset = ablate.ABLATE_PRESETS["quick"]
    options = dataclasses.replace(EvalOptions(), **preset.eval, device="cpu").validate()
    result = compare.run_comparison(["toy"], base, options, tmp_path / "out", cache_dir=tmp_path / "cache", preset=preset,
                                    log=lambda m: None, progress=False, trainer_factory=FakeRun)
    (row,) = result["rows"]
    assert runs == ["toy"] and row["row"] == "toy" and row["status"] == "ok" and row["clean"] == 50.0


# ------------------------------------------------------------------ digests and old configs
def test_the_digests_of_0_1_configs_are_kept():
    cases = json.loads((FIXTURES / "digests-0.1.json").read_text())
    assert len(cases) >= 10
    for name, case in cases.items():
        assert load_config(None, case["overrides"]).digest() == case["digest"], name


def test_adding_a_setting_leaves_every_digest_alone(monkeypatch):
    """A new setting of TRADES (here: ``gamma``) changes no digest until a run changes it."""
    cases = json.loads((FIXTURES / "digests-0.1.json").read_text())

    @dataclass(frozen=True)
    class Grown(TradesSettings):
        gamma: float = 1.0

    entry = training_methods.TRAINING_METHODS["trades"]
    monkeypatch.setitem(training_methods.TRAINING_METHODS, "trades", dataclasses.replace(entry, settings=Grown))
    for name, case in cases.items():
        assert load_config(None, case["overrides"]).digest() == case["digest"], name
    plain = load_config(None, {"method": "trades"})
    assert load_config(None, {"method": "trades", "trades.gamma": 1.0}).digest() == plain.digest()
    assert load_config(None, {"method": "trades", "trades.gamma": 2.0}).digest() != plain.digest()


@pytest.mark.parametrize("fixture, method, options", [
    ("config-0.1-dhat-cfa.yaml", "dhat", {"cfa": {"base": "at", "lambda1": 0.4, "lambda2": 0.5, "begin": 10,
                                                  "fawa_decay": 0.85, "fawa_threshold": 0.2, "fawa_begin": 3}}),
    ("config-0.1-again-code.yaml", "again", {"again": {"form": "code", "alpha": 0.6, "fake_label": "random",
                                                       "hff": None}}),
])
def test_a_0_1_config_file_still_loads(fixture, method, options, tmp_path):
    cases = {c["digest"] for c in json.loads((FIXTURES / "digests-0.1.json").read_text()).values()}
    cfg = load_config(FIXTURES / fixture)
    assert cfg.method == method and cfg.to_dict()["method_options"] == options
    assert cfg.digest() in cases
    save_config(cfg, tmp_path / "config.yaml")  # today's form round-trips
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict() and again.digest() == cfg.digest()
    # a run directory of 0.1 resumes under the same settings, and refuses other ones
    from dhat_seg.run.trainer import Trainer

    run = tmp_path / "old-run"
    run.mkdir()
    (run / "config.yaml").write_text((FIXTURES / fixture).read_text())
    Trainer.prepare_out_dir(cfg, run, resume=True)
    (run / "config.yaml").write_text((FIXTURES / fixture).read_text())
    owner, settings = next(iter(options.items()))
    changed = dataclasses.replace(cfg, method_options={**cfg.method_options,
                                                       owner: {**settings, "alpha" if owner == "again" else "lambda2": 0.1}})
    with pytest.raises(UserError, match=f"option {owner}.(alpha|lambda2)=0.1 differs"):
        Trainer.prepare_out_dir(changed.validate(), run, resume=True)


# ------------------------------------------------------------------ spellings and errors
def test_flat_dotted_and_nested_spellings_agree(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("method: cfa\nmethod_options:\n  cfa:\n    base: trades\n  trades:\n    beta: 3.0\n")
    dotted = tmp_path / "dotted.yaml"
    dotted.write_text("method: cfa\ncfa.base: trades\ntrades.beta: 3.0\n")
    configs = [load_config(nested), load_config(dotted),
               load_config(None, {"method": "cfa", "cfa_base": "trades", "trades_beta": 3.0}),
               load_config(None, {"method": "cfa", "cfa.base": "trades", "trades.beta": 3.0})]
    assert all(c.to_dict() == configs[0].to_dict() for c in configs)
    assert configs[0].options("trades").beta == 3.0 and configs[0].options("cfa").base == "trades"
    assert migrate({"trades_beta": 2.0, "lr": 0.1}) == {"lr": 0.1, "method_options": {"trades": {"beta": 2.0}}}


@pytest.mark.parametrize("overrides, message", [
    ({"trades.gamma": 1.0}, "config option trades.gamma is unknown; method 'trades' has the settings trades.beta"),
    ({"trades.beta": "six"}, "config option trades.beta='six' is invalid; expected a number"),
    ({"nosuch.key": 1}, "method 'nosuch' is unknown"),
    ({"at.key": 1}, "method 'at' has no settings"),
    ({"method_options": {"trades": 3}}, "method_options.trades = 3 is invalid; expected a mapping"),
    ({"tradesbeta": 1}, "config option 'tradesbeta' is unknown"),
])
def test_bad_method_settings_are_named(overrides, message):
    with pytest.raises(UserError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_the_cli_takes_dotted_settings_and_names_a_bad_one(tmp_path):
    result = CliRunner().invoke(app, ["train", "--method", "trades", "--set", "trades.beta=-1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "trades.beta=-1.0 is invalid; expected a non-negative number" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()
