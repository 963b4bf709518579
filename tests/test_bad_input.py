"""Bad input (issue 14): every refusal is one ``error:`` line naming the bad value, with a
non-zero exit code, no traceback and nothing left behind; parse errors of typed flags
(``--epochs abc``) take the same form as every other user mistake."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli_helpers import assert_one_line_error
from dhat_seg.cli import app

runner = CliRunner()

# (arguments, needles of the error line); "{tmp}" is a fresh empty folder, "{out}" a run
# directory under it that must not exist afterwards.
CASES = [
    # typed flags: click's parse errors in the one-line form
    (["train", "--epochs", "abc", "--out", "{out}"], ["--epochs", "'abc'", "integer"]),
    (["train", "--lr", "abc", "--out", "{out}"], ["--lr", "'abc'", "number"]),
    (["train", "--batch-size", "1.5", "--out", "{out}"], ["--batch-size", "'1.5'"]),
    (["train", "--seed", "x", "--out", "{out}"], ["--seed", "'x'"]),
    (["train", "--nosuch", "--out", "{out}"], ["--nosuch"]),
    (["train", "--epochs"], ["--epochs"]),
    (["trian"], ["trian"]),
    (["--nosuch"], ["--nosuch"]),
    (["eval", "--eps", "x", "{tmp}"], ["--eps", "'x'", "number"]),
    (["eval", "--batch-size", "x", "{tmp}"], ["--batch-size", "'x'"]),
    (["eval"], ["target"]),
    (["eval", "{tmp}", "--nosuch"], ["--nosuch"]),
    (["masks", "build", "--batch-size", "x"], ["--batch-size", "'x'", "integer"]),
    (["masks", "build", "--chunk-size", "x"], ["--chunk-size", "'x'"]),
    (["masks", "nosuch"], ["nosuch"]),
    (["masks", "score", "--n", "x", "--attention", "oracle"], ["--n", "'x'"]),
    (["masks", "score"], ["--attention"]),
    (["masks", "info", "--seed", "x"], ["--seed", "'x'"]),
    (["masks", "show", "--nosuch"], ["--nosuch"]),
    (["ablate", "--epochs", "x"], ["--epochs", "'x'"]),
    (["ablate", "--seed", "x"], ["--seed", "'x'"]),
    (["compare", "--epochs", "x"], ["--epochs", "'x'"]),
    (["compare", "--nosuch"], ["--nosuch"]),
    (["report"], ["run"]),
    (["report", "{tmp}", "--nosuch"], ["--nosuch"]),
    (["plugins", "--nosuch"], ["--nosuch"]),
    (["plugins", "extra"], ["extra"]),
    # values refused at config load, before the run directory exists
    (["train", "--method", "nosuch", "--out", "{out}"], ["'nosuch'"]),
    (["train", "--model", "nosuch", "--out", "{out}"], ["'nosuch'"]),
    (["train", "--data", "nosuch", "--out", "{out}"], ["'nosuch'"]),
    (["train", "--attention", "nosuch", "--out", "{out}"], ["'nosuch'"]),
    (["train", "--epochs", "0", "--out", "{out}"], ["--epochs", "0"]),
    (["train", "--set", "omega=2", "--out", "{out}"], ["omega"]),
    (["train", "--set", "lr=abc", "--out", "{out}"], ["lr", "'abc'"]),
    (["train", "--set", "nosuch=1", "--out", "{out}"], ["nosuch"]),
    (["train", "--set", "noequals", "--out", "{out}"], ["noequals", "KEY=VALUE"]),
    (["train", "--lr", "0.1", "--set", "lr=0.2", "--out", "{out}"], ["lr", "0.1", "0.2"]),
    (["train", "--config", "{tmp}/missing.yaml", "--out", "{out}"], ["missing.yaml"]),
    (["train", "--resume", "--out", "{out}"], ["--resume"]),
    (["train", "--attention", "ig", "--attention-opt", "n_steps=abc", "--out", "{out}"],
     ["n_steps", "'abc'", "'ig'", "integer"]),
    (["train", "--attention", "ig", "--attention-opt", "nosuch=1", "--out", "{out}"], ["'nosuch'", "'ig'"]),
    (["train", "--attention", "gradcam", "--attention-opt", "noequals", "--out", "{out}"], ["noequals"]),
    (["train", "--attention", "sam", "--attention-checkpoint", "/etc/passwd", "--out", "{out}"],
     ["/etc/passwd", "not a SAM checkpoint"]),
    (["train", "--attention", "gradcam", "--attention-checkpoint", "/etc/passwd", "--out", "{out}"], ["'gradcam'", "checkpoint"]),
    (["masks", "build", "--attention", "nosuch", "--cache-dir", "{tmp}"], ["'nosuch'"]),
    (["masks", "build", "--attention", "ig", "--attention-opt", "n_steps=abc", "--cache-dir", "{tmp}"], ["n_steps", "'abc'"]),
    (["masks", "build", "--attention", "gradcam", "--batch-size", "0", "--cache-dir", "{tmp}"], ["--batch-size", "0"]),
    (["masks", "build", "--data", "nosuch", "--cache-dir", "{tmp}"], ["'nosuch'"]),
    (["masks", "score", "--attention", "nosuch", "--cache-dir", "{tmp}"], ["'nosuch'"]),
    (["masks", "show", "{tmp}/nosuch"], ["nosuch"]),
    (["masks", "info", "{tmp}/nosuch"], ["nosuch"]),
    (["eval", "{tmp}/nosuch"], ["nosuch"]),
    (["eval", "{tmp}"], ["{tmp}"]),
    (["ablate", "--epochs", "0", "--out", "{out}"], ["--epochs", "0"]),
    (["ablate", "--attention", "nosuch", "--out", "{out}"], ["nosuch"]),
    (["compare", "--methods", "nosuch", "--out", "{out}"], ["nosuch"]),
    (["report", "{tmp}/nosuch"], ["nosuch"]),
    (["report", "{tmp}", "--out", "{tmp}/x.txt"], ["x.txt"]),
]


def _fill(value: str, tmp, out) -> str:
    return value.replace("{tmp}", str(tmp)).replace("{out}", str(out))


@pytest.mark.parametrize("args,needles", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_error_line(args, needles, tmp_path, monkeypatch):
    monkeypatch.setenv("DHAT_SEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    tmp, out = tmp_path / "work", tmp_path / "work" / "run"
    tmp.mkdir()
    result = runner.invoke(app, [_fill(a, tmp, out) for a in args])
    assert result.exit_code == 2, result.output
    assert_one_line_error(result, *[_fill(n, tmp, out) for n in needles])
    assert not out.exists(), f"{out} was created by a refused command"
    assert not (tmp_path / "runs").exists()


def test_parse_errors_are_not_a_usage_box():
    result = runner.invoke(app, ["train", "--epochs", "abc"])
    assert result.exit_code == 2
    assert "Usage:" not in result.output and "╭" not in result.output
    assert result.output.strip() == result.output.strip().splitlines()[0]


def test_help_still_works():
    assert runner.invoke(app, ["train", "--help"]).exit_code == 0
    assert "Usage" in runner.invoke(app, []).output
