"""Running a study (:class:`~dhat_seg.studies.study.Study`): every row once per seed,
reusing finished rows and resuming interrupted ones. :func:`run_ablation` is the attention
ablation; ``dhat-seg compare`` runs its method rows through :func:`run_study` too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from dhat_seg.evaluation.convergence import DEFAULT_THRESHOLD, run_verdict
from dhat_seg.config import TrainConfig
from dhat_seg.errors import Interrupted, UserError
from dhat_seg.evaluation.report import EVAL_FILE, EvalOptions, run_eval
from dhat_seg.studies.rows import (PENDING, AblatePreset, Row, SeedRows, _alternate_dir, attention_study, run_dir_for,
                                   sanity_status)
from dhat_seg.studies.cost import run_cost
from dhat_seg.studies.launch import Launcher, failure_status, fan_out, plan_all, provision_all
from dhat_seg.studies.output import write_outputs
from dhat_seg.studies.study import Study


# ---------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------


def _finished(run_dir: Path, cfg: TrainConfig, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The row's eval.json when training and evaluation, sanity checks included, are
    complete for these settings."""
    summary, report = run_dir / "summary.json", run_dir / EVAL_FILE
    if not (summary.is_file() and report.is_file()):
        return None
    try:
        s, r = json.loads(summary.read_text()), json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    digest = cfg.digest()
    if s.get("config_digest") != digest or r.get("config_digest") != digest or r.get("eval_settings") != settings:
        return None
    if not (isinstance(r.get("sanity"), dict) and r["sanity"].get("checks")):
        return None  # evaluated without the sanity checks: evaluate again rather than show it unchecked
    if r["sanity"].get("alpha") is None:
        return None  # checked by the old rules (no tests, no p-values): evaluate again
    return r


def _reusable(dirs: tuple[Path, ...], cfg: TrainConfig, settings: dict[str, Any]) -> Path | None:
    """A run finished for this config and these evaluation settings in another study's
    folder (``--reuse DIR``: DIR/<row>/ or DIR/seed-<s>/<row>/), or None."""
    for root in dirs:
        for summary in sorted([*root.glob("*/summary.json"), *root.glob("seed-*/*/summary.json")]):
            if _finished(summary.parent, cfg, settings) is not None:
                return summary.parent
    return None


def metrics_from_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """Table values of one eval.json."""
    acc, ex = report.get("accuracy", {}), report.get("examples", {})
    gap, bg, iou = report.get("robust_gap"), report.get("bg_gap"), report.get("attention_iou")
    bc = report.get("background_challenge") or {}
    return {
        "clean": acc.get("clean"), "pgd10": acc.get("pgd10"), "pgd20": acc.get("pgd20"), "cw": acc.get("cw"),
        "aa": acc.get("aa"),
        "worst_case": acc.get("worst_case"),
        "robust_gap": gap["gap"] if gap else None,
        "robust_gap_train": gap["train_accuracy"] if gap else None,
        "bg_gap": bg["clean"]["gap"] if bg else None,
        "bg_gap_pgd10": bg["pgd10"]["gap"] if bg else None,
        "mixed_rand": bc.get("mixed_rand"), "only_fg": bc.get("only_fg"), "no_fg_bg_class": bc.get("no_fg_bg_class"),
        "mixed_rand_pgd10": bc.get("pgd10", {}).get("mixed_rand"), "only_fg_pgd10": bc.get("pgd10", {}).get("only_fg"),
        "iou": iou.get("mean_iou") if iou else None,
        "n_test": ex.get("clean"), "n_aa": ex.get("aa"), "n_gap_train": gap["n_train"] if gap else None,
    }


def describe_config(cfg: TrainConfig) -> str:
    """What a row trains, from its config: "at", "trades + AWP (gamma 0.005, 1 warm-up epochs)",
    "dhat (base mart) + gradcam"."""
    from dhat_seg.training_methods import TRAINING_METHODS, reads_base

    text = cfg.method
    if reads_base(cfg.method) and cfg.base != "at":
        text += f" (base {cfg.base})"
    if cfg.awp:
        text += f" + AWP (gamma {cfg.awp_gamma:g}, {cfg.awp_warmup} warm-up epochs)"
    if cfg.method in TRAINING_METHODS and TRAINING_METHODS[cfg.method].cls.needs_attention:
        text += f" + {cfg.attention}"
    return text


def _reads_oracle(study: Study, base: TrainConfig, name: str) -> bool:
    """Whether the row's method reads the oracle's masks (a row whose config cannot be
    made says why when it runs)."""
    from dhat_seg.training_methods import TRAINING_METHODS

    try:
        cfg = study.config(base, name)
    except Exception:
        return False
    entry = TRAINING_METHODS.get(cfg.method)
    return entry is not None and entry.cls.needs_attention and cfg.attention == "oracle"


