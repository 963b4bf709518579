"""Every registered training method trains a step, and attacks in the mode its authors' code uses.

Parametrised over ``TRAINING_METHODS`` (timm-style), so a method cannot be registered untested; the
registry's other declarations (bases, stateful, owned settings, model variants) are checked against
what the callers do with them.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from dhat_seg import attacks
from dhat_seg.config import TrainConfig, load_config
from dhat_seg.errors import UserError
from dhat_seg.models import create_model
from dhat_seg.training_methods import (TRAINING_METHODS, attack_mode_of, create_training_method, reads_base,
                                       unread_settings)

#: (method, extra settings): every registered method, and AGAIN's released form beside its paper form.
CASES = [(name, {}) for name in TRAINING_METHODS] + [("again", {"again.form": "code"})]
#: The mode each official code crafts its training attacks in (REFERENCE section 4; the registry's sources).
OFFICIAL_MODE = {"standard": None, "at": "train", "uiat": "train", "dhat": "train", "trades": "eval", "mart": "eval",
                 "cfa": "eval", "sglr": "eval", "fsr": "eval", "part": "eval", "again": "eval"}


def tiny(method: str, **extra) -> TrainConfig:
    values = dict(method=method, data="synthetic", image_size=16, model="small_cnn", epochs=2, milestones=[],
                  batch_size=8, attack_steps=1, val_examples=8, val_attack_steps=1, device="cpu", **extra)
    probe = load_config(None, {"method": method, **extra})
    entry = TRAINING_METHODS[method]
    reads = entry.shared_read(probe) | {f"{owner}.{key}" for owner in entry.settings_read(probe)
                                        for key in probe.options(owner).field_names()}
    # the methods' own short schedules, for the methods that read them (any other would be refused)
    short = {"inv_steps": 1, "attention_source": "frozen", "cfa.begin": 0, "cfa.fawa_begin": 0, "sglr.start": 0}
    return load_config(None, values | {k: v for k, v in short.items() if k in reads}, check_unread=True)


def one_step(cfg: TrainConfig, record: list | None = None) -> tuple[torch.Tensor, dict]:
    """One training step as the trainer takes it (hooks, AWP context, loss, backward, step)."""
    torch.manual_seed(0)
    model = create_model(cfg.model, 10)
    method = create_training_method(cfg)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    foreground = torch.zeros(8, 1, 16, 16, dtype=torch.bool)
    foreground[:, :, 4:12, 4:12] = True
    method.on_train_data(64, 8)
    method.on_fit_start(model, None)
    method.on_epoch_start(model, 0)
    method.on_batch_start(torch.arange(8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    with method.weight_perturbation(model, x, y, foreground, 0) as prepared:
        loss, stats = method.loss(model, x, y, foreground if method.needs_attention else None, prepared)
        optimizer.zero_grad()
        loss.backward()
    optimizer.step()
    method.after_step(model)
    return loss, stats


@pytest.mark.parametrize("name, extra", CASES, ids=[n + ("-code" if e else "") for n, e in CASES])
def test_every_registered_method_trains_a_step(name, extra):
    cfg = tiny(name, **extra)
    loss, stats = one_step(cfg)
    assert math.isfinite(loss.item()) and all(torch.isfinite(v).all() for v in stats.values())


def test_the_smoke_test_covers_the_whole_registry():
    assert {name for name, _ in CASES} == set(TRAINING_METHODS)


@pytest.mark.parametrize("name, extra", CASES, ids=[n + ("-code" if e else "") for n, e in CASES])
def test_every_attack_forward_runs_in_the_mode_of_the_official_code(name, extra, monkeypatch):
    """The model's mode at every forward inside an attack (``attacks.model_mode``, which every training
    attack and UIAT/DHAT's inverse targets enter) during one step, with ``attack_mode`` left null."""
    modes: list[bool] = []
    inside = [0]
    original = attacks.model_mode

    @contextlib.contextmanager
    def recording_mode(model, mode):
        with original(model, mode):
            inside[0] += 1
            handle = model.register_forward_pre_hook(lambda m, a: modes.append(m.training) if inside[0] else None)
            try:
                yield model
            finally:
                handle.remove()
                inside[0] -= 1

    monkeypatch.setattr(attacks, "model_mode", recording_mode)
    cfg = tiny(name, **extra)
    assert cfg.attack_mode is None and attack_mode_of(cfg) == (OFFICIAL_MODE[name] or "train")
    one_step(cfg)
    expected = OFFICIAL_MODE[name]
    if expected is None:
        assert modes == []  # clean training: no attack
        return
    assert modes and set(modes) == {expected == "train"}, (name, modes)


@pytest.mark.parametrize("base", ["at", "trades", "mart", "cfa", "sglr"])
def test_dhat_on_a_base_attacks_as_dhat_and_part_fsr_as_their_code(base):
    """DHAT/UIAT on any base: train mode throughout (the DHAT authors' code); PART and FSR on theirs: eval."""
    assert attack_mode_of(tiny("dhat", base=base)) == "train"
    method = create_training_method(tiny("uiat", base=base))
    assert method.attack_mode == method.base.attack_mode == "train"
    if base in TRAINING_METHODS["part"].bases:
        part = create_training_method(tiny("part", base=base))
        assert part.attack_mode == part.base.attack_mode == "eval"
    assert attack_mode_of(tiny("trades", attack_mode="train")) == "train"  # --set attack_mode still overrides


