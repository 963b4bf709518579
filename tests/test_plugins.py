"""The plugin contract: discovery through entry points, isolation of broken plugins,
the allow/block environment variables, validation of results, ``dhat-seg plugins``."""

import ast
import logging
import shutil
import types
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dhat_seg import hookimpl
from dhat_seg.attention import AttentionContext, AttentionSpec, plugin_manager
from dhat_seg.cli import app
from dhat_seg.config import load_config
from dhat_seg.errors import PluginError, UserError
from dhat_seg.run.experiment import Experiment

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


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()}: {record.getMessage()}")


@pytest.fixture
def plugin_log():
    """What the plugin manager reports on its logger, as the printed lines (``warning: ...``)."""
    handler = _Lines()
    plugin_manager.logger.addHandler(handler)
    yield handler.lines
    plugin_manager.logger.removeHandler(handler)


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
    summary = Experiment(tiny_config(attention="centre"), tmp_path / "run", cache_dir=tmp_path / "cache", progress=False).run()
    assert summary["attention"] == "centre" and 0 <= summary["clean_acc"] <= 100


BROKEN_LINE = ("warning: attention plugin 'broken' (entry point broken = dhat_seg_broken, dhat-seg-broken 0.1.0) "
               "failed to load: ImportError: boom")


def test_broken_plugin_warns_and_cli_survives(tmp_path, monkeypatch, plugin_log):
    install_fake_distribution(tmp_path / "site", "dhat-seg-broken", "raise ImportError('boom')\n", "broken")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    methods = plugin_manager.attention_methods()
    assert plugin_log == [BROKEN_LINE]
    assert "gradcam" in methods
    result = CliRunner().invoke(app, ["plugins"])
    assert result.exit_code == 0 and "gradcam" in result.output


def test_load_failure_is_one_line_once_per_process(tmp_path, monkeypatch, capsys):
    """Reported through logging, not warnings.warn: one line without a source line,
    once however often the method table is rebuilt or looked up. Without any handler
    above the plugin logger (no CLI, no logging configuration), its fallback prints it."""
    install_fake_distribution(tmp_path / "site", "dhat-seg-broken", "raise ImportError('boom')\n", "broken")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(plugin_manager.logger, "propagate", False)  # as if nothing above had a handler
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugin_manager.attention_methods()
        plugin_manager.attention_methods.cache_clear()  # as after register_plugin
        plugin_manager.attention_methods()
        plugin_manager.get_attention_spec("gradcam")
    assert not [w for w in caught if "broken" in str(w.message)]
    err = capsys.readouterr().err
    assert err.splitlines() == [BROKEN_LINE], err


@pytest.mark.parametrize("command", [["train", "--attention", "broken"], ["masks", "build", "--attention", "broken"],
                                     ["masks", "info", "--attention", "broken"], ["plugins"]])
