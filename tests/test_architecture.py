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
    assert "dhat_seg.experiment" in graph and "dhat_seg.trainer" in graph["dhat_seg.experiment"]
    assert g.cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    g = _import_graph()
    assert g.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_do_not_call_up():
    """The trainer, the cache and the attention model never import the orchestration or the CLI."""
    g = _import_graph()
    graph = g.edges(g.modules())
    upper = {"dhat_seg.experiment", "dhat_seg.cli", "dhat_seg.ablate", "dhat_seg.compare", "dhat_seg.evaluation_report"}
    for low in ("dhat_seg.trainer", "dhat_seg.attention_model", "dhat_seg.cache.provision", "dhat_seg.cache.build",
                "dhat_seg.training_methods", "dhat_seg.sanity"):
        assert not graph[low] & upper, (low, graph[low] & upper)


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
    """pyproject lists packages by hand: every package folder must be in the list."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dhat_seg").rglob("__init__.py")}
    assert found - listed == set()
    assert (ROOT / "dhat_seg" / "py.typed").is_file()  # declared as package data
