"""The layout rules of docs/architecture.md: no import cycles, modules of a readable size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: one model definition each (network code ported from the reference implementations)
MODEL_DEFINITIONS = {"plugins/solo_net.py", "plugins/u2net_net.py"}
MAX_LINES = 450


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles():
    g = _import_graph()
    graph = g.edges(g.modules())
    assert "dhat_seg.run.experiment" in graph and "dhat_seg.run.trainer" in graph["dhat_seg.run.experiment"]
    assert g.cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    g = _import_graph()
    assert g.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_do_not_call_up():
    """The trainer, the cache and the attention model never import the orchestration or the CLI."""
    g = _import_graph()
    graph = g.edges(g.modules())
    upper = ("dhat_seg.run.experiment", "dhat_seg.cli", "dhat_seg.studies", "dhat_seg.evaluation.report")
    for low in ("dhat_seg.run.trainer", "dhat_seg.attention.model", "dhat_seg.cache.provision", "dhat_seg.cache.build",
                "dhat_seg.training_methods", "dhat_seg.evaluation.sanity"):
        up = {m for m in graph[low] if any(m == u or m.startswith(u + ".") for u in upper)}
        assert not up, (low, up)


#: Package ``__init__`` modules that import nothing (or only the base): importing
#: ``dhat_seg.run.trainer`` runs ``dhat_seg/run/__init__.py`` too, so they are at the bottom.
INITS = {"dhat_seg": "base", "dhat_seg.run": "base", "dhat_seg.evaluation": "base", "dhat_seg.studies": "base"}
#: The layers of docs/architecture.md as units of modules: a package, a module or a module
#: prefix (a module's unit is that of its longest prefix here, after INITS) ...
UNITS = {
    "dhat_seg.errors": "base", "dhat_seg.hookspecs": "base", "dhat_seg.config_types": "base",
    "dhat_seg.epoch_table": "base",
    "dhat_seg.models": "models",
    "dhat_seg.attacks": "attacks", "dhat_seg.losses": "attacks",
    "dhat_seg.data": "data",
    "dhat_seg.attention": "attention types",
    "dhat_seg.attention.plugin_manager": "plugin manager",
    "dhat_seg.training_methods": "training methods",
    "dhat_seg.config": "config", "dhat_seg.method_options": "config", "dhat_seg.method_defaults": "config",
    "dhat_seg.presets": "config", "dhat_seg.paper_settings": "config",
    "dhat_seg.run.checkpoint": "run services", "dhat_seg.run.devices": "run services",
    "dhat_seg.run.determinism": "run services", "dhat_seg.run.stopping": "run services", "dhat_seg.run.locks": "run services",
    "dhat_seg.attention.model": "attention model",
    "dhat_seg.cache": "cache",
    "dhat_seg.plugins": "plugins",
    "dhat_seg.evaluation.evaluate": "measures", "dhat_seg.evaluation.autoattack": "measures",
    "dhat_seg.evaluation.binomial": "statistics", "dhat_seg.evaluation.convergence": "statistics",
    "dhat_seg.run": "run",
    "dhat_seg.evaluation": "evaluation",
    "dhat_seg.reporting": "reporting",
    "dhat_seg.studies": "studies",
    "dhat_seg.cli": "cli", "dhat_seg.__main__": "cli",
}
_BELOW_CONFIG = {"base", "models", "attacks", "data", "attention types", "plugin manager", "training methods"}
_BELOW_RUN = _BELOW_CONFIG | {"config", "run services", "attention model", "cache", "measures", "statistics"}
#: ... and which unit may import which (a unit may always import itself). Only imports
#: downwards: nothing imports the CLI, the studies import everything else, the run is below
#: the evaluation (the trainer's validation uses the evaluation's measures, which import no
#: run), the attention model, the cache and the plugins are below the run (they use the run
#: services: checkpoints, stopping, locks, devices). The config checks its values against
#: the registries below it (models, data, attention, training methods).
MAY_IMPORT = {
    "base": set(),
    "models": {"base"},
    "attacks": {"base", "models"},
    "data": {"base"},
    "attention types": {"base"},
    "plugin manager": {"base", "attention types"},
    "training methods": {"base", "models", "attacks"},
    "config": _BELOW_CONFIG,
    "run services": {"base", "models"},
    "attention model": {"base", "models", "attention types", "plugin manager", "config", "run services"},
    "cache": {"base", "models", "data", "attention types", "attention model", "run services"},
    "plugins": {"base", "models", "data", "attention types", "cache"},
    "measures": {"base", "attacks", "attention types"},
    "statistics": set(),
    "run": _BELOW_RUN,
    "evaluation": _BELOW_RUN | {"run"},
    "reporting": {"base"},
    "studies": _BELOW_RUN | {"run", "evaluation", "reporting", "plugins"},
    "cli": set(),  # filled in below: everything
}
MAY_IMPORT["cli"] = set(MAY_IMPORT)


def unit_of(module: str) -> str | None:
    """The unit of ``module``: INITS, else that of its longest prefix in UNITS."""
    if module in INITS:
        return INITS[module]
    name = module
    while name:
        if name in UNITS:
            return UNITS[name]
        name = name.rpartition(".")[0]
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module that its unit may not import: ``a -> b (unit -> unit)``."""
    bad = []
    for module in sorted(graph):
        for target in sorted(graph[module]):
            src, dst = unit_of(module), unit_of(target)
            if src != dst and dst not in MAY_IMPORT[src]:
                bad.append(f"{module} -> {target} ({src} -> {dst})")
    return bad