def run_ablation(
    rows: list[str],
    base: TrainConfig,
    eval_options: EvalOptions,
    out: Path,
    *,
    seeds: list[int] | None = None,
    cache_dir: str | Path | None = None,
    checkpoints: Mapping[str, str] | None = None,
    attention_options: Mapping[str, Mapping[str, Any]] | None = None,
    unavailable: Mapping[str, str] | None = None,
    preset: AblatePreset | None = None,
    overrides: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    progress: bool = True,
    trainer_factory: Callable[..., Any] | None = None,
    report_only: bool = False,
    convergence_threshold: float = DEFAULT_THRESHOLD,
    launcher: Launcher | None = None,
    reuse: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """The attention ablation: :func:`run_study` of the attention rows ("-" and method
    names) with the methods' checkpoints and options; returns ablation.json's content."""
    checkpoints = dict(checkpoints or {})
    for name in sorted(set(checkpoints) - set(rows)):
        log(f"ablate: warning: --attention-checkpoint {name}=... is not used: no row {name!r} (rows: {', '.join(rows)})")
    return run_study(attention_study(checkpoints, attention_options), rows, base, eval_options, out, seeds=seeds,
                     cache_dir=cache_dir, unavailable=unavailable, preset=preset, overrides=overrides, log=log,
                     progress=progress, trainer_factory=trainer_factory, report_only=report_only,
                     convergence_threshold=convergence_threshold, launcher=launcher, reuse=reuse)


def run_study(
    study: Study,
    rows: list[str],
    base: TrainConfig,
    eval_options: EvalOptions,
    out: Path,
    *,
    seeds: list[int] | None = None,
    cache_dir: str | Path | None = None,
    unavailable: Mapping[str, str] | None = None,
    preset: AblatePreset | None = None,
    overrides: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    progress: bool = True,
    trainer_factory: Callable[..., Any] | None = None,
    report_only: bool = False,
    convergence_threshold: float = DEFAULT_THRESHOLD,
    launcher: Launcher | None = None,
    reuse: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """Train and evaluate every row (its config: ``study.config``) with the sanity checks
    once per seed (default: the base config's seed), write the table files
    (OUT/<study.stem>.*), return the JSON's content. Rows in ``unavailable`` and rows
    that ``study.readiness`` refuses are skipped with the reason. ``report_only``: train and
    evaluate nothing; write the table of the rows finished so far (the others "pending").
    A row whose validation accuracy still moved by more than ``convergence_threshold``
    points over its last 2 epochs is marked in the status column
    (:mod:`dhat_seg.evaluation.convergence`).

    Seed by seed: every row of the first seed, then of the next, so that a complete
    table of the first seed exists early. Training and evaluation of seed ``s`` run with
    ``seed=s`` (data, training, attacks).

    ``launcher`` (:mod:`dhat_seg.studies.launch`): None or one job at a time on the local
    machine runs the rows here, one after another; otherwise the rows to run are fanned out
    (local worker processes or submitit jobs), with the attention models and mask caches
    provisioned here first; reuse, resume, failures and the table are the same.

    ``reuse``: folders of other studies; a row x seed not finished in ``out`` whose run
    directory does not exist yet is copied from a run finished there with the same config
    digest and evaluation settings (e.g. a comparison's UIAT rows from an ablation's)
    instead of being trained again.
    ``trainer_factory`` must then be picklable (a top-level class)."""
    from dhat_seg.attention.model import cache_root
    from dhat_seg.data import split_for

    study = study.for_preset(preset.name if preset else None)
    command = study.command
    seeds = list(seeds) if seeds else [base.seed]
    if len(set(seeds)) != len(seeds) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise UserError(f"seeds {seeds} are invalid; expected distinct non-negative integers")
    for folder in reuse:
        if not Path(folder).is_dir():
            raise UserError(f"--reuse {folder} is not a folder; expected the output folder of another "
                            "ablate or compare study (its run directories are copied from there)")
    multi = len(seeds) > 1
    base = dataclasses.replace(base, seed=seeds[0], data_seed=base.data_seed if base.data_seed is not None else seeds[0])
    unavailable = dict(unavailable or {})
    # fail once, before any row, when the data is missing (e.g. CIFAR-10 without --set download=true)
    try:
        train_data = split_for(base, "train")
    except UserError as exc:
        raise UserError(f"{exc} (for dhat-seg {command}: --set download=true or --set data_root=PATH)") from None
    if getattr(train_data, "gt_masks", None) is None:
        for name in rows:
            if name not in unavailable and _reads_oracle(study, base, name):
                unavailable[name] = (f"the oracle reads ground-truth foreground masks, which the {base.data!r} data does "
                                     "not have (the built-in data have them: --set data=synthetic; an image folder, in ROOT/masks/)")
    out.mkdir(parents=True, exist_ok=True)
    root = cache_root(cache_dir)
    eval_options = dataclasses.replace(eval_options, sanity=True)  # every row checks for gradient masking
    settings = eval_options.result_settings()
    table = [SeedRows(name, {s: Row(name, seed=s, study=study) for s in seeds}, study=study) for name in rows]
    started = time.time()
    meta = {"preset": preset.name if preset else None, "preset_description": preset.description if preset else None,
            "overrides": dict(overrides or {}), "out": str(out), "cache_dir": str(root), "base_config": base.to_dict(),
            "eval_settings": settings, "seeds": seeds}
    if multi:
        meta["base_config"] = {**meta["base_config"], "seed": seeds}
        meta["eval_settings"] = {**settings, "seed": seeds}

    def write() -> dict[str, Any]:
        # report only: no wall time, so that a report regenerated from the run folders is the same file
        seconds = None if report_only else round(time.time() - started, 1)
        return write_outputs(out, table, meta | {"seconds": seconds}, preset, study)

    ctx = _StudyRun(study=study, out=out, multi=multi, unavailable=unavailable, report_only=report_only, root=root,
                    log=log, progress=progress, trainer_factory=trainer_factory,
                    convergence_threshold=convergence_threshold, reuse=tuple(Path(r) for r in reuse))
    work = [(entry.runs[seed], dataclasses.replace(base, seed=seed), dataclasses.replace(eval_options, seed=seed))
            for seed in seeds for entry in table]
    if launcher is not None and launcher.fans_out:
        return fan_out(ctx, work, launcher, write, run_row_job)
    for row, job in provision_all(ctx, plan_all(ctx, work, write), write):
        t0 = time.time()
        try:
            ctx.conclude(row, run_row(job, log=log), reused=False)
        except KeyboardInterrupt:
            row.status = "failed: interrupted"
            write()
            raise
        except Exception as exc:  # one failing row must not lose the others
            ctx.fail(row, failure_status(exc), traceback.format_exc())
        finally:
            row.seconds = round(time.time() - t0, 1)
            write()
    return write()


# ---------------------------------------------------------------------------------
# One row x seed: planned and concluded by the study's process, run by run_row anywhere
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowJob:
    """One row x seed to train (or resume) and evaluate in its run directory: what
    :func:`run_row` needs, picklable (it travels to worker processes and submitit jobs)."""

    command: str
    #: the row's name in messages, e.g. "Grad-CAM, seed 1"
    name: str
    cfg: TrainConfig
    run_dir: str
    #: the seed's evaluation options (with the cache directory, no output file)
    eval_options: EvalOptions
    cache_dir: str
    #: train first (False: training finished, evaluate only)
    train: bool
    #: resume the training in ``run_dir`` (its config.yaml exists)
    resume: bool
    progress: bool = True
    #: torch threads of the process running it (None: leave them)
    threads: int | None = None
    #: the trainer (default :class:`~dhat_seg.run.experiment.Experiment`)
    trainer_factory: Callable[..., Any] | None = None


def run_row(job: RowJob, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or resume) and evaluate one row x seed in its run directory; returns the
    evaluation's report (eval.json). The one function that runs a row, whether the study
    runs its rows here one after another, in local worker processes or as submitit jobs."""
    from dhat_seg.run.experiment import Experiment

    if log is None:
        def log(message: str) -> None:
            print(message, file=sys.stderr, flush=True)
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    run_dir = Path(job.run_dir)
    if job.train:
        log(f"{job.command}: row {job.name}: {'resuming' if job.resume else 'training'} {describe_config(job.cfg)} in {run_dir}")
        factory = job.trainer_factory or Experiment
        factory(job.cfg, run_dir, cache_dir=Path(job.cache_dir), log=log, progress=job.progress).run(resume=job.resume)
    log(f"{job.command}: row {job.name}: evaluating")
    return run_eval(run_dir, job.eval_options, log=log)


def run_row_job(job: RowJob) -> dict[str, Any]:
    """:func:`run_row` as a job of its own process: never raises; returns ``{"report":
    ...}``, or ``{"error": status, "traceback": text}`` as the study reports a failed row."""
    try:
        return {"report": run_row(job)}
    except Exception as exc:
        return {"error": failure_status(exc), "traceback": traceback.format_exc()}
    except KeyboardInterrupt as exc:  # SIGINT/SIGTERM of this job: "signal" tells the study to stop
        return {"error": f"failed: interrupted ({exc})".replace(" ()", ""), "traceback": traceback.format_exc(),
                "signal": exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)}


@dataclasses.dataclass
class _StudyRun:
    """The settings shared by the rows of one :func:`run_study` call, and what the study's
    own process does for a row before (:meth:`plan`) and after (:meth:`conclude`,
    :meth:`fail`) it runs."""

    study: Study
    out: Path
    multi: bool
    unavailable: Mapping[str, str]
    report_only: bool
    root: Path
    log: Callable[[str], None]
    progress: bool
    trainer_factory: Callable[..., Any] | None
    convergence_threshold: float
    #: folders of other studies whose finished runs may be copied in (``--reuse``)
    reuse: tuple[Path, ...] = ()

    @property
    def command(self) -> str:
        return self.study.command

    def name(self, row: Row) -> str:
        return f"{row.label}, seed {row.seed}" if self.multi else row.label

    def plan(self, row: Row, seed_base: TrainConfig, seed_eval: EvalOptions) -> RowJob | None:
        """The row's job, or None when nothing is left to run: skipped, reused (concluded
        here) or pending (``report_only``); sets its run directory and what it trains."""
        seed = seed_base.seed
        run_dir = run_dir_for(self.out, row.key, seed, self.multi)
        row.run_dir = str(run_dir)
        if row.name in self.unavailable:
            row.status = f"skipped: {self.unavailable[row.name]}"
            return None
        cfg = self.study.config(seed_base, row.name)
        row.trains = describe_config(cfg)
        problem = self.study.readiness(row.name, cfg)
        if problem:
            row.status = f"skipped: {problem}"
            return None
        seed_settings = seed_eval.result_settings()
        report = _finished(run_dir, cfg, seed_settings)
        if report is None:  # finished in the other layout (single seed <-> several seeds)?
            other = _alternate_dir(self.out, row.key, seed, self.multi)
            report = _finished(other, cfg, seed_settings)
            if report is not None:
                run_dir = other
                row.run_dir = str(run_dir)
        if report is None and self.reuse and not run_dir.exists():
            source = _reusable(self.reuse, cfg, seed_settings)
            if source is not None:
                shutil.copytree(source, run_dir)
                self.log(f"{self.command}: row {self.name(row)}: the same run finished in {source}, copied to {run_dir}")
                report = _finished(run_dir, cfg, seed_settings)
        if report is not None:
            self.log(f"{self.command}: row {self.name(row)}: finished earlier in {run_dir}, reused")
            # a report-only table reads every row from its folder: the status is its verdict ("ok")
            self.conclude(row, report, reused=not self.report_only)
            return None
        if self.report_only:
            row.status = PENDING
            return None
        summary = run_dir / "summary.json"
        done = summary.is_file() and json.loads(summary.read_text()).get("config_digest") == cfg.digest()
        return RowJob(command=self.command, name=self.name(row), cfg=cfg, run_dir=str(run_dir),
                      eval_options=dataclasses.replace(seed_eval, cache_dir=str(self.root), output=None),
                      cache_dir=str(self.root), train=not done, resume=(run_dir / "config.yaml").is_file(),
                      progress=self.progress, trainer_factory=self.trainer_factory)

    def conclude(self, row: Row, report: Mapping[str, Any], *, reused: bool) -> None:
        """The row's table values, sanity status and convergence verdict from its report."""
        run_dir = Path(row.run_dir)
        row.metrics, row.sanity = metrics_from_report(report), report["sanity"]
        row.status = sanity_status(row.sanity, reused)
        row.convergence = run_verdict(run_dir, threshold=self.convergence_threshold).to_dict()
        row.cost = run_cost(run_dir)
        if row.climbing:
            self.log(f"{self.command}: row {self.name(row)}: {row.climbing} (validation accuracy; see {run_dir / 'metrics.jsonl'})")
        if row.suspect:
            self.log(f"{self.command}: row {self.name(row)}: {row.status} (details in {run_dir / EVAL_FILE}, \"sanity\")")

    def fail(self, row: Row, status: str, trace: str) -> None:
        """A failed row: its status, the traceback in RUN/error.log, one line in the log."""
        row.status = status
        try:
            Path(row.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(row.run_dir) / "error.log").write_text(trace)
        except (OSError, TypeError):
            pass
        self.log(f"{self.command}: row {self.name(row)} {row.status} (traceback in {row.run_dir}/error.log)")
