"""A study's rows fanned out: ``--jobs N`` local worker processes, or one submitit job per
row x seed (``--launcher submitit``: Slurm, or submitit's local executor).

The study's own process plans every row first (reused, skipped and pending rows are
settled there, as in the sequential path), then provisions, one setting after another,
the shared attention model and each row's training mask cache
(:func:`dhat_seg.run.experiment.provision_attention`), so that no two jobs build the same
cache; only then do the jobs start. Each job runs the one function that runs a row
everywhere (:func:`dhat_seg.studies.run.run_row`, wrapped by ``run_row_job``) in its run
directory; the parent logs each row's start and end and rewrites the table files as
results arrive. A job that fails (or is killed) fails its row only; the study run again
reuses what finished and resumes the rest from their checkpoints.

Stopping: SIGINT/SIGTERM to the study's process, or to one local worker, stops the whole
study. Local workers sit in process groups of their own, so a Ctrl-C reaches the study's
process only, which starts no new row and forwards the stop once to every worker: training
stops at its next safe point (after a batch), an evaluation at once (AutoAttack's state is
kept). The study waits for them, writes the table (those rows "failed: interrupted") and
exits 130/143; a second signal stops at once. submitit jobs are cancelled instead.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from dhat_seg.errors import Interrupted, UserError
from dhat_seg.run.stopping import GracefulStop

#: the values of ``--launcher``
LAUNCHERS = ("local", "submitit")
#: submitit's executors (``cluster`` option; default: Slurm where ``srun`` exists, else local)
SUBMITIT_CLUSTERS = ("slurm", "local", "debug")
#: time limit (minutes) of submitit's local executor when none is given (its own default is 2)
LOCAL_TIMEOUT_MIN = 7 * 24 * 60


def available_cores() -> int:
    """CPU cores this process may run on (its affinity, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def failure_status(exc: BaseException) -> str:
    """The status of a row that raised ``exc``: "failed: <message>" (a UserError) or
    "failed: <type>: <message>"."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"failed: {message}" if isinstance(exc, UserError) else f"failed: {type(exc).__name__}: {message}"


@dataclass(frozen=True)
class Launcher:
    """Where a study's rows run. ``kind``: "local" (this machine: one after another in
    this process with ``jobs`` 1, else ``jobs`` worker processes) or "submitit" (one job
    per row x seed, at most ``jobs`` at once when given). ``options``: submitit's executor
    options (``cluster`` picks the executor; the others go to ``update_parameters``)."""

    kind: str = "local"
    jobs: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fans_out(self) -> bool:
        """Whether the rows run outside this process."""
        return self.kind == "submitit" or (self.jobs or 1) > 1

    @property
    def cluster(self) -> str | None:
        """submitit's executor (None: submitit picks: Slurm where ``srun`` exists, else local)."""
        return self.options.get("cluster")

    def in_flight(self, n_jobs: int) -> int:
        """How many jobs run at once: ``jobs``; with submitit by default all of them (Slurm
        queues them), on the local executor at most one per core."""
        if self.jobs is not None:
            return max(1, min(self.jobs, n_jobs))
        if self.kind == "submitit" and self.cluster not in ("local", "debug"):
            return max(1, n_jobs)
        return max(1, min(available_cores(), n_jobs))

    def threads(self, in_flight: int) -> int | None:
        """torch threads per job: the cores divided among the jobs that run at once on
        this machine (``jobs`` x threads <= cores; at most ``OMP_NUM_THREADS`` when set),
        ``cpus_per_task`` when given; None on a cluster (torch's default: the job's
        allocation) and on submitit's debug executor (it runs the jobs in this process)."""
        cpus = self.options.get("cpus_per_task")
        if isinstance(cpus, int) and not isinstance(cpus, bool) and cpus > 0:
            return cpus
        if self.kind == "submitit" and self.cluster != "local":
            return None
        threads = max(1, available_cores() // max(1, self.jobs or in_flight))
        try:
            return max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
        except (KeyError, ValueError):
            return threads


def load_launcher_config(path: str | Path) -> dict[str, Any]:
    """The submitit options of a YAML file: a mapping of option names to values."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--launcher-config {path}: no such file; expected a YAML mapping of submitit executor "
                        "options, e.g. slurm_partition: gpu")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--launcher-config {path} is not readable YAML ({first}); expected a mapping of submitit "
                        "executor options, e.g. slurm_partition: gpu") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"--launcher-config {path} holds a {type(data).__name__}; expected a mapping of submitit "
                        "executor options (KEY: VALUE, e.g. slurm_partition: gpu, timeout_min: 600)")
    return dict(data)


def parse_launcher_opts(pairs: Iterable[str] | None) -> dict[str, Any]:
    """``--launcher-opt KEY=VALUE`` pairs, values read as YAML (``gpus_per_node=1`` is an int)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--launcher-opt {pair!r} is invalid; expected KEY=VALUE, e.g. slurm_partition=gpu")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def make_launcher(kind: str = "local", jobs: int | None = None, config: str | Path | None = None,
                  opts: Iterable[str] | None = None, log: Callable[[str], None] = print) -> Launcher:
    """The launcher of ``--launcher``, ``--jobs``, ``--launcher-config``, ``--launcher-opt``,
    checked: a UserError names a bad value; more jobs than cores is only a warning."""
    kind = (kind or "local").strip().lower()
    if kind not in LAUNCHERS:
        raise UserError(f"--launcher {kind!r} is unknown; expected one of {', '.join(LAUNCHERS)}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise UserError(f"--jobs {jobs!r} is invalid; expected a positive integer (1: one row at a time)")
    cores = available_cores()
    if jobs is not None and jobs > cores and kind == "local":
        log(f"warning: --jobs {jobs} is more than the {cores} CPU cores here: the jobs will share cores "
            "(each gets one torch thread)")
    opts = list(opts or [])
    if kind == "local":
        if config is not None or opts:
            raise UserError("--launcher-config and --launcher-opt configure submitit jobs; add --launcher submitit "
                            "(or leave them out for local worker processes, --jobs N)")
        return Launcher("local", jobs if jobs is not None else 1)
    options = load_launcher_config(config) if config is not None else {}
    options.update(parse_launcher_opts(opts))
    cluster = options.get("cluster")
    if cluster is not None and cluster not in SUBMITIT_CLUSTERS:
        raise UserError(f"submitit option cluster={cluster!r} is unknown; expected one of {', '.join(SUBMITIT_CLUSTERS)}")
    with tempfile.TemporaryDirectory(prefix="dhat-seg-submitit-") as folder:  # refuse bad options before any work
        cluster = _executor(Launcher("submitit", jobs, options), Path(folder)).cluster
    if "cluster" not in options and cluster != "slurm":
        log(f"submitit: no Slurm here (no srun): the jobs run on submitit's {cluster} executor, on this machine")
    if cluster == "slurm" and not ({"timeout_min", "slurm_time"} & set(options)):
        log("warning: no timeout_min in the launcher options: submitit's Slurm default is a 5-minute time limit")
    return Launcher("submitit", jobs, {**options, "cluster": cluster})


def _executor(launcher: Launcher, folder: Path) -> Any:
    """submitit's executor for ``launcher``'s options, in ``folder``."""
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher submitit needs the submitit package: pip install submitit") from None
    options = {k: v for k, v in launcher.options.items() if k != "cluster"}
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=launcher.cluster)
        if executor.cluster == "local" and not ({"timeout_min", "local_timeout_min"} & set(options)):
            options["timeout_min"] = LOCAL_TIMEOUT_MIN
        executor.update_parameters(**options)
    except (NameError, AssertionError, ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"submitit refuses the launcher options {sorted(launcher.options)}: {first} (from "
                        "--launcher-config / --launcher-opt; e.g. slurm_partition, gpus_per_node, timeout_min, "
                        "cpus_per_task, mem_gb)") from None
    return executor


