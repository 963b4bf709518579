"""A run is resolved once and hands down objects (issue "a codebase that grows by one file
per method", item 2): the orchestration layer validates the config, picks the device and
the autocast dtype, checks the speed options, takes the run directory's lock, installs the
SIGINT/SIGTERM handling and the deterministic kernels, and builds the training method, each
once per run; the trainer, the mask build and a nested attention-model run receive what
was resolved. No module-level state makes a lock or the signal handling re-entrant."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest

from dhat_seg.run import experiment
from dhat_seg.run import determinism, devices, locks, stopping
from dhat_seg.cache import build as cache_build
from dhat_seg.cache import provision
from dhat_seg.config import TrainConfig, load_config
from dhat_seg.errors import Interrupted
from dhat_seg.run.experiment import Experiment
from dhat_seg.run.stopping import GracefulStop, stop_scope
from dhat_seg.training_methods import TRAINING_METHODS

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> TrainConfig:
    values = dict(method="dhat", attention="oracle", data="synthetic", model="small_cnn", train_size=56, test_size=16,
                  val_size=8, epochs=1, batch_size=16, attack_steps=1, inv_steps=1, val_examples=8, val_attack_steps=1,
                  device="cpu", milestones=[])
    values.update(overrides)
    return load_config(None, values)  # validated here, and not again by Experiment


def counting(monkeypatch) -> Counter:
    """Count, from now on, every resolution step a run takes (patched where it is looked up)."""
    calls: Counter = Counter()

    def wrap(owner, name, key=None, keep=None):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if keep is None or keep(*args, **kwargs):
                calls[key or name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    wrap(TrainConfig, "validate")
    wrap(experiment, "create_training_method")
    dhat = TRAINING_METHODS["dhat"].cls
    wrap(dhat, "__init__", "DHAT()", keep=lambda self, *a, **k: type(self) is dhat)
    wrap(experiment, "select_device")
    wrap(experiment, "resolve_amp_dtype")
    wrap(experiment, "check_speed_options")
    wrap(stopping, "deterministic_kernels")  # run_scope enters them
    wrap(GracefulStop, "__enter__", "GracefulStop entered")
    for module in (experiment, provision, cache_build):  # every directory lock, by the folder it locks
        original = module.directory_lock

        def lock(directory, *args, _original=original, **kwargs):
            calls[f"lock {Path(directory).parent.name}/{Path(directory).name}"] += 1
            return _original(directory, *args, **kwargs)

        monkeypatch.setattr(module, "directory_lock", lock)
    return calls


def test_a_run_is_resolved_once(tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    cfg = tiny()  # load_config validates: Experiment does not again
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    summary = Experiment(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False, log=lambda m: None,
                         on_epoch=lambda r: None).run()
    assert summary["attention"] == "oracle"
    locks = {k: v for k, v in calls.items() if k.startswith("lock ")}
    assert len(locks) == 2 and locks[f"lock {tmp_path.name}/run"] == 1  # the run directory, and the mask cache's
    assert set(locks.values()) == {1}  # the cache's by its provisioning only: the build is told it is held
    assert {k: v for k, v in calls.items() if not k.startswith("lock ")} == {
        "validate": 1, "create_training_method": 1, "DHAT()": 1, "select_device": 1, "resolve_amp_dtype": 1,
        "check_speed_options": 1, "deterministic_kernels": 1, "GracefulStop entered": 1}
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored


def test_the_attention_model_run_shares_the_outer_scope(tmp_path, monkeypatch):
    """A run whose attention model is trained first (a nested run): its directory is locked
    once (by ensure_attention_model, not again by the nested run), and the signal handling
    and the kernel settings are the outer run's, handed down."""
    calls = counting(monkeypatch)
    cfg = tiny(attention="gradcam", attention_model_arch="small_cnn", attention_model_epochs=1)
    Experiment(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False, log=lambda m: None,
               on_epoch=lambda r: None).run()
    assert calls["GracefulStop entered"] == 1 and calls["deterministic_kernels"] == 1
    assert calls["validate"] == 2  # the run's config and the attention model's, once each
    assert calls["DHAT()"] == 1 and calls["create_training_method"] == 2  # DHAT, and the attention model's standard
    model_locks = [k for k in calls if k.startswith("lock attention-models/")]
    assert len(model_locks) == 1 and calls[model_locks[0]] == 1
    assert calls[f"lock {tmp_path.name}/run"] == 1


def test_a_config_changed_after_validation_is_validated_again(monkeypatch):
    cfg = tiny()
    assert cfg.validated
    calls = counting(monkeypatch)
    Experiment(cfg, "unused")
    assert calls["validate"] == 0
    cfg.seed = 3  # any assignment
    assert not cfg.validated
    Experiment(cfg, "unused")
    assert calls["validate"] == 1 and cfg.validated
    built = TrainConfig(method="at", model="small_cnn", device="cpu")  # built directly: never validated
    Experiment(built, "unused")
    assert calls["validate"] == 2


def test_runtime_holds_no_module_state_for_locks_or_signals():
    for module in (devices, determinism, locks, stopping):
        state = {name: type(value).__name__ for name, value in vars(module).items()
                 if not name.startswith("__") and isinstance(value, (dict, list, set, bytearray))}
        assert state == {}, module.__name__
        assert not hasattr(module, "_HELD") and not hasattr(module, "_STOP")


def test_a_graceful_stop_holds_its_request_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = GracefulStop()
    assert stop.requested() is None  # never entered: never asked to stop
    with stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM  # the first: recorded, honoured at the next safe point
        with stop_scope(stop) as inner:  # nested work is handed the same object, nothing installed again
            assert inner is stop
        with pytest.raises(RuntimeError, match="hand it down"):
            with stop:
                pass
        with pytest.raises(Interrupted, match="SIGTERM received a second time; stopped at once"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert stop.requested() is None
    with stop_scope(None) as own:  # no enclosing stop: a new one is installed for the block
        assert isinstance(own, GracefulStop) and signal.getsignal(signal.SIGINT) == own._handle
    assert signal.getsignal(signal.SIGINT) == before[0]


def test_a_graceful_stop_off_the_main_thread_installs_nothing():
    seen = []

    def work():
        with GracefulStop() as stop:
            seen.append((stop.requested(), signal.getsignal(signal.SIGTERM)))

    handler = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [(None, handler)]
