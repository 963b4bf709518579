"""docs/plugins.md runs as written.

The guide marks its code blocks for this test with an HTML comment on the line before
the fence:

* ``<!-- test: file NAME -->``: the block is the file NAME of the guide's plugin package
  (its ``pyproject.toml`` and module); the test "installs" that package the way pip
  leaves it behind (the module and a dist-info with the entry points of the
  ``pyproject.toml``), so dhat-seg finds it through its entry point;
* ``<!-- test -->``: a Python block, run in order with the others in one namespace (the
  snippets build on each other, as in one Python session).

Every ``python`` block must be marked, and every ``dhat-seg`` command in a ``bash`` block
must name an existing command and existing options. CPU only, no downloads; the
snippets take a few seconds (torch limited to one thread while they run: two threads
on a busy 2-core machine are several times slower).
"""

from __future__ import annotations

import re
import shlex
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dhat_seg import hookspecs
from dhat_seg.attention import plugin_manager
from dhat_seg.cli import app

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*test(?::\s*file\s+(\S+))?\s*-->\s*$")


def blocks(text: str) -> list[dict]:
    """Fenced blocks of the guide: language, code, line number, and their test mark
    (None, "run", or ("file", NAME)) from the comment line before the fence."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if not m:  # closing fences are skipped below, so this is an opening one
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        mark = None
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and (mm := MARK.match(lines[j].strip())):
            mark = ("file", mm.group(1)) if mm.group(1) else "run"
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        code = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
        out.append({"lang": m.group(1), "code": code, "line": i + 1, "mark": mark})
        i = end + 1
    return out


GUIDE_BLOCKS = blocks(GUIDE.read_text())
FILES = {b["mark"][1]: b for b in GUIDE_BLOCKS if isinstance(b["mark"], tuple)}
RUN = [b for b in GUIDE_BLOCKS if b["mark"] == "run"]


def test_every_python_block_is_run_and_the_package_is_complete():
    unmarked = [b["line"] for b in GUIDE_BLOCKS if b["lang"] == "python" and b["mark"] is None]
    assert not unmarked, f"python blocks of docs/plugins.md not marked <!-- test --> at lines {unmarked}"
    assert all(b["lang"] == "python" for b in RUN), "only python blocks can be run"
    assert len(RUN) >= 3
    assert set(FILES) == {"pyproject.toml", "dhat_seg_gradmag.py"}, set(FILES)


def test_pyproject_is_complete_and_names_the_entry_point_group():
    project = tomllib.loads(FILES["pyproject.toml"]["code"])
    assert project["build-system"]["requires"] and project["build-system"]["build-backend"] == "setuptools.build_meta"
    meta = project["project"]
    assert {"name", "version", "dependencies", "entry-points"} <= set(meta)
    assert any(re.match(r"dhat-seg\b", d) for d in meta["dependencies"])
    # the group dhat-seg reads (plugin_manager: importlib.metadata.entry_points(group=...))
    (group,) = meta["entry-points"]
    assert group == hookspecs.PROJECT_NAME == "dhat_seg"
    (value,) = meta["entry-points"][group].values()
    assert f"{value}.py" in FILES and project["tool"]["setuptools"]["py-modules"] == [value]


def install(site: Path) -> str:
    """What ``pip install`` leaves behind for the guide's package; returns its module name."""
    project = tomllib.loads(FILES["pyproject.toml"]["code"])["project"]
    site.mkdir(parents=True)
    for name, block in FILES.items():
        if name.endswith(".py"):
            (site / name).write_text(block["code"])
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    entry_points = "".join(f"{k} = {v}\n" for k, v in project["entry-points"]["dhat_seg"].items())
    (info / "entry_points.txt").write_text(f"[dhat_seg]\n{entry_points}")
    (module,) = project["entry-points"]["dhat_seg"].values()
    return module


@pytest.fixture
def installed(tmp_path, monkeypatch):
    module = install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path)
    plugin_manager.reset()
    yield module
    plugin_manager.reset()
    sys.modules.pop(module, None)


@pytest.mark.timeout(120)
def test_the_guide_runs(installed, capsys):
    methods = plugin_manager.attention_methods()
    assert methods["gradmag"].plugin == "dhat-seg-gradmag 0.1.0"  # found through the entry point
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "plugins_md"}
    start = time.perf_counter()
    try:
        for block in RUN:
            code = compile(block["code"], f"{GUIDE}:{block['line']}", "exec")
            exec(code, namespace)  # noqa: S102 - the guide's own snippets
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "expected values in [0, 1]" in out and "gamma=0.0 is invalid" in out
    print(f"docs/plugins.md: {len(RUN)} snippets in {elapsed:.1f} s")


def _commands(text: str) -> list[list[str]]:
    """``dhat-seg ...`` command lines of the guide's bash blocks (comments dropped)."""
    out = []
    for block in blocks(text):
        if block["lang"] != "bash":
            continue
        for line in block["code"].splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("dhat-seg "):
                out.append(shlex.split(line)[1:])
    return out


def test_the_guide_commands_exist():
    """Every command and option the guide shows exists (checked against --help)."""
    commands = _commands(GUIDE.read_text())
    assert len(commands) >= 8
    runner = CliRunner()
    for args in commands:
        words = [a for a in args if not a.startswith("-")]
        path = words[:2] if words and words[0] == "masks" else words[:1]
        result = runner.invoke(app, path + ["--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (args, result.output)
        for option in (a.split("=", 1)[0] for a in args if a.startswith("--")):
            assert option in result.output, f"`dhat-seg {' '.join(args)}`: {option} is not an option of {path}"
