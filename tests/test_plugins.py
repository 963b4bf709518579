"""The plugin contract: discovery through entry points, isolation of broken plugins,
the allow/block environment variables, validation of results, ``dhat-seg plugins``."""

import ast
import shutil
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dhat_seg import hookimpl, plugin_manager
from dhat_seg.attention import AttentionContext, AttentionSpec
from dhat_seg.cli import app
from dhat_seg.config import load_config
from dhat_seg.errors import PluginError
from dhat_seg.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dhat-seg-centre"


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugin_manager.reset()
    yield
    plugin_manager.reset()


def install_fake_distribution(site: Path, name: str, module_source: str | Path, entry_name: str) -> None:
    """What pip install leaves behind: the module and a dist-info with entry_points.txt."""
    site.mkdir(parents=True, exist_ok=True)
    module = name.replace("-", "_")
    if isinstance(module_source, Path):
        shutil.copy(module_source, site / f"{module}.py")
    else:
        (site / f"{module}.py").write_text(module_source)
    info = site / f"{module}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[dhat_seg]\n{entry_name} = {module}\n")


def tiny_config(**overrides):
    values = dict(method="dhat", data="synthetic", model="small_cnn", train_size=64, test_size=32, val_size=16,
                  epochs=1, batch_size=32, attack_steps=1, inv_steps=1, val_examples=16, val_attack_steps=1)
    values.update(overrides)
    return load_config(None, values)


def test_builtin_methods_are_registered():
    methods = plugin_manager.attention_methods()
    assert "gradcam" in methods
    assert methods["gradcam"].plugin.startswith("dhat-seg")
    assert methods["gradcam"].kind == "classifier"


def test_every_hookspec_has_a_test():
    tree = ast.parse((ROOT / "dhat_seg" / "hookspecs.py").read_text())
    hooks = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_plugins.py")
    assert hooks and all(h in tests for h in hooks), hooks


def test_third_party_entry_point_is_listed_and_trains(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path / "site", "dhat-seg-centre", EXAMPLE / "dhat_seg_centre.py", "centre")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    result = CliRunner().invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("centre"))
    assert "dhat-seg-centre 0.1.0" in line and "yes" in line
    summary = Trainer(tiny_config(attention="centre"), tmp_path / "run", cache_dir=tmp_path / "cache", progress=False).run()
    assert summary["attention"] == "centre" and 0 <= summary["clean_acc"] <= 100


def test_broken_plugin_warns_and_cli_survives(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path / "site", "dhat-seg-broken", "raise ImportError('boom')\n", "broken")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.warns(UserWarning, match="'broken'.*boom"):
        methods = plugin_manager.attention_methods()
    assert "gradcam" in methods
    result = CliRunner().invoke(app, ["plugins"])
    assert result.exit_code == 0 and "gradcam" in result.output


def test_block_and_allow_environment_variables(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path / "site", "dhat-seg-centre", EXAMPLE / "dhat_seg_centre.py", "centre")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DHAT_SEG_BLOCK_PLUGINS", "centre")
    assert "centre" not in plugin_manager.attention_methods()
    plugin_manager.reset()
    monkeypatch.delenv("DHAT_SEG_BLOCK_PLUGINS")
    monkeypatch.setenv("DHAT_SEG_PLUGINS", "")
    assert "centre" not in plugin_manager.attention_methods()
    plugin_manager.reset()
    monkeypatch.setenv("DHAT_SEG_PLUGINS", "centre")
    assert "centre" in plugin_manager.attention_methods()


def test_duplicate_names_are_reported():
    dup = types.SimpleNamespace(register_attention_methods=hookimpl(
        lambda register: register(AttentionSpec(name="gradcam", description="dup", factory=lambda c: None))))
    with pytest.warns(UserWarning, match="already registered"):
        plugin_manager.register_plugin(dup, "dup")
        plugin_manager.attention_methods()


def _plugin_returning(name: str, make):
    def factory(ctx: AttentionContext):
        return lambda images, labels: make(images)

    return types.SimpleNamespace(register_attention_methods=hookimpl(
        lambda register: register(AttentionSpec(name=name, description="test", factory=factory, kind="image"))))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x: torch.full_like(x[:, :1], float("nan")), "NaN"),
        (lambda x: torch.rand(x.shape[0], 1, 5, 5), "shape"),
        (lambda x: torch.rand_like(x[:, :1]) * 3, "values in"),
    ],
)
def test_invalid_plugin_output_stops_training_naming_it(tmp_path, make, message):
    plugin_manager.register_plugin(_plugin_returning("badattn", make), "badattn")
    with pytest.raises(PluginError, match=message) as info:
        Trainer(tiny_config(attention="badattn"), tmp_path / "run", cache_dir=tmp_path / "cache", progress=False).run()
    assert "badattn" in str(info.value)


def test_unknown_attention_is_a_one_line_cli_error(tmp_path):
    result = CliRunner().invoke(app, ["train", "--attention", "nosuch", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "attention method 'nosuch' is unknown" in result.output
    assert "Traceback" not in result.output
