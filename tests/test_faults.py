"""Faults (issue 14, parts 3-4): a write that fails (full disk, read-only file system) keeps
the previous state and is one clear error line; SIGINT/SIGTERM stop at a safe point with
a resumable run and the command that resumes it; a run directory is used by one process
at a time.

A full disk is simulated by replacing ``open`` in the module that writes: the first write
of a matching file writes half of its bytes and then fails with ENOSPC (a write cut
short), or the open itself fails with EROFS. What must hold afterwards is checked on the
real files: nothing half-written left, the previous checkpoint loads, and a resumed run
ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli_helpers import assert_one_line_error, wait_while_running
from dhat_seg.run import checkpoint, trainer
from dhat_seg.attention import AttentionSpec
from dhat_seg.cache import MaskCache, build_masks, mask_key
from dhat_seg.run.checkpoint import load_state, load_weights, read_pointers
from dhat_seg.cli import app
from dhat_seg.config import load_config
from dhat_seg.data import build_dataset
from dhat_seg.errors import Interrupted, WriteError
from dhat_seg.run.experiment import Experiment
from dhat_seg.run.locks import directory_lock
from dhat_seg.run.trainer import Trainer

runner = CliRunner()
REASON = {errno.ENOSPC: "no space left on device (ENOSPC)", errno.EROFS: "read-only file system (EROFS)"}
TINY = dict(method="standard", data="synthetic", model="small_cnn", train_size=56, test_size=16, val_size=8, epochs=3,
            batch_size=16, val_examples=8, val_attack_steps=1, device="cpu", milestones=[2])


def tiny_args(**overrides) -> list[str]:
    """TINY as `dhat-seg train` options."""
    return [a for k, v in {**TINY, **overrides}.items() for a in ("--set", f"{k}={v}")]


TINY_ARGS = tiny_args()


pytestmark = pytest.mark.usefixtures("one_thread")


def run(out: Path, resume: bool = False, **overrides) -> dict:
    cfg = load_config(None, {**TINY, **overrides})
    return Experiment(cfg, out, cache_dir=out.parent / "cache", progress=False, log=lambda m: None).run(resume=resume)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The summary and metrics of an uninterrupted run."""
    out = tmp_path_factory.mktemp("straight") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(out), metrics(out)
    finally:
        torch.set_num_threads(threads)


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


