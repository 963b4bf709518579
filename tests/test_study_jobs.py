"""Studies fanned out (`--jobs N`, `--launcher submitit`): the same table as the sequential
path, attention provisioned once in the parent, finished rows reused and interrupted rows
resumed by either launcher, a signal to one worker stopping the whole study, and clear
errors for bad launcher settings."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from dhat_seg.studies import ablate
from dhat_seg.attention import plugin_manager
from dhat_seg.studies.launch import Launcher, available_cores, make_launcher
from dhat_seg.cli import app
from dhat_seg.errors import Interrupted, UserError
from dhat_seg.evaluation.report import EvalOptions
from cli_helpers import assert_one_line_error, wait_while_running

ROWS = ["-", "gradcam"]
#: what differs between two runs of the same row: where and how long
VOLATILE = ("run_dir", "seconds", "cost")  # cost: the runs' own epoch and evaluation seconds


@pytest.fixture(autouse=True)
def one_thread():
    plugin_manager.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy 2-core machine; 1-thread runs are deterministic
    yield
    torch.set_num_threads(threads)
    plugin_manager.reset()


def tiny():
    """A tiny study: 1 epoch, few samples, cheap attacks (no C&W, no AutoAttack)."""
    preset = ablate.ABLATE_PRESETS["quick"]
    base = ablate.base_config(preset, {"image_size": 16, "train_size": 120, "test_size": 40, "val_size": 0.2, "epochs": 1,
                                       "batch_size": 40, "attack_steps": 1, "inv_steps": 1, "val_examples": 16,
                                       "val_attack_steps": 1, "attention_model_epochs": 1, "device": "cpu"})
    options = dataclasses.replace(EvalOptions(), attacks="clean,pgd10", n_examples=16, gap_examples=16, iou_examples=16,
                                  sanity_examples=16, device="cpu", show_progress=False).validate()
    return preset, base, options


def study(out, cache, launcher=None, rows=ROWS, messages=None):
    preset, base, options = tiny()
    log = messages.append if messages is not None else (lambda m: None)
    return ablate.run_ablation(rows, base, options, out, cache_dir=cache, preset=preset, log=log, progress=False,
                               launcher=launcher)


def table(result):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in result["rows"]]


@pytest.fixture(scope="module")
def fanned(tmp_path_factory):
    """The study with --jobs 2 on a fresh cache, then sequentially (the cache reused)."""
    root = tmp_path_factory.mktemp("jobs")
    plugin_manager.reset()
    torch.set_num_threads(1)
    messages: list[str] = []
    parallel = study(root / "par", root / "cache", Launcher("local", 2), messages=messages)
    sequential = study(root / "seq", root / "cache")
    return root, parallel, sequential, messages


def test_jobs_2_gives_the_sequential_table(fanned):
    _, parallel, sequential, _ = fanned
    assert [r["status"] for r in parallel["rows"]] == ["ok", "ok"]
    assert table(parallel) == table(sequential)
    assert isinstance(parallel["rows"][1]["pgd10"], float) and parallel["rows"][1]["iou"] is not None


def test_attention_is_provisioned_in_the_parent_before_the_workers(fanned):
    root, _, _, messages = fanned
    first_start = next(i for i, m in enumerate(messages) if "started in a worker process" in m)
    built = [i for i, m in enumerate(messages) if m.startswith(("attention model: none given", "mask cache: building"))]
    assert len(built) == 2 and max(built) < first_start, messages
    assert "2 row run(s) left, 2 at once" in "\n".join(messages)
    assert any("row Grad-CAM: finished, ok" in m for m in messages)
    assert len(list((root / "cache" / "attention-models").iterdir())) == 1


def _interrupted_copy(root, name):
    """OUT with the UIAT row finished and the Grad-CAM row interrupted after training
    (its summary.json and eval.json gone: training resumes, nothing left, then evaluation)."""
    out = root / name
    shutil.copytree(root / "seq", out)
    for f in ("summary.json", "eval.json"):
        (out / "gradcam" / f).unlink()
    return out


def _check_completed(out, result, messages, sequential, where):
    assert any("row - (UIAT): finished earlier" in m and "reused" in m for m in messages), messages
    started = [m for m in messages if ": started " in m]
    assert len(started) == 1 and "row Grad-CAM: started" in started[0] and where in started[0], messages
    assert "resuming" in started[0]
    assert [r["status"] for r in result["rows"]] == ["reused", "ok"]
    assert table(result)[1] == table(sequential)[1]
    assert json.loads((out / "gradcam" / "eval.json").read_text())["config_digest"]


def test_local_workers_run_only_what_is_missing(fanned):
    root, _, sequential, _ = fanned
    out = _interrupted_copy(root, "resume-local")
    messages: list[str] = []
    result = study(out, root / "cache", Launcher("local", 2), messages=messages)
    _check_completed(out, result, messages, sequential, "in a worker process")


class SignalledTrainer:
    """The real trainer, except that the Grad-CAM row's worker receives SIGINT as its
    training starts, as from ``kill -INT <worker pid>``."""

    def __init__(self, cfg, run_dir, **kwargs):
        from dhat_seg.run.experiment import Experiment

        self.row, self.experiment = os.path.basename(run_dir), Experiment(cfg, run_dir, **kwargs)

    def run(self, resume=False):
        if self.row == "gradcam":
            os.kill(os.getpid(), signal.SIGINT)
        return self.experiment.run(resume=resume)


def test_a_signal_to_one_worker_stops_the_whole_study(fanned, tmp_path):
    """A stop is never a failed row that the study goes past: no row starts after it, the
    table is written, and the study ends as interrupted (exit code 130 in the CLI)."""
    root = fanned[0]
    preset, base, options = tiny()
    messages: list[str] = []
    with pytest.raises(Interrupted) as stopped:
        ablate.run_ablation(ROWS, base, options, tmp_path / "out", cache_dir=root / "cache", seeds=[0, 1],
                            preset=preset, log=messages.append, progress=False, launcher=Launcher("local", 2),
                            trainer_factory=SignalledTrainer)
    assert stopped.value.exit_code == 130 and "interrupted rows resume" in str(stopped.value)
    assert any("SIGINT received by the worker of row Grad-CAM, seed 0: stopping the study" in m for m in messages), messages
    started = [m for m in messages if ": started " in m]
    assert len(started) == 2 and not any("seed 1" in m for m in started), messages
    rows = {(r["attention"], r["seed"]): r["status"]
            for row in json.loads((tmp_path / "out" / "ablation.json").read_text())["rows"] for r in row["per_seed"]}
    assert rows[("gradcam", 0)].startswith("failed: interrupted (SIGINT received"), rows
    assert rows[(None, 0)] == "ok" or rows[(None, 0)].startswith("failed: interrupted"), rows
    assert rows[(None, 1)] == rows[("gradcam", 1)] == "pending", rows
    assert not (tmp_path / "out" / "seed-1").exists()


def test_ctrl_c_to_the_study_stops_its_workers_and_exits_130(fanned, tmp_path):
    """SIGINT to the study's process alone (the workers sit in process groups of their own)
    is forwarded once to each worker; the CLI waits for them and ends with one
    ``interrupted:`` line, exit code 130, no traceback, and no row started after it."""
    root, out = fanned[0], tmp_path / "out"
    tiny_set = ["image_size=16", "train_size=120", "test_size=40", "val_size=0.2", "epochs=3", "batch_size=40",
                "attack_steps=1", "inv_steps=1", "val_examples=16", "val_attack_steps=1", "attention_model_epochs=1",
                "device=cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "dhat_seg.cli", "ablate", "--attention", ",".join(ROWS), "--seeds",
                             "0,1", "--jobs", "2", "--out", str(out), "--cache-dir", str(root / "cache"),
                             "--n-examples", "16", "--gap-examples", "16", "--sanity-examples", "16",
                             *[a for kv in tiny_set for a in ("--set", kv)]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 180
    configs = [out / "seed-0" / row / "config.yaml" for row in ("uiat", "gradcam")]
    wait_while_running(proc, lambda: all(c.exists() for c in configs), deadline)
    assert proc.poll() is None, "the study ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "ablate: SIGINT received by the study's process: stopping the study (2 running row run(s)" in stderr
    (line,) = [l for l in stderr.splitlines() if l.startswith("interrupted:")]
    assert line.endswith("interrupted rows resume from their last checkpoint); run the same command again to continue")
    assert "seed 1: started" not in stderr and not (out / "seed-1").exists()


@pytest.mark.slow
def test_submitit_local_executor_gives_the_same_table_and_resumes(fanned):
    submitit = pytest.importorskip("submitit")  # noqa: F841
    root, _, sequential, _ = fanned
    launcher = make_launcher("submitit", None, opts=["cluster=local"], log=lambda m: None)
    result = study(root / "submitit", root / "cache", launcher)
    assert table(result) == table(sequential)
    assert (root / "submitit" / ".submitit").is_dir()
    out = _interrupted_copy(root, "resume-submitit")
    messages: list[str] = []
    result = study(out, root / "cache", launcher, messages=messages)
    _check_completed(out, result, messages, sequential, "as submitit job")


def test_submitit_debug_executor_runs_the_missing_row(fanned):
    """The submitit path, fast: the debug executor runs the job function in this process."""
    root, _, sequential, _ = fanned
    out = _interrupted_copy(root, "resume-debug")
    messages: list[str] = []
    result = study(out, root / "cache", make_launcher("submitit", opts=["cluster=debug"], log=lambda m: None),
                   messages=messages)
    _check_completed(out, result, messages, sequential, "as submitit job")


# ---------------------------------------------------------------------------------
# launcher settings
# ---------------------------------------------------------------------------------


def test_launcher_settings(tmp_path):
    warnings: list[str] = []
    many = make_launcher("local", available_cores() + 1, log=warnings.append)
    assert many.jobs == available_cores() + 1 and "more than the" in warnings[0]
    assert many.threads(1) == 1  # jobs x threads <= cores, even for the last job left
    assert make_launcher("local", None).jobs == 1 and not make_launcher("local", 1).fans_out
    config = tmp_path / "slurm.yaml"
    config.write_text("slurm_partition: gpu\ngpus_per_node: 1\ntimeout_min: 600\ncpus_per_task: 4\n")
    slurm = make_launcher("submitit", None, config, ["slurm_partition=debug", "mem_gb=16"])
    assert {k: v for k, v in slurm.options.items() if k != "cluster"} == {
        "slurm_partition": "debug", "gpus_per_node": 1, "timeout_min": 600, "cpus_per_task": 4, "mem_gb": 16}
    assert slurm.cluster in ("slurm", "local")  # submitit's choice: Slurm where srun exists
    assert slurm.fans_out and slurm.threads(3) == 4
    with pytest.raises(UserError, match="--jobs 0 is invalid"):
        make_launcher("local", 0)


def test_sequential_path_is_the_default():
    assert not Launcher().fans_out and Launcher("local", 2).fans_out and Launcher("submitit").fans_out


def invoke(command, args):
    return CliRunner().invoke(app, [command] + args)


@pytest.mark.parametrize("command", ["ablate", "compare"])
@pytest.mark.parametrize(
    "args, needles",
    [
        (["--jobs", "0"], ["--jobs 0 is invalid", "positive integer"]),
        (["--jobs=-2"], ["--jobs -2 is invalid"]),
        (["--launcher", "ray"], ["--launcher 'ray' is unknown", "local, submitit"]),
        (["--launcher-opt", "slurm_partition=gpu"], ["configure submitit jobs", "--launcher submitit"]),
        (["--launcher", "submitit", "--launcher-opt", "partition"], ["--launcher-opt 'partition' is invalid", "KEY=VALUE"]),
        (["--launcher", "submitit", "--launcher-opt", "cluster=mars"], ["cluster='mars' is unknown", "slurm, local, debug"]),
        (["--launcher", "submitit", "--launcher-opt", "slurm_bogus=1"], ["submitit refuses", "slurm_bogus"]),
        (["--launcher", "submitit", "--launcher-opt", "timeout_min=soon"], ["submitit refuses", "timeout_min"]),
    ],
)
def test_bad_launcher_settings_are_one_line_errors(tmp_path, command, args, needles):
    assert_one_line_error(invoke(command, ["--out", str(tmp_path / "o")] + args), *needles)


@pytest.mark.parametrize("text, needle", [("- slurm_partition: gpu\n", "holds a list; expected a mapping"),
                                          ("slurm_partition: [gpu\n", "is not readable YAML"),
                                          (None, "no such file")])
def test_bad_launcher_config_is_one_line_error(tmp_path, text, needle):
    path = tmp_path / "slurm.yaml"
    if text is not None:
        path.write_text(text)
    result = invoke("ablate", ["--out", str(tmp_path / "o"), "--launcher", "submitit", "--launcher-config", str(path)])
    assert_one_line_error(result, f"--launcher-config {path}", needle)


def test_cli_passes_the_launcher_to_the_study(tmp_path):
    """--jobs reaches the study: with --report-only the fanned-out path runs nothing and
    writes the table of pending rows."""
    root = tmp_path
    args = ["--attention", "-,gradcam,ig", "--out", str(root / "cli"), "--cache-dir", str(root / "cache"), "--report-only",
            "--jobs", "2", "--epochs", "1", "--device", "cpu", "--n-examples", "16", "--gap-examples", "16",
            "--sanity-examples", "16"]
    result = invoke("ablate", args)
    assert result.exit_code == 0, result.output
    rows = json.loads((root / "cli" / "ablation.json").read_text())["rows"]
    assert [r["status"].split(":")[0] for r in rows] == ["pending", "pending", "pending"]
    assert not (root / "cli" / "uiat").exists()


def test_a_submitit_study_stops_by_cancelling_its_jobs():
    """The study stops either backend the same way (``backend.stop()``); submitit's cancels
    the jobs not done."""
    from dhat_seg.studies.launch import _Submitit

    class Job:
        cancelled = False

        def done(self):
            return False

        def cancel(self, check=True):
            self.cancelled = True

    backend = _Submitit.__new__(_Submitit)
    backend.jobs = [Job()]
    backend.stop()
    assert backend.jobs[0].cancelled
