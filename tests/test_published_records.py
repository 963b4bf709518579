"""The run records committed in results/ regenerate the published tables of docs/tables/
byte for byte: each study's command with --report-only, run on a copy of its records
(summary.json, eval.json, metrics.jsonl and config.yaml of every run; no checkpoints)."""

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dhat_seg.cli import app

ROOT = Path(__file__).resolve().parents[1]
RESULTS, TABLES = ROOT / "results", ROOT / "docs" / "tables"

ABLATION_ROWS = "-,gradcam,ig,u2net,oracle,oracle[dilate=1],oracle[dilate=2],oracle[dilate=4]"
METHODS = ("standard,at,trades,mart,awp,trades-awp,uiat,dhat,dhat[attention=u2net],dhat[attention=oracle],dhat-awp,"
           "dhat-trades,dhat-mart,sglr,cfa,dhat-cfa,fsr,fsr-trades,fsr-mart,part,part-t,part-m,again,again-code")

#: each study whose records are in results/<name>/: its command as docs/results.md gives it
COMMANDS = {
    "compare-synthetic": ["compare", "--preset", "quick", "--methods", METHODS, "--seeds", "0,1,2"],
    "table10-synthetic": ["ablate", "--preset", "quick", "--attention", ABLATION_ROWS, "--seeds", "0,1,2,3,4"],
    "table10-digits": ["ablate", "--preset", "quick", "--attention", ABLATION_ROWS, "--set", "data=digits",
                       "--seeds", "0,1,2"],
}
RUN_FILES = {"summary.json", "eval.json", "metrics.jsonl", "config.yaml"}
RECORD_FILES = RUN_FILES | {".gitignore", "README.md"}
STUDIES = sorted(p.name for p in RESULTS.iterdir() if p.is_dir()) if RESULTS.is_dir() else []


def test_every_record_folder_has_its_command_and_its_table():
    assert set(STUDIES) <= set(COMMANDS), f"results/ folders without a command in this test: {set(STUDIES) - set(COMMANDS)}"
    for name in STUDIES:
        assert list((TABLES / name).glob("*.json")), f"results/{name} has no published table in docs/tables/{name}"


def test_results_track_complete_run_records_only():
    """Checkpoints, logs and tables stay out of results/ (its .gitignore): only what
    --report-only reads is tracked."""
    listed = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = [Path(f) for f in listed.stdout.split()]
    other = [f.as_posix() for f in files if f.name not in RECORD_FILES]
    assert not other, f"tracked in results/ besides the run records: {other}"
    runs: dict[Path, set[str]] = {}
    for f in files:
        if f.name in RUN_FILES:
            runs.setdefault(f.parent, set()).add(f.name)
    partial = {d.as_posix(): sorted(RUN_FILES - names) for d, names in runs.items() if names != RUN_FILES}
    assert not partial, f"run records without all four files (only finished runs belong here): {partial}"


@pytest.mark.parametrize("name", STUDIES)
def test_report_only_regenerates_the_published_table(name, tmp_path, monkeypatch):
    records = tmp_path / "results" / name
    shutil.copytree(RESULTS / name, records, ignore=lambda folder, names: [
        n for n in names if (Path(folder) / n).is_file() and n not in RECORD_FILES])  # the records alone
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*COMMANDS[name], "--out", f"results/{name}", "--cache-dir", "runs/table10-cache",
                                      "--report-only"])
    assert result.exit_code == 0, result.output
    published = sorted((TABLES / name).glob("*.*"))
    assert {p.suffix for p in published} >= {".md", ".json", ".csv"}
    for table in published:
        if table.suffix == ".png":
            continue  # the figure's bytes depend on the matplotlib version; its data is the json's
        assert (records / table.name).read_bytes() == table.read_bytes(), f"{table.relative_to(ROOT)} differs"
