"""Reproducible by default and safe to run concurrently (issue 14, parts 4-5).

The same `dhat-seg train` command with the same seed, in separate processes with separate
caches, gives bit-identical attention models, mask-cache keys and masks, checkpoints,
metrics (but for timings) and summaries; two processes sharing a cache build the
attention model and the masks once (one waits for the other) and end the same; two
processes building the same mask cache at once produce one cache, equal byte for byte to
a single build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["--config", "quick", "--method", "dhat", "--attention", "gradcam", "--epochs", "2", "--batch-size", "16", "--seed", "5",
        "--set", "train_size=64", "--set", "test_size=16", "--set", "val_size=8", "--set", "val_examples=8",
        "--set", "attack_steps=1", "--set", "inv_steps=1", "--set", "val_attack_steps=1",
        "--set", "attention_model_epochs=1", "--set", "milestones=[1]", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train(out: Path, cache: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dhat_seg.cli", "train", "--out", str(out), "--cache-dir", str(cache), *ARGS]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(*procs: subprocess.Popen) -> list[str]:
    errs = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        errs.append(err)
    return errs


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path (lock files aside)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def run_files(out: Path) -> dict[str, bytes]:
    found = files(out)
    rows = [json.loads(l) for l in found.pop("metrics.jsonl").decode().splitlines()]
    found["metrics.jsonl"] = json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows]).encode()
    return found


def cache_files(cache: Path) -> dict[str, bytes]:
    """The attention model (its run, timings aside) and the mask cache (chunks and key)."""
    found = {}
    (model_dir,) = (cache / "attention-models").iterdir()
    for name, data in run_files(model_dir).items():
        found[f"attention-models/{model_dir.name}/{name}"] = data
    (mask_dir,) = (cache / "masks").iterdir()
    for chunk in sorted(mask_dir.glob("chunk_*.npy")):
        found[f"masks/{mask_dir.name}/{chunk.name}"] = chunk.read_bytes()
    meta = json.loads((mask_dir / "meta.json").read_text())
    found["masks/key"] = json.dumps([meta["key"], meta["key_hash"], meta["chunks"]], sort_keys=True).encode()
    return found


@pytest.mark.slow
def test_same_command_same_bits_and_a_shared_cache_is_built_once(tmp_path):
    # three runs at the same time: "a" with its own cache, "b" and "c" sharing one
    a = train(tmp_path / "a", tmp_path / "cache_a")
    b, c = train(tmp_path / "b", tmp_path / "shared"), train(tmp_path / "c", tmp_path / "shared")
    _, *logs = finish(a, b, c)
    reference_run, reference_cache = run_files(tmp_path / "a"), cache_files(tmp_path / "cache_a")
    assert {"summary.json", "config.yaml", "checkpoints/pointers.json", "checkpoints/epoch_0002/model.safetensors",
            "checkpoints/epoch_0002/state.pt"} <= set(reference_run)
    assert any(k.endswith("model.safetensors") for k in reference_cache)
    # bit-identical runs, attention models, mask keys and masks, in other directories
    assert run_files(tmp_path / "b") == run_files(tmp_path / "c") == reference_run
    assert cache_files(tmp_path / "shared") == reference_cache
    # in the shared cache one process trained the attention model and built the masks; the
    # other waited for it (or found them done) and reused them
    assert sum("so training a small_cnn normally" in log for log in logs) == 1, logs
    assert sum("mask cache: building" in log for log in logs) == 1, logs


BUILD = """
import sys, time
from pathlib import Path
from dhat_seg.attention import AttentionSpec
from dhat_seg.cache import build_masks, mask_key
from dhat_seg.data import build_dataset

directory, called, go = map(Path, sys.argv[1:4])
ds = build_dataset("synthetic", "train", size=72, seed=0, val_size=8)
key = mask_key(ds, AttentionSpec(name="test-bright", description="b", factory=lambda ctx: None, kind="image"), {})

def fn(images, labels):
    called.touch()
    while not go.exists():  # the test decides when this build may go on
        time.sleep(0.01)
    return images.mean(1, keepdim=True) > 0.5

build_masks(fn, ds, directory, key, chunk_size=16, batch_size=8, progress=False)
"""


def test_two_processes_building_one_mask_cache(tmp_path):
    """The second process waits for the first (its lock), computes nothing and reuses the
    cache; the cache equals a single uninterrupted build byte for byte."""
    from dhat_seg.attention import AttentionSpec
    from dhat_seg.cache import build_masks, mask_key
    from dhat_seg.data import build_dataset

    ds = build_dataset("synthetic", "train", size=72, seed=0, val_size=8)
    key = mask_key(ds, AttentionSpec(name="test-bright", description="b", factory=lambda ctx: None, kind="image"), {})
    build_masks(lambda x, y: x.mean(1, keepdim=True) > 0.5, ds, tmp_path / "single", key, chunk_size=16, batch_size=8,
                progress=False, log=lambda m: None)

    shared, go = tmp_path / "shared", tmp_path / "go"

    def start(name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-c", BUILD, str(shared), str(tmp_path / f"{name}.called"), str(go)],
                                    stdout=fh, stderr=subprocess.STDOUT, env=ENV)
        return proc, log

    def wait_for(condition, what: str) -> None:
        deadline = time.time() + 120
        while not condition():
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    first, first_log = start("first")
    wait_for((tmp_path / "first.called").exists, "the first build to start")  # it holds the lock now
    second, second_log = start("second")
    wait_for(lambda: "waiting for it" in second_log.read_text(), "the second build to wait")
    assert f"another process (pid {first.pid}) is building {shared}" in second_log.read_text()
    go.touch()
    for proc in (first, second):
        assert proc.wait(timeout=120) == 0, (first_log.read_text(), second_log.read_text())
    assert "was finished by the other process; reusing it" in second_log.read_text()
    assert not (tmp_path / "second.called").exists()  # the second computed nothing
    chunks = lambda d: {p.name: p.read_bytes() for p in sorted(d.glob("chunk_*.npy"))}  # noqa: E731
    assert chunks(shared) == chunks(tmp_path / "single") and len(chunks(shared)) == 4
    assert json.loads((shared / "meta.json").read_text())["chunks"] == \
        json.loads((tmp_path / "single" / "meta.json").read_text())["chunks"]


def test_deterministic_kernels_on_cuda_are_set_then_restored(monkeypatch):
    """Runs without a GPU: only the settings are checked (a torch.device names CUDA without using it)."""
    import torch

    from dhat_seg.run.determinism import deterministic_kernels

    cudnn = torch.backends.cudnn
    settings = lambda: (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),  # noqa: E731
                        torch.is_deterministic_algorithms_warn_only_enabled())
    before = settings()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("DHAT_SEG_DETERMINISTIC", raising=False)
    with deterministic_kernels(torch.device("cpu")):
        assert settings() == before  # CPU kernels are deterministic as they are
    with deterministic_kernels(torch.device("cuda")):
        assert settings() == (False, True, True, True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert settings() == before
    monkeypatch.setenv("DHAT_SEG_DETERMINISTIC", "0")
    with deterministic_kernels(torch.device("cuda")):
        assert settings() == (True,) + before[1:]  # speed instead: cuDNN autotuning on
    assert settings() == before