class _CutShort:
    """A file whose first write stores half of its bytes and fails as a full disk does."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def full_disk(monkeypatch, module, match, err=errno.ENOSPC, skip: int = 0) -> list[str]:
    """Writes through ``module``'s ``open`` to a path containing ``match`` fail (after
    ``skip`` successful ones): ENOSPC half-way through the first write, or EROFS at open."""
    hits: list[str] = []

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wa") and match in str(file):
            hits.append(str(file))
            if len(hits) > skip:
                if err != errno.ENOSPC:
                    raise OSError(err, os.strerror(err), str(file))
                return _CutShort(builtins.open(file, mode, *args, **kwargs))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(module, "open", fake_open, raising=False)
    return hits


# ---------------------------------------------------------------------------------
# A write that fails
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, reference, err):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        hits = full_disk(m, checkpoint, "epoch_0002", err)
        with pytest.raises(WriteError) as info:
            run(out)
    assert hits
    ckpt = out / "checkpoints"
    message = str(info.value)
    assert message.startswith(f"cannot write {str(ckpt / 'epoch_0002')!r}: {REASON[err]}; ")
    assert f"the previous checkpoint {str(ckpt / 'epoch_0001')!r} is intact and --resume continues from it" in message
    # nothing half-written is left; the previous checkpoint is complete and loads
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_0001", "pointers.json"]
    assert read_pointers(ckpt) == {"last": "epoch_0001", "best": "epoch_0001"}
    load_weights(ckpt / "epoch_0001" / "model.safetensors")
    assert load_state(ckpt / "epoch_0001" / "state.pt")["epoch"] == 1
    assert run(out, resume=True) == reference[0]
    assert metrics(out) == reference[1]


def test_failed_metrics_line_is_rolled_back(tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        full_disk(m, trainer, "metrics.jsonl", skip=1)  # epoch 1's line is written, epoch 2's is cut short
        with pytest.raises(WriteError) as info:
            run(out)
    message = str(info.value)
    assert message.startswith(f"cannot write {str(out / 'metrics.jsonl')!r}: no space left on device (ENOSPC); ")
    assert "--resume continues from it (redoing epoch 2)" in message
    lines = (out / "metrics.jsonl").read_text()
    assert lines.endswith("\n") and len(lines.splitlines()) == 1  # the partial line was rolled back
    assert read_pointers(out / "checkpoints")["last"] == "epoch_0001"
    assert run(out, resume=True) == reference[0]
    assert metrics(out) == reference[1]


def test_a_torn_metrics_line_of_a_killed_run_is_dropped_on_resume(tmp_path, reference):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        with_signal_at(signal.SIGTERM, out, epoch=1, batch=0)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "lr": 0.0')  # what a SIGKILL during the write leaves
    assert run(out, resume=True) == reference[0]
    assert metrics(out) == reference[1]


def with_signal_at(signum, out: Path, *, epoch: int, batch: int, times: int = 1):
    """Run, sending ``signum`` to this process ``times`` times during (0-based) batch
    ``batch`` of epoch ``epoch``."""
    original = Trainer._check_divergence

    def sending(self, values, e, b):
        if (e, b) == (epoch, batch):
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return original(self, values, e, b)

    Trainer._check_divergence = sending
    try:
        return run(out)
    finally:
        Trainer._check_divergence = original


@pytest.mark.parametrize("err,match,skip", [(errno.ENOSPC, "chunk_00002", 0), (errno.ENOSPC, "meta.json", 2),
                                            (errno.EROFS, "chunk_00002", 0)], ids=["chunk", "meta", "chunk-EROFS"])
def test_failed_cache_chunk_write_keeps_the_finished_chunks(tmp_path, monkeypatch, err, match, skip):
    ds = build_dataset("synthetic", "train", size=72, seed=0, val_size=8)
    spec = AttentionSpec(name="test-bright", description="bright pixels", factory=lambda ctx: None, kind="image")
    key = mask_key(ds, spec, {})
    calls = {"images": 0}

    def fn(images, labels):
        calls["images"] += images.shape[0]
        return images.mean(1, keepdim=True) > 0.5

    build = lambda d: build_masks(fn, ds, d, key, chunk_size=16, batch_size=8, progress=False, log=lambda m: None)  # noqa: E731
    build(tmp_path / "straight")
    directory = tmp_path / "full"
    with monkeypatch.context() as m:
        full_disk(m, checkpoint, match, err, skip=skip)  # chunks and meta.json are written by checkpoint.write_atomic
        with pytest.raises(WriteError) as info:
            build(directory)
    message = str(info.value)
    assert f": {REASON[err]}; the 2 finished chunk(s) of 4 are kept" in message and match in message
    assert "run the same command again to finish the cache" in message
    meta = json.loads((directory / "meta.json").read_text())
    assert sorted(meta["chunks"]) == ["chunk_00000.npy", "chunk_00001.npy"] and not meta["complete"]
    assert not list(directory.glob(".*.tmp*"))
    calls["images"] = 0
    cache = build(directory)
    assert calls["images"] == 32  # chunks 2 and 3 only
    assert isinstance(cache, MaskCache)
    for k in range(4):
        name = f"chunk_{k:05d}.npy"
        assert (directory / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


def test_disk_errors_are_one_line_in_the_cli(tmp_path, monkeypatch):
    args = ["train", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *TINY_ARGS]
    with monkeypatch.context() as m:
        full_disk(m, checkpoint, "epoch_0001")
        result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert_one_line_error(result, "no space left on device (ENOSPC)", "epoch_0001",
                          "no earlier checkpoint exists; --resume starts the run again")
    # an ENOSPC from anywhere else is one line too
    monkeypatch.setattr(Experiment, "run", lambda self, resume=False: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device", "/somewhere/file")))
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run2"), *TINY_ARGS])
    assert result.exit_code == 2
    assert_one_line_error(result, "cannot write '/somewhere/file': no space left on device (ENOSPC)")


# ---------------------------------------------------------------------------------
# SIGINT / SIGTERM
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_after_the_batch_and_resume_is_exact(tmp_path, reference, signum):
    out = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        with_signal_at(signum, out, epoch=1, batch=1)
    exc = info.value
    name = signal.Signals(signum).name
    assert (exc.signum, exc.exit_code) == (signum, 128 + signum)
    assert str(exc) == (f"{name} received; stopped in epoch 2/3 after batch 2 (a safe point); the checkpoint of epoch 1 "
                        f"is kept ({out / 'checkpoints' / 'epoch_0001'}); a resumed run redoes epoch 2 exactly")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert read_pointers(out / "checkpoints")["last"] == "epoch_0001"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert run(out, resume=True) == reference[0]
    assert metrics(out) == reference[1]


def test_a_second_signal_stops_at_once(tmp_path):
    with pytest.raises(Interrupted, match="SIGTERM received a second time; stopped at once"):
        with_signal_at(signal.SIGTERM, tmp_path / "run", epoch=0, batch=0, times=2)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_signal_during_a_mask_build_keeps_the_finished_chunks(tmp_path):
    ds = build_dataset("synthetic", "train", size=72, seed=0, val_size=8)
    key = mask_key(ds, AttentionSpec(name="test-bright", description="b", factory=lambda ctx: None, kind="image"), {})
    calls = {"batches": 0}

    def fn(images, labels):
        calls["batches"] += 1
        if calls["batches"] == 5:  # the first batch of chunk 3 (chunks of 16, batches of 8)
            os.kill(os.getpid(), signal.SIGINT)
        return images.mean(1, keepdim=True) > 0.5

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        build_masks(fn, ds, tmp_path / "c", key, chunk_size=16, batch_size=8, progress=False, log=lambda m: None)
    assert str(info.value) == (f"SIGINT received; stopped building the mask cache {tmp_path / 'c'} in chunk 3/4; the 2 "
                               "finished chunk(s) are kept and the same command resumes the build from the first missing one")
    assert sorted(json.loads((tmp_path / "c" / "meta.json").read_text())["chunks"]) == ["chunk_00000.npy", "chunk_00001.npy"]
    assert signal.getsignal(signal.SIGINT) is handler
    cache = build_masks(fn, ds, tmp_path / "c", key, chunk_size=16, batch_size=8, progress=False, log=lambda m: None)
    assert len(cache) == len(ds) and calls["batches"] == 5 + 4  # chunks 3 and 4 only, 2 batches each


@pytest.mark.slow
def test_sigterm_from_outside_then_the_printed_command_resumes_exactly(tmp_path):
    """A real SIGTERM to a `dhat-seg train` process; meanwhile a second `train` on the same
    --out is refused at once; the printed resume command finishes the run as an
    uninterrupted one (both in this process, to save a second start of Python and torch)."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = tiny_args(train_size=200, epochs=4)
    proc = subprocess.Popen([sys.executable, "-m", "dhat_seg.cli", "train", "--out", str(out), "--cache-dir", str(cache),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    wait_while_running(proc, (out / "config.yaml").exists, deadline)
    second = runner.invoke(app, ["train", "--out", str(out), "--cache-dir", str(cache), *args])
    assert_one_line_error(second, f"run directory {str(out)!r} is in use by another dhat-seg process (pid {proc.pid}); "
                                  "wait for it to finish or choose another --out")
    wait_while_running(proc, (out / "metrics.jsonl").exists, deadline)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    (line,) = [l for l in stderr.splitlines() if l.startswith("interrupted:")]
    resume = f"dhat-seg train --resume --out {out} --cache-dir {cache}"
    assert line.startswith("interrupted: SIGTERM received; stopped ") and line.endswith(f"; resume with {resume}")
    assert not (out / "summary.json").exists()

    resumed = runner.invoke(app, shlex.split(line.split("resume with ")[1])[1:])
    assert resumed.exit_code == 0, resumed.output
    straight = runner.invoke(app, ["train", "--out", str(tmp_path / "straight"), "--cache-dir", str(cache), *args])
    assert straight.exit_code == 0, straight.output
    assert (out / "summary.json").read_text() == (tmp_path / "straight" / "summary.json").read_text()
    assert metrics(out) == metrics(tmp_path / "straight")


# ---------------------------------------------------------------------------------
# One process per run directory
# ---------------------------------------------------------------------------------

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_directory_in_use_is_refused_at_once(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        result = runner.invoke(app, ["train", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *TINY_ARGS])
        assert result.exit_code == 2 and time.time() - t0 < 30
        assert_one_line_error(result, f"run directory {str(out)!r} is in use by another dhat-seg process "
                                      f"(pid {holder.pid}); wait for it to finish or choose another --out")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
        with pytest.raises(Exception, match="is in use"):
            run(out)
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, none is left stale
        holder.wait()
    for wait in (False, True):  # not re-entered: the holder hands it down (a nested wait would wait for itself)
        with directory_lock(out, wait=False):
            with pytest.raises(RuntimeError, match="is locked by this process already"):
                with directory_lock(out, wait=wait):
                    pass
    assert (out / ".lock").read_text() == ""  # no holder's pid once released
    run(out, epochs=1, milestones=[])
    assert (out / "summary.json").is_file()