def test_every_module_has_a_layer():
    g = _import_graph()
    assert set(MAY_IMPORT) == set(UNITS.values()) | set(INITS.values())
    assert [m for m in g.modules() if unit_of(m) is None] == []


def test_imports_go_only_downwards():
    g = _import_graph()
    assert upward_imports(g.edges(g.modules())) == []


def test_an_upward_import_is_refused():
    """The rule tells: an import up the layers, or of the CLI, fails the test."""
    assert upward_imports({"dhat_seg.run.trainer": {"dhat_seg.evaluation.report"}}) == [
        "dhat_seg.run.trainer -> dhat_seg.evaluation.report (run -> evaluation)"]
    assert upward_imports({"dhat_seg.training_methods.awp": {"dhat_seg.run.experiment"}})
    assert upward_imports({"dhat_seg.studies.run": {"dhat_seg.cli.common"}})
    assert upward_imports({"dhat_seg.models": {"dhat_seg.training_methods"}})
    assert upward_imports({"dhat_seg.cache.build": {"dhat_seg.run.trainer"}})
    assert upward_imports({"dhat_seg.evaluation": {"dhat_seg.evaluation.report"}})  # a package __init__ stays empty
    assert upward_imports({"dhat_seg.run.trainer": {"dhat_seg.evaluation.evaluate", "dhat_seg.run.stopping"}}) == []
    assert upward_imports({"dhat_seg.cli.train": {"dhat_seg.studies.ablate"}}) == []


def test_modules_are_of_a_readable_size():
    too_long = []
    for path in sorted([*(ROOT / "dhat_seg").rglob("*.py"), *(ROOT / "plugins").glob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("dhat_seg/plugins/") or rel in MODEL_DEFINITIONS:
            continue
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            too_long.append(f"{rel}: {n} lines")
    assert not too_long, too_long


def test_every_package_is_in_the_wheel():
    """pyproject lists packages by hand (setuptools' find cannot name plugins/ dhat_seg.plugins):
    every package folder must be in the list, and only those (and dhat_seg.plugins)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dhat_seg").rglob("__init__.py")}
    assert found - listed == set()
    assert listed - found == {"dhat_seg.plugins"}
    assert (ROOT / "dhat_seg" / "py.typed").is_file()  # declared as package data
