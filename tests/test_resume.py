"""A run killed with SIGKILL mid-epoch and resumed ends exactly like an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["--config", "quick", "--method", "dhat", "--attention", "gradcam", "--epochs", "3", "--batch-size", "32", "--seed", "3",
        "--set", "train_size=320", "--set", "test_size=64", "--set", "val_size=32", "--set", "val_examples=32",
        "--set", "attack_steps=1", "--set", "inv_steps=1", "--set", "val_attack_steps=1",
        "--set", "attention_model_epochs=1", "--set", "milestones=[2]", "--device", "cpu"]


def train(out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dhat_seg.cli", "train", "--out", str(out), "--cache-dir", str(cache), *ARGS, *extra]
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    finished(train(tmp_path / "straight", cache))
    reference = json.loads((tmp_path / "straight" / "summary.json").read_text())

    proc = train(tmp_path / "killed", cache)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            time.sleep(0.3)  # into epoch 2
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()

    out = finished(train(tmp_path / "killed", cache, "--resume"))
    resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert resumed == reference
    epochs = [json.loads(l)["epoch"] for l in metrics.read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert '"epoch": 1' not in out  # epoch 1 was not redone
