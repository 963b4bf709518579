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


def _spec(name: str) -> AttentionSpec:
    return AttentionSpec(name=name, description=name, factory=lambda c: None, kind="image")


def test_duplicate_names_are_reported():
    """A taken name: a warning naming both plugins; the first registration keeps the
    name, the second is dropped, and the plugin's other methods still register."""

    def register_both(register):
        register(AttentionSpec(name="gradcam", description="dup", factory=lambda c: None))
        register(_spec("dup-own"))

    dup = types.SimpleNamespace(register_attention_methods=hookimpl(register_both))
    with pytest.warns(UserWarning, match="already registered") as record:
        plugin_manager.register_plugin(dup, "dup")
        methods = plugin_manager.attention_methods()
    (message,) = [str(w.message) for w in record if "already registered" in str(w.message)]
    assert "'dup'" in message and "'gradcam'" in message and "built-in" in message
    assert methods["gradcam"].description != "dup" and methods["gradcam"].plugin.endswith("(built-in)")
    assert methods["dup-own"].plugin == "dup (registered in-process)"


def test_hooks_are_called_through_pluggy_markers_and_order():
    """Implementations are pluggy's: a ``specname`` alias is called, an undecorated
    function of the hook's name is not, and ``tryfirst`` decides between two plugins
    registering the same name (without it, the later registered is called first)."""
    aliased = types.SimpleNamespace(anything=hookimpl(specname="register_attention_methods")(
        lambda register: register(_spec("aliased"))))
    undecorated = types.SimpleNamespace(register_attention_methods=lambda register: register(_spec("undecorated")))
    first = types.SimpleNamespace(register_attention_methods=hookimpl(tryfirst=True)(
        lambda register: register(AttentionSpec(name="twin", description="first", factory=lambda c: None))))
    second = types.SimpleNamespace(register_attention_methods=hookimpl(
        lambda register: register(AttentionSpec(name="twin", description="second", factory=lambda c: None))))
    for name, plugin in [("aliased", aliased), ("undecorated", undecorated), ("first", first), ("second", second)]:
        plugin_manager.register_plugin(plugin, name, label=f"{name} 1.0")
    with pytest.warns(UserWarning, match="'twin' from plugin 'second' .*already registered by plugin 'first'"):
        methods = plugin_manager.attention_methods()
    assert methods["aliased"].plugin == "aliased 1.0" and "undecorated" not in methods
    assert methods["twin"].description == "first"


MISSPELT = """
from dhat_seg import hookimpl
from dhat_seg.attention import AttentionSpec

@hookimpl
def register_attention_methods(register):
    register(AttentionSpec(name="typo-method", description="t", factory=lambda c: None, kind="image"))

@hookimpl
def register_attenton_methods(register):
    pass
"""


def test_misspelt_hook_is_reported_and_the_plugin_skipped(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path / "site", "dhat-seg-typo", MISSPELT, "typo")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.warns(UserWarning, match=r"'typo' \(dhat_seg_typo\) failed to load and is skipped: unknown hook "
                                         r"'register_attenton_methods'") as record:
        methods = plugin_manager.attention_methods()
    assert "typo-method" not in methods and "gradcam" in methods
    assert all("\n" not in str(w.message) for w in record)
    # in-process registration: the same check, as an error, and nothing is left registered
    plugin = types.SimpleNamespace(register_attention_methods=hookimpl(lambda register: register(_spec("inproc"))),
                                   register_attention_method=hookimpl(lambda register: None))
    with pytest.raises(PluginError, match="unknown hook 'register_attention_method'"):
        plugin_manager.register_plugin(plugin, "inproc")
    assert "inproc" not in plugin_manager.attention_methods()


def test_entry_points_cannot_shadow_builtins(monkeypatch):
    """An entry point named like a built-in plugin is skipped with a warning; one that
    registers a built-in's method name is warned about and the built-in keeps the name,
    even when the entry point's hook is marked tryfirst."""
    mycam = types.SimpleNamespace(register_attention_methods=hookimpl(tryfirst=True)(
        lambda register: [register(AttentionSpec(name="gradcam", description="mine", factory=lambda c: None)),
                          register(_spec("mycam-extra"))]))
    fake = {"sam": types.SimpleNamespace(register_attention_methods=hookimpl(lambda register: register(_spec("fake-sam")))),
            "mycam": mycam}
    eps = [types.SimpleNamespace(name=n, value=f"fake_{n}", load=lambda n=n: fake[n], dist=None) for n in fake]
    monkeypatch.setattr(plugin_manager.importlib.metadata, "entry_points", lambda group: eps if group == "dhat_seg" else [])
    with pytest.warns(UserWarning) as record:
        methods = plugin_manager.attention_methods()
    messages = [str(w.message) for w in record]
    assert any("'sam' (fake_sam)" in m and "built-in" in m and "skipped" in m for m in messages), messages
    assert any("'gradcam' from plugin 'mycam'" in m and "built-in" in m for m in messages), messages
    assert "fake-sam" not in methods and methods["mycam-extra"].plugin == "?"
    assert methods["gradcam"].plugin.endswith("(built-in)") and methods["gradcam"].description != "mine"
    if "sam" in plugin_manager.BUILTIN_PLUGINS and plugin_manager.get_plugin_manager().get_plugin("sam") is not None:
        assert methods["sam"].plugin.endswith("(built-in)")


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
