"""dhat_seg.reporting on fake run directories (no training)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dhat_seg.errors import UserError
from dhat_seg.reporting import (EpochTable, RunRecord, compare_text, format_value, load_run, plot_runs,
                                report)

DHAT_RECORDS = [
    {"epoch": 1, "lr": 0.01, "train_loss": 2.345678, "train_ce_adv": 2.1, "train_dhlr": 0.2, "train_floe": 0.045678,
     "train_fg_frac": 0.41, "train_max_logit_clean": 8.5, "train_max_logit_background": 3.25,
     "val_clean_acc": 40.0, "val_robust_acc": 20.5, "best": True, "seconds": 50.04},
    {"epoch": 2, "lr": 0.005000000000000001, "train_loss": 1.23456, "train_ce_adv": 0.9, "train_dhlr": 0.1,
     "train_floe": 0.05, "train_fg_frac": 0.4, "train_max_logit_clean": 12.3456, "train_max_logit_background": 4.5,
     "val_clean_acc": 61.3333, "val_robust_acc": 40.0, "best": True, "seconds": 55.21},
    {"epoch": 3, "lr": 1e-05, "train_loss": 1.1, "train_ce_adv": 0.85, "train_dhlr": 0.12, "train_floe": 0.04,
     "train_fg_frac": 0.4, "train_max_logit_clean": 15.0, "train_max_logit_background": 5.0,
     "val_clean_acc": 60.0, "val_robust_acc": 38.0, "best": False, "seconds": 54.9, "train_new_term": 7.0},
]

STANDARD_RECORDS = [
    {"epoch": e, "lr": 0.1, "train_ce": 1.5 / e, "train_loss": 1.5 / e, "train_max_logit_clean": 5.0 * e,
     "val_clean_acc": 50.0 + e, "val_robust_acc": None, "best": True, "seconds": 10.0}
    for e in (1, 2)
]


def make_run(root: Path, name: str, config: dict, records: list[dict], summary: dict | None = None) -> Path:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return run


@pytest.fixture
def dhat_run(tmp_path: Path) -> Path:
    config = {"method": "dhat", "attention": "gradcam", "model": "resnet18", "data": "synthetic", "epochs": 3, "seed": 7}
    summary = {"method": "dhat", "attention": "gradcam", "model": "resnet18", "data": "synthetic", "epochs": 3,
               "seed": 7, "best_epoch": 2, "clean_acc": 58.75, "pgd10_acc": 37.25, "n_test": 800}
    return make_run(tmp_path, "dhat-run", config, DHAT_RECORDS, summary)


@pytest.fixture
def standard_run(tmp_path: Path) -> Path:
    # unfinished: no summary.json, 2 of 5 epochs; attention is the unused default
    config = {"method": "standard", "attention": "gradcam", "model": "preact_resnet18", "data": "synthetic",
              "epochs": 5, "seed": 0}
    return make_run(tmp_path, "std-run", config, STANDARD_RECORDS)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("key, value, text", [
    ("lr", 0.005000000000000001, "0.005"),
    ("lr", 1e-05, "1e-05"),
    ("lr", 0.1, "0.1"),
    ("train_loss", 1.23456, "1.2346"),
    ("val_clean_acc", 61.3333, "61.33"),
    ("val_robust_acc", None, "-"),
    ("seconds", 55.21, "55.2"),
    ("train_max_logit_clean", 12.3456, "12.35"),
    ("epoch", 3, "3"),
    ("best", True, "*"),
    ("best", False, ""),
])
def test_format_value(key, value, text):
    assert format_value(key, value) == text


# ----------------------------------------------------------------------------- epoch table


def _table_lines(records, columns=None) -> tuple[EpochTable, list[str]]:
    table = EpochTable(columns)
    lines = table.header(records[0]).split("\n") + [table.row(r) for r in records]
    return table, lines


def test_table_rows_align_with_header():
    table, lines = _table_lines(DHAT_RECORDS)
    assert len(lines) == 2 + len(DHAT_RECORDS)
    assert len({len(l) for l in lines}) == 1, lines
    header, rule = lines[0], lines[1]
    assert set(rule) <= {"-", " "}
    # every column ends at the same character in every line (right-aligned)
    names = header.split()
    header_ends = [m.end() for m in re.finditer(r"\S+", header)]
    assert names[:6] == ["ep", "lr", "loss", "ce_adv", "dhlr", "floe"]
    for name in ("val_clean", "val_rob", "max|z|", "max|z_bg|", "best", "s"):
        assert name in names
    ends = header_ends
    rule_ends = [i + 1 for i, (a, b) in enumerate(zip(rule, rule[1:] + " ")) if a == "-" and b == " "]
    assert ends == rule_ends
    for line in lines[2:]:
        token_ends = [m.end() for m in re.finditer(r"\S+", line)]
        assert set(token_ends) <= set(ends), line  # every value is right-aligned under its header


def test_table_values_rounding_and_best_marker():
    table, lines = _table_lines(DHAT_RECORDS)
    cells = [l.split() for l in lines[2:]]
    names = lines[0].split()
    row2 = dict(zip(names, cells[1]))
    assert row2["lr"] == "0.005"
    assert row2["loss"] == "1.2346"
    assert row2["val_clean"] == "61.33"
    assert row2["max|z|"] == "12.35"
    assert row2["s"] == "55.2"
    assert row2["best"] == "*"
    assert dict(zip(names, cells[2]))["lr"] == "1e-05"
    # epoch 3 is not best: its row has one cell fewer (the empty marker)
    assert len(cells[2]) == len(names) - 1 and "*" not in cells[2]


def test_table_none_is_dash_and_standard_columns():
    table, lines = _table_lines(STANDARD_RECORDS)
    names = lines[0].split()
    assert names == ["ep", "lr", "loss", "ce", "val_clean", "val_rob", "max|z|", "best", "s"]
    row = dict(zip(names, lines[2].split()))
    assert row["val_rob"] == "-"
    assert len({len(l) for l in lines}) == 1


def test_table_ignores_key_added_later():
    table, lines = _table_lines(DHAT_RECORDS)
    assert "new_term" not in lines[0]
    assert "7.0000" not in lines[-1]
    assert len(lines[-1]) == len(lines[0])


def test_table_explicit_columns_and_render():
    table = EpochTable(["epoch", "val_robust_acc"])
    text = table.render(STANDARD_RECORDS)
    assert text.split("\n")[0].split() == ["ep", "val_rob"]
    assert text.split("\n")[2].split() == ["1", "-"]
    with pytest.raises(ValueError):
        EpochTable().header()


def test_table_huge_value_keeps_alignment():
    records = [dict(DHAT_RECORDS[0], train_loss=123456789.0, train_max_logit_clean=3.5e12)]
    _, lines = _table_lines(records)
    assert len({len(l) for l in lines}) == 1, lines


# ----------------------------------------------------------------------------- loading


def test_load_run(dhat_run: Path, standard_run: Path):
    run = load_run(dhat_run)
    assert isinstance(run, RunRecord)
    assert run.name == "dhat-run"
    assert run.config["seed"] == 7
    assert len(run.metrics) == 3 and run.metrics[1]["lr"] == 0.005000000000000001
    assert run.summary is not None and run.summary["n_test"] == 800
    assert load_run(str(standard_run)).summary is None


def test_load_run_missing_dir(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_load_run_no_metrics(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as info:
        load_run(tmp_path / "empty")
    message = str(info.value)
    assert "is not a training run directory (no metrics.jsonl)" in message
    assert "expected a folder written by dhat-seg train" in message


def test_load_run_corrupt_line(dhat_run: Path):
    metrics = dhat_run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 4, "lr": 0.00\n')
    with pytest.raises(UserError) as info:
        load_run(dhat_run)
    message = str(info.value)
    assert "metrics.jsonl" in message and "line 4" in message and "not valid JSON" in message


# ----------------------------------------------------------------------------- plot, compare, report


def test_plot_runs_writes_png(dhat_run: Path, standard_run: Path, tmp_path: Path):
    out = plot_runs([load_run(dhat_run), load_run(standard_run)], tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_plot_runs_empty_metrics(tmp_path: Path):
    run = load_run(make_run(tmp_path, "fresh", {"method": "at"}, []))
    out = plot_runs([run], tmp_path / "fresh.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_compare_text(dhat_run: Path, standard_run: Path):
    text = compare_text([load_run(dhat_run), load_run(standard_run)])
    lines = text.split("\n")
    assert "dhat-run" in lines[0] and "std-run" in lines[0]
    assert len({len(l) for l in lines}) == 1, lines
    rows = {l[:22].strip(): l[22:].split() for l in lines[2:]}
    assert rows["method"] == ["dhat", "standard"]
    assert rows["attention"] == ["gradcam", "-"]
    assert rows["model"] == ["resnet18", "preact_resnet18"]
    assert rows["epochs"] == ["3", "2/5"]
    assert rows["seed"] == ["7", "0"]
    assert rows["best epoch"] == ["2", "2"]
    assert rows["val clean % (final)"] == ["60.00", "52.00"]
    assert rows["val robust % (best)"] == ["40.00", "-"]
    assert rows["test clean %"] == ["58.75", "-"]
    assert rows["test PGD-10 %"] == ["37.25", "-"]
    assert rows["n test"] == ["800", "-"]
    assert rows["max |logit|"] == ["15.00", "10.00"]
    assert rows["train seconds"] == ["160.2", "20.0"]


def test_compare_duplicate_names(tmp_path: Path):
    a = make_run(tmp_path / "seed-0", "gradcam", {"method": "dhat"}, STANDARD_RECORDS)
    b = make_run(tmp_path / "seed-1", "gradcam", {"method": "dhat"}, STANDARD_RECORDS)
    header = compare_text([load_run(a), load_run(b)]).split("\n")[0]
    assert "seed-0/gradcam" in header and "seed-1/gradcam" in header


def test_report(dhat_run: Path, standard_run: Path, tmp_path: Path):
    text, png = report([dhat_run, standard_run], tmp_path / "r.png")
    assert "dhat-run" in text and png.is_file()
    with pytest.raises(UserError):
        report([], tmp_path / "x.png")