def test_attack_mode_null_keeps_the_digest_of_unchanged_behaviour():
    for method in ("dhat", "uiat", "at", "standard"):
        assert tiny(method).digest() == tiny(method, attack_mode="train").digest()
    for method in ("trades", "mart", "cfa", "sglr", "part", "fsr", "again"):
        assert tiny(method).digest() == tiny(method, attack_mode="eval").digest() != tiny(method, attack_mode="train").digest()


def test_train_prints_the_attack_mode_among_the_paper_differences():
    from dhat_seg.paper_settings import paper_differences

    assert ("attack_mode", "eval", "train") in paper_differences(tiny("trades"))
    assert "attack_mode" not in [k for k, _, _ in paper_differences(tiny("dhat"))]


# ------------------------------------------------------------------ what the registry declares
def test_a_setting_the_method_does_not_read_is_refused_naming_its_readers():
    with pytest.raises(UserError, match=r"base='trades' is not read by method 'at'.*uiat, dhat, fsr, part"):
        tiny("at", base="trades")
    with pytest.raises(UserError, match=r"trades.beta=3.0 is not read by method 'mart'.*trades, uiat with base="):
        tiny("mart", **{"trades.beta": 3.0})
    with pytest.raises(UserError, match=r"trades.beta=3.0 is not read by method 'cfa'.*cfa with cfa.base=trades"):
        tiny("cfa", **{"trades.beta": 3.0})
    with pytest.raises(UserError, match=r"cfa.begin"):
        load_config(None, {"method": "trades", "cfa.begin": 3}, check_unread=True)
    with pytest.raises(UserError, match=r"fsr.tau"):
        tiny("dhat", **{"fsr.tau": 0.5})
    with pytest.raises(UserError, match=r"trades.beta"):  # the 0.1 name: read as trades.beta
        tiny("mart", trades_beta=3.0)
    # read through the base, or at the default value, or by the method itself: accepted
    assert tiny("dhat", base="trades", **{"trades.beta": 3.0}).options("trades").beta == 3.0
    assert tiny("cfa", **{"cfa.base": "trades", "trades.beta": 3.0}).options("trades").beta == 3.0
    assert tiny("at", base="at", **{"trades.beta": 6.0}).method == "at"
    assert tiny("part", base="mart", **{"mart.beta": 5.0}).options("mart").beta == 5.0


def test_the_cli_refuses_an_unread_setting(tmp_path):
    from typer.testing import CliRunner

    from dhat_seg.cli import app

    result = CliRunner().invoke(app, ["train", "--method", "at", "--set", "base=trades", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "base='trades' is not read by method 'at'" in result.output
    assert not (tmp_path / "r").exists()


def test_unread_settings_checks_only_what_the_user_gave():
    cfg = TrainConfig(method="at", base="trades")
    unread_settings(cfg, set())  # not given by the user (e.g. a preset for another method)
    with pytest.raises(UserError):
        unread_settings(cfg, {"base"})


def test_every_preset_and_config_file_still_loads():
    from dhat_seg.studies import compare
    from dhat_seg.studies.rows import ABLATE_PRESETS, base_config
    from dhat_seg.presets import PRESETS

    for name in PRESETS:
        load_config(name)
    for path in ("configs/quick.yaml", "configs/paper.yaml", "configs/part.yaml"):
        load_config(path)
    for preset in ABLATE_PRESETS.values():
        base = base_config(preset, {})
        for row in compare.method_rows().values():
            if row.method is not None:
                compare.method_config(base, row.name, "gradcam")
    load_config("quick", {"method": "at"}, check_unread=True)  # the DHAT recipe's settings for another method
    load_config("configs/quick.yaml", {"method": "trades"}, check_unread=True)  # a file written for DHAT: not refused
    with pytest.raises(UserError, match="trades.beta"):
        load_config("configs/part.yaml", {"trades.beta": 3.0}, check_unread=True)  # PART on AT does not read it


def test_a_method_picks_its_model_variant_and_says_so():
    notes: list[str] = []
    cfg = load_config(None, {"method": "fsr", "model": "small_cnn"}, notes=notes)
    assert cfg.model == "small_cnn_fsr" and len(notes) == 1 and "small_cnn_fsr" in notes[0]
    notes.clear()
    cfg = load_config(None, {"method": "again", "again.form": "code", "model": "resnet18"}, notes=notes)
    assert cfg.model == "resnet18_again" and len(notes) == 1
    notes.clear()
    assert load_config(None, {"method": "fsr", "model": "small_cnn_fsr"}, notes=notes).model == "small_cnn_fsr"
    assert notes == [] and load_config(None, {"method": "again", "model": "small_cnn"}).model == "small_cnn"


def test_stateful_methods_and_base_readers_come_from_the_registry():
    from dhat_seg.run.distributed import Dist, check_distributable

    assert {n for n, e in TRAINING_METHODS.items() if e.stateful} == {"cfa", "sglr"}
    assert {n for n in TRAINING_METHODS if reads_base(n)} == {"uiat", "dhat", "fsr", "part"}
    for name, base in (("cfa", "at"), ("dhat", "sglr"), ("uiat", "cfa")):
        with pytest.raises(UserError, match="single process"):
            check_distributable(TrainConfig(method=name, base=base, batch_size=8), Dist(0, 2, 0))
    check_distributable(TrainConfig(method="trades", batch_size=8), Dist(0, 2, 0))