def test_every_command_reports_a_load_failure_in_the_same_form(tmp_path, monkeypatch, command):
    install_fake_distribution(tmp_path / "site", "dhat-seg-broken", "raise ImportError('boom')\n", "broken")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    if command[0] == "train":
        command = command + ["--out", str(tmp_path / "run")]
    if command[0] == "masks":
        command = command + ["--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, command)
    lines = result.output.splitlines()
    assert lines.count(BROKEN_LINE) == 1, result.output
    assert "warnings.warn" not in result.output and "UserWarning" not in result.output
    assert "Traceback" not in result.output
    if command[0] != "plugins":  # --attention broken: says it failed to load and why, not "unknown"
        assert result.exit_code == 2, result.output
        assert ("error: attention method 'broken' is unavailable: attention plugin 'broken' (entry point broken = "
                "dhat_seg_broken, dhat-seg-broken 0.1.0) failed to load: ImportError: boom") in lines, result.output
        assert "unknown" not in result.output
    else:
        assert result.exit_code == 0 and "gradcam" in result.output


def test_a_method_of_a_failed_or_blocked_plugin_says_why(tmp_path, monkeypatch, plugin_log):
    """Failed to load, failed to register, blocked: the error says which and why; an
    unknown name also lists the plugins that failed to load (one may provide it)."""
    install_fake_distribution(tmp_path / "site", "dhat-seg-broken", "import no_such_module_xyz\n", "broken")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DHAT_SEG_BLOCK_PLUGINS", "solo")

    def fails(register):
        raise RuntimeError("no weights")

    plugin_manager.register_plugin(types.SimpleNamespace(register_attention_methods=hookimpl(fails)), "flaky")
    with pytest.raises(UserError, match=r"^attention method 'broken' is unavailable: attention plugin 'broken' \(entry "
                                        r"point broken = dhat_seg_broken, dhat-seg-broken 0.1.0\) failed to load: "
                                        r"ModuleNotFoundError: No module named 'no_such_module_xyz'$"):
        plugin_manager.get_attention_spec("broken")
    with pytest.raises(UserError, match=r"^attention method 'flaky' is unavailable: attention plugin 'flaky' \(flaky "
                                        r"\(registered in-process\)\) failed to register its attention methods: "
                                        r"RuntimeError: no weights$"):
        plugin_manager.get_attention_spec("flaky")
    with pytest.raises(UserError, match=r"^attention method 'solo' is unavailable: attention plugin 'solo' \(built-in\) "
                                        r"is not loaded: DHAT_SEG_BLOCK_PLUGINS names it$"):
        plugin_manager.get_attention_spec("solo")
    with pytest.raises(UserError, match=r"'nosuch' is unknown; installed methods: .*gradcam.*; plugins that failed to "
                                        r"load: broken, flaky \(see"):
        plugin_manager.get_attention_spec("nosuch")
    assert len(plugin_log) == 2, plugin_log  # broken and flaky, once each; a blocked plugin is not a warning


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


def test_duplicate_names_are_reported(plugin_log):
    """A taken name: a warning naming both plugins; the first registration keeps the
    name, the second is dropped, and the plugin's other methods still register."""

    def register_both(register):
        register(AttentionSpec(name="gradcam", description="dup", factory=lambda c: None))
        register(_spec("dup-own"))

    dup = types.SimpleNamespace(register_attention_methods=hookimpl(register_both))
    plugin_manager.register_plugin(dup, "dup")
    methods = plugin_manager.attention_methods()
    (message,) = [m for m in plugin_log if "already registered" in m]
    assert "'dup'" in message and "'gradcam'" in message and "built-in" in message
    assert methods["gradcam"].description != "dup" and methods["gradcam"].plugin.endswith("(built-in)")
    assert methods["dup-own"].plugin == "dup (registered in-process)"


def test_hooks_are_called_through_pluggy_markers_and_order(plugin_log):
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
    methods = plugin_manager.attention_methods()
    assert any("'twin' from plugin 'second' is ignored: it is already registered by plugin 'first'" in m
               for m in plugin_log)
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


def test_misspelt_hook_is_reported_and_the_plugin_skipped(tmp_path, monkeypatch, plugin_log):
    install_fake_distribution(tmp_path / "site", "dhat-seg-typo", MISSPELT, "typo")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    methods = plugin_manager.attention_methods()
    (message,) = plugin_log
    assert message.startswith("warning: attention plugin 'typo' (entry point typo = dhat_seg_typo, dhat-seg-typo 0.1.0) "
                              "failed to load: unknown hook 'register_attenton_methods'"), message
    assert "typo-method" not in methods and "gradcam" in methods
    # in-process registration: the same check, as an error, and nothing is left registered
    plugin = types.SimpleNamespace(register_attention_methods=hookimpl(lambda register: register(_spec("inproc"))),
                                   register_attention_method=hookimpl(lambda register: None))
    with pytest.raises(PluginError, match="unknown hook 'register_attention_method'"):
        plugin_manager.register_plugin(plugin, "inproc")
    assert "inproc" not in plugin_manager.attention_methods()


def test_entry_points_cannot_shadow_builtins(monkeypatch, plugin_log):
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
    methods = plugin_manager.attention_methods()
    messages = plugin_log
    assert any("'sam' (entry point sam = fake_sam)" in m and "built-in" in m and "skipped" in m for m in messages), messages
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
        Experiment(tiny_config(attention="badattn"), tmp_path / "run", cache_dir=tmp_path / "cache", progress=False).run()
    assert "badattn" in str(info.value)


def test_unknown_attention_is_a_one_line_cli_error(tmp_path):
    result = CliRunner().invoke(app, ["train", "--attention", "nosuch", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "attention method 'nosuch' is unknown" in result.output
    assert "Traceback" not in result.output
