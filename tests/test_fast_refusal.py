"""Range errors in the settings are refused before torch is imported (issue: fast refusals).

Timing is measured in benchmarks/bench_refusal.py; here the property behind it is checked:
after the refusal, torch is not among the imported modules.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from typer.testing import CliRunner
from dhat_seg.cli import app
result = CliRunner().invoke(app, {args!r})
print("exit", result.exit_code)
print("torch imported" if "torch" in sys.modules else "torch not imported")
print(result.output)
"""


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "omega=2"], "omega=2.0 is invalid"),
    (["train", "--set", "lr=-1"], "lr=-1"),
    (["train", "--epochs", "0"], "--epochs 0 is invalid"),
    (["train", "--set", "lr=abc"], "lr"),
])
def test_range_errors_refused_before_torch_is_imported(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert "exit 2" in proc.stdout, proc.stdout + proc.stderr
    assert message in proc.stdout
    assert "torch not imported" in proc.stdout


def test_a_valid_setting_does_reach_the_heavy_imports(tmp_path):
    """The probe can tell: an unknown method is checked against the registry, which imports torch."""
    proc = subprocess.run([sys.executable, "-c", PROBE.format(args=["train", "--method", "nosuch"])], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert "exit 2" in proc.stdout and "nosuch" in proc.stdout
    assert "torch imported" in proc.stdout
