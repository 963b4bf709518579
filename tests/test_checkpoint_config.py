"""Checkpoints (safetensors, atomic, weights-only) and configuration loading."""

from pathlib import Path

import pytest
import torch
import yaml

from dhat_seg.run.checkpoint import (load_state, load_weights, read_pointers, resolve_weights, save_checkpoint,
                                     save_weights)
from dhat_seg.config import PRESETS, TrainConfig, load_config
from dhat_seg.errors import UserError
from dhat_seg.models import MODELS, create_model

ROOT = Path(__file__).resolve().parents[1]


def test_weights_round_trip_rebuilds_model(tmp_path):
    model = create_model("small_cnn", 7, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    save_weights(model, tmp_path / "m.safetensors", "small_cnn")
    loaded = load_weights(tmp_path / "m.safetensors")
    x = torch.rand(2, 3, 16, 16)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
    assert loaded.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_wrong_architecture_and_corrupt_files_are_user_errors(tmp_path):
    save_weights(create_model("small_cnn", 10), tmp_path / "m.safetensors", "small_cnn")
    with pytest.raises(UserError, match="does not fit the model"):
        load_weights(tmp_path / "m.safetensors", create_model("resnet18", 10))
    with pytest.raises(UserError, match="holds model 'small_cnn'; expected 'resnet18'"):
        load_weights(tmp_path / "m.safetensors", expected_model="resnet18")
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    (tmp_path / "bad.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(UserError, match="corrupt"):
        load_weights(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt"):
        load_weights(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")


def test_state_files_are_loaded_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "state.pt")
    with pytest.raises(UserError, match="unsafe|corrupt"):
        load_state(tmp_path / "state.pt")


def test_checkpoints_keep_last_and_best(tmp_path):
    model = create_model("small_cnn", 10)
    for epoch, best in [(1, True), (2, False), (3, False), (4, True), (5, False)]:
        save_checkpoint(tmp_path, epoch, model, "small_cnn", {"epoch": epoch, "best": 0.0}, is_best=best)
    assert read_pointers(tmp_path) == {"last": "epoch_0005", "best": "epoch_0004"}
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_0004", "epoch_0005"]
    assert resolve_weights(tmp_path).parent.name == "epoch_0004"
    assert resolve_weights(tmp_path, "last").parent.name == "epoch_0005"
    assert load_state(tmp_path / "epoch_0005" / "state.pt")["epoch"] == 5


def test_config_files_mirror_presets():
    for name, values in PRESETS.items():
        assert yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()) == values
        load_config(name)  # valid


def test_paper_preset_matches_reference():
    cfg = load_config("paper")
    assert (cfg.model, cfg.data, cfg.epochs, cfg.lr, cfg.milestones) == ("wrn28_10", "cifar10", 100, 0.1, [80, 90])
    assert (cfg.eps, cfg.step_size, cfg.attack_steps, cfg.inv_eps, cfg.inv_step_size, cfg.inv_steps) == (8, 2, 10, 4, 2, 10)
    assert (cfg.momentum, cfg.weight_decay, cfg.lambda1, cfg.lambda2, cfg.batch_size) == (0.9, 5e-4, 1.0, 1.0, 128)


@pytest.mark.parametrize(
    "overrides, message",
    [({"epochs": -1}, "epochs=-1"), ({"rho": 2}, "rho=2"), ({"nonsense": 1}, "'nonsense' is unknown"), ({"attack_mode": "x"}, "attack_mode")],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_bad_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_and_exposes_cam_layer(name):
    model = create_model(name, 10)
    assert model.cam_layer is not None
    if not name.startswith("wrn"):  # WRNs are built but not run: too slow for unit tests
        out = model(torch.rand(2, 3, 32, 32))
        assert out.shape == (2, 10)
    with pytest.raises(UserError, match="model 'vgg' is unknown"):
        create_model("vgg", 10)


def test_config_digest_changes_with_settings():
    assert TrainConfig().digest() != TrainConfig(seed=1).digest()


def test_digest_leaves_out_later_keys_only_at_their_neutral_value():
    import hashlib
    import json

    from dhat_seg.config import ALWAYS_DIGESTED, TrainConfig, load_config

    cfg = TrainConfig(data="cifar10")  # built-in data add their generator's version (tests/test_benchmark_data.py)
    older = {k: v for k, v in cfg.to_dict().items() if k in ALWAYS_DIGESTED}  # a config from before those keys
    older["attack_mode"] = "train"  # null = DHAT's own mode, train: the value every earlier config held
    assert cfg.digest() == hashlib.sha256(json.dumps(older, sort_keys=True, default=str).encode()).hexdigest()[:12]
    for key, value in (("awp", True), ("base", "trades"), ("trades.beta", 1.0), ("awp_warmup", 3)):
        assert load_config(None, {"data": "cifar10", key: value}).digest() != cfg.digest(), key
