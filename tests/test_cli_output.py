"""What `dhat-seg train` and `dhat-seg report` print: an aligned epoch table (or JSON
lines with --json), quiet runs with -q, a curves PNG, one-line errors."""

import json

from typer.testing import CliRunner

from dhat_seg.cli import app
from cli_helpers import assert_one_line_error

runner = CliRunner()
TINY = ["--method", "at", "--model", "small_cnn", "--epochs", "2", "--batch-size", "16",
        "--set", "train_size=60", "--set", "val_size=12", "--set", "test_size=16", "--set", "val_examples=12",
        "--set", "attack_steps=1", "--set", "val_attack_steps=1", "--set", "milestones=[1]", "--set", "lr=0.01",
        "--device", "cpu"]


def _train(tmp_path, name, *extra):
    result = runner.invoke(app, [*extra, "train", "--out", str(tmp_path / name), "--cache-dir", str(tmp_path / "c"), *TINY])
    assert result.exit_code == 0, result.output
    return result


def test_train_prints_an_aligned_epoch_table_and_report_draws_curves(tmp_path):
    out = _train(tmp_path, "a").stdout.splitlines()
    header = next(i for i, line in enumerate(out) if line.split()[:2] == ["ep", "lr"])
    rows = out[header + 2: header + 4]
    assert set(out[header + 1]) <= {"-", " "} and [r.split()[0] for r in rows] == ["1", "2"]
    assert len({len(line) for line in out[header: header + 4]}) == 1, out[header: header + 4]  # aligned
    assert rows[1].split()[1] == "0.001", rows  # lr 0.01 after one decay by 0.1: 0.001, not 0.0010000000000000002
    assert not any(line.startswith("{") for line in out)  # no raw JSON on stdout
    metrics = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and "train_ce_adv" in metrics[0]  # the full record is kept

    quiet = _train(tmp_path, "b", "-q").stdout  # -q: warnings only on stderr; results still on stdout
    assert "clean %" in quiet

    result = runner.invoke(app, ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "a" in result.stdout and "b" in result.stdout and "curves written to" in result.stdout


def test_train_json_lines(tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "j"), "--cache-dir", str(tmp_path / "c"), *TINY, "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records == [json.loads(l) for l in (tmp_path / "j" / "metrics.jsonl").read_text().splitlines()]


def test_report_bad_input(tmp_path):
    assert_one_line_error(runner.invoke(app, ["report", str(tmp_path / "nothing")]), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(runner.invoke(app, ["report", str(tmp_path / "empty")]), "no metrics.jsonl")
    assert_one_line_error(runner.invoke(app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "x.jpg")]),
                          "expected a .png")
