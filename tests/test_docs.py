"""The README is the essentials; the rest is the MkDocs site under docs/ (mkdocs.yml).

``.ci/run`` builds the site with ``mkdocs build --strict`` in a venv of its own; these
tests check what can be checked without mkdocs: the README's size and its two quick-start
commands, the nav against the pages, links, and that docs/architecture.md names only
modules that exist and every module that does.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

#: the README's "Quick start (two commands)": CI and users rely on them verbatim
MAIN_JOB = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/dhat-seg train"
TESTS = 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest -q'
#: the line of .ci/run that runs the tests: the README's command with a quiet pip
CI_TESTS = 'python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]" && .venv/bin/python -m pytest -q'

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def _nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        else:
            for value in item.values():
                out.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return out


def _mkdocs() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200: the rest belongs in docs/)"
    long = [(i, len(line)) for i, line in enumerate(lines, 1) if len(line) > 120]
    assert not long, f"README.md lines over 120 characters (line, length): {long}"


def test_quick_start_commands_are_verbatim():
    text = README.read_text()
    quick = text[text.index("## Quick start (two commands)"):]
    quick = quick[:quick.index("\n## ", 1)]
    assert MAIN_JOB in quick.splitlines() and TESTS in quick.splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert CI_TESTS in ci, ".ci/run must run the README's test command"
    assert CI_TESTS.replace("install -q -e", "install -e") == TESTS
    assert ci.index(CI_TESTS) < next(i for i, line in enumerate(ci) if "mkdocs build --strict" in line)


def test_nav_lists_every_page_and_only_pages_that_exist():
    config = _mkdocs()
    assert config["docs_dir"] == "docs" and config["theme"]["name"] == "material"
    pages = _nav_pages(config["nav"])
    assert len(pages) == len(set(pages)), "a page is listed twice in the nav"
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"in mkdocs.yml's nav but not in docs/: {missing}"
    on_disk = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    unlisted = sorted(set(on_disk) - set(pages))
    assert not unlisted, f"pages in docs/ missing from mkdocs.yml's nav: {unlisted}"


def test_links_resolve():
    """Relative links of the README and the pages point at files that exist; the pages link
    only inside docs/ (mkdocs --strict refuses links out of docs_dir)."""
    broken = []
    for path in [README, *sorted(DOCS.rglob("*.md"))]:
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = (path.parent / target.split("#", 1)[0]).resolve()
            inside = path == README or file.is_relative_to(DOCS.resolve())
            if not (file.exists() and inside):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


def _named_paths(text: str) -> set[str]:
    """Code spans that are repository paths: `dhat_seg/run/trainer.py`, `dhat_seg/cache/`."""
    return {s for s in CODE_SPAN.findall(text) if re.fullmatch(r"[\w.-]+(/[\w.-]+)*(\.py|/)", s) and "/" in s}


def test_architecture_names_only_modules_that_exist():
    named = _named_paths((DOCS / "architecture.md").read_text())
    assert len(named) >= 40, sorted(named)
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_architecture_names_every_module():
    """Every module of dhat_seg/ and every package is in the map (a package's files are
    listed in its row, by file name)."""
    text = (DOCS / "architecture.md").read_text()
    named = _named_paths(text)
    modules = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "dhat_seg").glob("*.py"))]
    packages = [p.parent.relative_to(ROOT).as_posix() + "/" for p in sorted((ROOT / "dhat_seg").glob("*/__init__.py"))]
    absent = [m for m in modules + packages if m not in named]
    assert not absent, f"not described in docs/architecture.md: {absent}"
    spans = set(CODE_SPAN.findall(text))
    files = [p for p in sorted([*(ROOT / "dhat_seg").glob("*/*.py"), *(ROOT / "plugins").glob("*.py")])
             if p.name not in ("__init__.py", "__main__.py")]
    unnamed = [p.relative_to(ROOT).as_posix() for p in files if p.name not in spans]
    assert not unnamed, f"files of a package not named in docs/architecture.md: {unnamed}"


def test_published_study_tables_are_each_one_report():
    """docs/tables/<study>/ holds one --report-only output copied whole: the markdown's table
    is the JSON's, the CSV has the JSON's rows, and every row's seeds are the study's."""
    import csv
    import json

    folders = sorted(p.parent for p in DOCS.glob("tables/*/*.json"))
    assert folders, "no study table in docs/tables/"
    for folder in folders:
        (data_file,) = folder.glob("*.json")
        stem = data_file.stem
        data = json.loads(data_file.read_text())
        assert data["seconds"] is None, f"{data_file}: not a --report-only output (it has a wall time)"
        assert data["table_markdown"] in (folder / f"{stem}.md").read_text(), f"{folder}: the .md is not the .json's"
        with open(folder / f"{stem}.csv") as fh:
            assert [r["row"] for r in csv.DictReader(fh)] == [r["row"] for r in data["rows"]], folder
        assert (folder / f"{stem}.png").is_file(), folder
        for row in data["rows"]:
            assert [p["seed"] for p in row["per_seed"]] == data["seeds"], (folder, row["row"])