def _worker_init() -> None:
    """A local worker: in a process group of its own (a Ctrl-C reaches the study's process
    only, which forwards it once to each worker), ignoring SIGINT/SIGTERM while idle."""
    os.setpgrp()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def _stoppable(fn: Callable[[Any], Any], job: Any) -> Any:
    """``fn(job)`` in a local worker, SIGINT/SIGTERM stopping it: at once (``Interrupted``),
    or at the next safe point where the work enters its own GracefulStop (training)."""
    def stop_now(signum: int, frame: Any) -> None:
        raise Interrupted(signum, f"{signal.Signals(signum).name} received; stopped at once")

    previous = {s: signal.signal(s, stop_now) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return fn(job)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Pool:
    """Local worker processes ('spawn': a clean interpreter each, CUDA-safe)."""

    def __init__(self, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # each worker in a process group of its own: a Ctrl-C reaches this process only, which
        # forwards it once to every worker (stop), so a worker never sees a stop twice
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_init)

    def submit(self, fn: Callable[[Any], Any], job: Any) -> Any:
        return self.pool.submit(_stoppable, fn, job)

    def stop(self) -> None:
        """Ask every worker's row to stop (SIGINT: training at its next safe point, the
        evaluation at once, its AutoAttack state kept); idle workers ignore it."""
        for pid in list(getattr(self.pool, "_processes", None) or {}):
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def where(self, handle: Any) -> str:
        return "in a worker process"

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


class _Submitit:
    """One submitit job per row x seed."""

    def __init__(self, launcher: Launcher, folder: Path):
        self.executor = _executor(launcher, folder)
        self.jobs: list[Any] = []

    def submit(self, fn: Callable[[Any], Any], job: Any) -> Any:
        self.executor.update_parameters(name=f"dhat-seg-{Path(job.run_dir).name}")
        handle = self.executor.submit(fn, job)
        self.jobs.append(handle)
        return handle

    def where(self, handle: Any) -> str:
        return f"as submitit job {handle.job_id} ({self.executor.cluster})"

    def stop(self) -> None:
        """Cancel the jobs not done (a study stopped here does not wait for its cluster jobs)."""
        self.close(cancel=True)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for job in self.jobs:
                if not job.done():
                    job.cancel(check=False)


def plan_all(ctx: Any, work: list[tuple[Any, Any, Any]], write: Callable[[], dict[str, Any]]) -> list[tuple[Any, Any]]:
    """Settle every (row, seed config, seed evaluation options) of ``work`` here, in the table's
    order (reused, skipped, pending rows); returns the (row, job) pairs left to run."""
    planned: list[tuple[Any, Any]] = []
    for row, seed_base, seed_eval in work:
        t0 = time.time()
        try:
            job = ctx.plan(row, seed_base, seed_eval)
        except Exception as exc:
            ctx.fail(row, failure_status(exc), traceback.format_exc())
            job = None
        if job is None:
            row.seconds = round(time.time() - t0, 1)
        else:
            planned.append((row, job))
    write()
    return planned


def provision_all(ctx: Any, planned: list[tuple[Any, Any]], write: Callable[[], dict[str, Any]]) -> list[tuple[Any, Any]]:
    """The shared attention model and every training mask cache of the jobs to train, built
    here, once each, one after another, before any job starts (on every path, sequential or
    fanned out, so a row's evaluation finds the same cache whichever path runs it); a job
    whose provisioning failed is marked failed. Returns the (row, job) pairs still to run."""
    from dhat_seg.run.experiment import provision_attention

    provisioned: dict[str, tuple[str, str] | None] = {}  # setting -> None, or (status, traceback) of its failure
    ready: list[tuple[Any, Any]] = []
    for row, job in planned:
        if job.train:
            key = dataclasses.replace(job.cfg, seed=0).digest()
            if key not in provisioned:
                try:
                    provision_attention(job.cfg, root=ctx.root, log=ctx.log, progress=ctx.progress)
                    provisioned[key] = None
                except Exception as exc:
                    provisioned[key] = (failure_status(exc), traceback.format_exc())
            failure = provisioned[key]
            if failure is not None:
                ctx.fail(row, *failure)
                write()
                continue
        ready.append((row, job))
    return ready


def fan_out(ctx: Any, work: list[tuple[Any, Any, Any]], launcher: Launcher, write: Callable[[], dict[str, Any]],
            job_fn: Callable[[Any], dict[str, Any]], poll_s: float = 0.2) -> dict[str, Any]:
    """Run a study's rows with ``launcher``: ``ctx`` (run.py's ``_StudyRun``) plans each
    (row, seed config, seed evaluation options) of ``work`` here and provisions their
    attention (:func:`plan_all`, :func:`provision_all`), ``job_fn`` (picklable) runs each job
    left; returns the table's final content (``write``)."""
    log, command = ctx.log, ctx.command
    planned = plan_all(ctx, work, write)
    if not planned:
        return write()
    cap = launcher.in_flight(len(planned))
    threads = launcher.threads(cap)
    ready = collections.deque((row, dataclasses.replace(job, threads=threads, progress=False))
                              for row, job in provision_all(ctx, planned, write))
    if not ready:
        return write()
    log(f"{command}: {len(ready)} row run(s) left, {cap} at once "
        f"({'submitit' if launcher.kind == 'submitit' else 'local worker processes'}"
        f"{f', {threads} torch thread(s) each' if threads else ''})")
    backend: _Pool | _Submitit = (_Submitit(launcher, ctx.out / ".submitit") if launcher.kind == "submitit"
                                  else _Pool(cap))
    running: dict[Any, tuple[Any, Any, float]] = {}
    stopping: int | None = None  # the signal that stops the study, once one has
    with GracefulStop() as stop:  # SIGINT/SIGTERM here: stop every row at its next safe point
        try:
            while ready or running:
                if stopping is None and stop.requested() is not None:
                    stopping = _stop_all(ctx, backend, running, stop.requested(), "the study's process")
                while stopping is None and ready and len(running) < cap:
                    row, job = ready.popleft()
                    handle = backend.submit(job_fn, job)
                    running[handle] = (row, job, time.time())
                    log(f"{command}: row {job.name}: started {backend.where(handle)}: "
                        f"{'resuming' if job.resume and job.train else 'training' if job.train else 'evaluating'} "
                        f"in {job.run_dir}")
                if stopping is not None and (isinstance(backend, _Submitit) or not running):
                    break
                finished = [h for h in running if h.done()]
                if not finished:
                    time.sleep(poll_s)
                    continue
                for handle in finished:
                    row, job, t0 = running.pop(handle)
                    signum = _collect(ctx, row, job, handle)
                    row.seconds = round(time.time() - t0, 1)
                    write()
                    if signum is not None and stopping is None and isinstance(backend, _Pool):  # a local worker
                        # stopped by a signal of its own (a cluster job's, e.g. a time limit, fails its row only)
                        stopping = _stop_all(ctx, backend, running, signum, f"the worker of row {job.name}")
            if stopping is not None:
                raise Interrupted(stopping, f"the {command} stopped: finished rows and epochs are kept (interrupted "
                                            "rows resume from their last checkpoint)")
        except KeyboardInterrupt:  # Interrupted above, or a second signal: stop at once
            for row, _, _ in running.values():
                row.status = "failed: interrupted"
            if running and isinstance(backend, _Pool):
                backend.stop()  # a second stop: training stops at once too
            backend.close(cancel=True)
            write()
            raise
    backend.close()
    return write()


def _stop_all(ctx: Any, backend: Any, running: Mapping[Any, Any], signum: int, source: str) -> int:
    """Stop the study: no row starts any more and every running one is asked to stop at its
    next safe point; returns ``signum``."""
    ctx.log(f"{ctx.command}: {signal.Signals(signum).name} received by {source}: stopping the study "
            f"({len(running)} running row run(s) stop at their next safe point; no new one starts)")
    backend.stop()
    return signum


def _collect(ctx: Any, row: Any, job: Any, handle: Any) -> int | None:
    """A finished job's row: concluded from its report, or failed with its error; returns
    the signal number that stopped the job (None: it was not stopped by a signal)."""
    try:
        result = handle.result()
    except Exception as exc:  # the job itself died (killed, timed out, lost)
        result = {"error": failure_status(exc), "traceback": traceback.format_exc()}
    if "error" in result:
        ctx.fail(row, result["error"], result["traceback"])
        return result.get("signal")
    try:
        ctx.conclude(row, result["report"], reused=False)
    except Exception as exc:
        ctx.fail(row, failure_status(exc), traceback.format_exc())
        return None
    ctx.log(f"{ctx.command}: row {job.name}: finished, {row.status}")
    return None
