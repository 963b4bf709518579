"""Running a study (:class:`~dhat_seg.ablate.study.Study`): every row once per seed,
reusing finished rows and resuming interrupted ones. :func:`run_ablation` is the attention
ablation; ``dhat-seg compare`` runs its method rows through :func:`run_study` too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from dhat_seg.convergence import DEFAULT_THRESHOLD, run_verdict
from dhat_seg.config import TrainConfig
from dhat_seg.errors import UserError
from dhat_seg.evaluation_report import EVAL_FILE, EvalOptions, run_eval
from dhat_seg.ablate.rows import (AblatePreset, Row, SeedRows, _alternate_dir, attention_study, run_dir_for,
    sanity_status)
from dhat_seg.ablate.output import write_outputs
from dhat_seg.ablate.study import Study


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


#: status of a row not finished when ``report_only`` writes the table
PENDING_REPORT_ONLY = "pending: not finished yet (--report-only runs nothing)"


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
) -> dict[str, Any]:
    """The attention ablation: :func:`run_study` of the attention rows ("-" and method
    names) with the methods' checkpoints and options; returns ablation.json's content."""
    checkpoints = dict(checkpoints or {})
    for name in sorted(set(checkpoints) - set(rows)):
        log(f"ablate: warning: --attention-checkpoint {name}=... is not used: no row {name!r} (rows: {', '.join(rows)})")
    return run_study(attention_study(checkpoints, attention_options), rows, base, eval_options, out, seeds=seeds,
                     cache_dir=cache_dir, unavailable=unavailable, preset=preset, overrides=overrides, log=log,
                     progress=progress, trainer_factory=trainer_factory, report_only=report_only,
                     convergence_threshold=convergence_threshold)


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
) -> dict[str, Any]:
    """Train and evaluate every row (its config: ``study.config``) with the sanity checks
    once per seed (default: the base config's seed), write the table files
    (OUT/<study.stem>.*), return the JSON's content. Rows in ``unavailable`` and rows
    that ``study.readiness`` refuses are skipped with the reason. ``report_only``: train and
    evaluate nothing; write the table of the rows finished so far (the others "pending").
    A row whose validation accuracy still moved by more than ``convergence_threshold``
    points over its last 2 epochs is marked in the status column
    (:mod:`dhat_seg.convergence`).

    Seed by seed: every row of the first seed, then of the next, so that a complete
    table of the first seed exists early. Training and evaluation of seed ``s`` run with
    ``seed=s`` (data, training, attacks)."""
    from dhat_seg.attention_model import cache_root
    from dhat_seg.data import split_for
    from dhat_seg.experiment import Experiment

    trainer_factory = trainer_factory or Experiment
    study = study.for_preset(preset.name if preset else None)
    command = study.command
    seeds = list(seeds) if seeds else [base.seed]
    if len(set(seeds)) != len(seeds) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise UserError(f"seeds {seeds} are invalid; expected distinct non-negative integers")
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
                                     "not have (the built-in synthetic data has them: --set data=synthetic)")
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
        return write_outputs(out, table, meta | {"seconds": round(time.time() - started, 1)}, preset, study)

    for seed in seeds:
        seed_base = dataclasses.replace(base, seed=seed)
        seed_eval = dataclasses.replace(eval_options, seed=seed)
        seed_settings = seed_eval.result_settings()
        for entry in table:
            row = entry.runs[seed]
            name = f"{row.label}, seed {seed}" if multi else row.label
            run_dir = run_dir_for(out, row.key, seed, multi)
            row.run_dir = str(run_dir)
            t0 = time.time()
            try:
                if row.name in unavailable:
                    row.status = f"skipped: {unavailable[row.name]}"
                    continue
                cfg = study.config(seed_base, row.name)
                row.trains = describe_config(cfg)
                problem = study.readiness(row.name, cfg)
                if problem:
                    row.status = f"skipped: {problem}"
                    continue
                report = _finished(run_dir, cfg, seed_settings)
                if report is None:  # finished in the other layout (single seed <-> several seeds)?
                    other = _alternate_dir(out, row.key, seed, multi)
                    report = _finished(other, cfg, seed_settings)
                    if report is not None:
                        run_dir = other
                        row.run_dir = str(run_dir)
                reused = report is not None
                if not reused and report_only:
                    row.status = PENDING_REPORT_ONLY
                    continue
                if reused:
                    log(f"{command}: row {name}: finished earlier in {run_dir}, reused")
                else:
                    done = (run_dir / "summary.json").is_file() and \
                        json.loads((run_dir / "summary.json").read_text()).get("config_digest") == cfg.digest()
                    if not done:
                        resume = (run_dir / "config.yaml").is_file()
                        log(f"{command}: row {name}: {'resuming' if resume else 'training'} {describe_config(cfg)} in {run_dir}")
                        trainer_factory(cfg, run_dir, cache_dir=root, log=log, progress=progress).run(resume=resume)
                    log(f"{command}: row {name}: evaluating")
                    report = run_eval(run_dir, dataclasses.replace(seed_eval, cache_dir=str(root), output=None), log=log)
                row.metrics, row.sanity = metrics_from_report(report), report["sanity"]
                row.status = sanity_status(row.sanity, reused)
                row.convergence = run_verdict(run_dir, threshold=convergence_threshold).to_dict()
                if row.climbing:
                    log(f"{command}: row {name}: {row.climbing} (validation accuracy; see {run_dir / 'metrics.jsonl'})")
                if row.suspect:
                    log(f"{command}: row {name}: {row.status} (details in {run_dir / EVAL_FILE}, \"sanity\")")
            except KeyboardInterrupt:
                row.status = "failed: interrupted"
                write()
                raise
            except Exception as exc:  # one failing row must not lose the others
                message = str(exc).splitlines()[0] if str(exc) else ""
                row.status = f"failed: {type(exc).__name__}: {message}" if not isinstance(exc, UserError) else f"failed: {message}"
                try:
                    Path(row.run_dir).mkdir(parents=True, exist_ok=True)
                    (Path(row.run_dir) / "error.log").write_text(traceback.format_exc())
                except OSError:
                    pass
                log(f"{command}: row {name} {row.status} (traceback in {row.run_dir}/error.log)")
            finally:
                row.seconds = round(time.time() - t0, 1)
                write()
    return write()
