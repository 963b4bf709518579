"""The attention ablation (DHAT Table 10): one run per attention method, same settings.

Rows: "-" is UIAT (the same pipeline without background extraction, method ``uiat``);
every other row is DHAT with one attention method (gradcam, ig, solo, sam, and any
installed third-party method). Each row is a run directory under the output folder:

    OUT/uiat/, OUT/gradcam/, ...     config.yaml, metrics.jsonl, checkpoints/, summary.json, eval.json
    OUT/ablation.{md,csv,json,png}   the table, rewritten after every row

Every row is evaluated with the gradient-masking sanity checks of ``dhat-seg eval
--sanity`` (:mod:`dhat_seg.sanity`); a row that fails one is ``suspect: <check> failed``,
in the table and the plot, never a plain result. A row whose ``summary.json`` and
``eval.json`` (with its sanity results) match its config and the evaluation settings is
reused, an interrupted row resumes from its last checkpoint, a row that raises is
reported as ``failed: <error>`` (traceback in OUT/<row>/error.log), and a method that
cannot run (``spec.readiness`` says why, e.g. no SAM checkpoint) is ``skipped: <reason>``.
The table is produced in every case.

All DHAT rows whose method reads a classifier (Grad-CAM, IG, SAM prompted at CAM
peaks) share one frozen, normally trained attention model, trained once into the cache.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
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
#: Row order of the paper's Table 10; other methods follow alphabetically.
PAPER_ORDER = ("-", "gradcam", "ig", "solo", "sam")
DISPLAY = {"-": "- (UIAT)", "gradcam": "Grad-CAM", "ig": "Integrated-Grad", "solo": "SOLO", "sam": "SAM"}

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


@dataclass
class Row:
    """One row of the ablation table."""

    name: str  # "-" or an attention method name
    status: str = "pending"  # "ok", "reused", "suspect: <check> failed[ (reused)]", "skipped: ...", "failed: ..."
    run_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    sanity: dict[str, Any] | None = None  # eval.json's "sanity": n, surrogate, passed, checks

    @property
    def label(self) -> str:
        return DISPLAY.get(self.name, self.name)

    @property
    def key(self) -> str:
        """Its run directory name."""
        return "uiat" if self.name == UIAT else self.name

    @property
    def suspect(self) -> bool:
        """It has results, but failed a gradient-masking sanity check."""
        return self.status.startswith("suspect:")

    @property
    def has_results(self) -> bool:
        return self.status in ("ok", "reused") or self.suspect

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.label, "attention": None if self.name == UIAT else self.name,
                "method": "uiat" if self.name == UIAT else "dhat", "status": self.status, "run_dir": self.run_dir,
                "seconds": self.seconds, **self.metrics, "sanity": self.sanity}


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
    known = [n for n in PAPER_ORDER if n in names]
    return known + sorted(n for n in names if n not in PAPER_ORDER)


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


def readiness(name: str, cfg: TrainConfig, spec) -> str | None:
    """None when the row can run, else why not, with the ``ablate`` option that fixes it."""
    opts = dict(cfg.attention_options or {})
    if cfg.attention_checkpoint:
        opts["checkpoint"] = cfg.attention_checkpoint
    problem = spec.readiness(opts)
    if problem and "checkpoint" in spec.default_options and not cfg.attention_checkpoint:
        problem += f" (for dhat-seg ablate: --attention-checkpoint {name}=PATH)"
    return problem


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
    """Train and evaluate every row (with the sanity checks), write the table files,
    return ablation.json's content."""
    from dhat_seg.attention_model import cache_root
    from dhat_seg.data import build_dataset
    from dhat_seg.plugin_manager import attention_methods
    from dhat_seg.trainer import Trainer

    trainer_factory = trainer_factory or Trainer
    checkpoints, attention_options, unavailable = dict(checkpoints or {}), dict(attention_options or {}), dict(unavailable or {})
    for name in sorted(set(checkpoints) - set(rows)):
        log(f"ablate: warning: --attention-checkpoint {name}=... is not used: no row {name!r} (rows: {', '.join(rows)})")
    # fail once, before any row, when the data is missing (e.g. CIFAR-10 without --set download=true)
    try:
        build_dataset(base.data, "train", root=base.data_root, download=base.download, seed=base.seed,
                      image_size=base.image_size, size=base.train_size, val_size=base.val_size, rho=base.rho)
    except UserError as exc:
        raise UserError(f"{exc} (for dhat-seg ablate: --set download=true or --set data_root=PATH)") from None
    out.mkdir(parents=True, exist_ok=True)
    root = cache_root(cache_dir)
    eval_options = dataclasses.replace(eval_options, sanity=True)  # every row checks for gradient masking
    settings = eval_options.result_settings()
    methods = attention_methods()
    table = [Row(name) for name in rows]
    started = time.time()
    meta = {"preset": preset.name if preset else None, "preset_description": preset.description if preset else None,
            "overrides": dict(overrides or {}), "out": str(out), "cache_dir": str(root), "base_config": base.to_dict(),
            "eval_settings": settings}

    for row in table:
        cfg = row_config(base, row.name, checkpoints, attention_options)
        row.run_dir = str(out / row.key)
        t0 = time.time()
        try:
            if row.name in unavailable:
                row.status = f"skipped: {unavailable[row.name]}"
                continue
            if row.name != UIAT:
                problem = readiness(row.name, cfg, methods[row.name])
                if problem:
                    row.status = f"skipped: {problem}"
                    continue
            run_dir = out / row.key
            report = _finished(run_dir, cfg, settings)
            reused = report is not None
            if reused:
                log(f"ablate: row {row.label}: finished earlier in {run_dir}, reused")
            else:
                done = (run_dir / "summary.json").is_file() and \
                    json.loads((run_dir / "summary.json").read_text()).get("config_digest") == cfg.digest()
                if not done:
                    resume = (run_dir / "config.yaml").is_file()
                    log(f"ablate: row {row.label}: {'resuming' if resume else 'training'} {cfg.method}"
                        f"{'' if row.name == UIAT else ' + ' + row.name} in {run_dir}")
                    trainer_factory(cfg, run_dir, cache_dir=root, log=log, progress=progress).run(resume=resume)
                log(f"ablate: row {row.label}: evaluating")
                report = run_eval(run_dir, dataclasses.replace(eval_options, cache_dir=str(root), output=None), log=log)
            row.metrics, row.sanity = metrics_from_report(report), report["sanity"]
            row.status = sanity_status(row.sanity, reused)
            if row.suspect:
                log(f"ablate: row {row.label}: {row.status} (details in {run_dir / EVAL_FILE}, \"sanity\")")
        except KeyboardInterrupt:
            row.status = "failed: interrupted"
            write_outputs(out, table, meta | {"seconds": round(time.time() - started, 1)}, preset)
            raise
        except Exception as exc:  # one failing row must not lose the others
            message = str(exc).splitlines()[0] if str(exc) else ""
            row.status = f"failed: {type(exc).__name__}: {message}" if not isinstance(exc, UserError) else f"failed: {message}"
            try:
                Path(row.run_dir).mkdir(parents=True, exist_ok=True)
                (Path(row.run_dir) / "error.log").write_text(traceback.format_exc())
            except OSError:
                pass
            log(f"ablate: row {row.label} {row.status} (traceback in {row.run_dir}/error.log)")
        finally:
            row.seconds = round(time.time() - t0, 1)
            write_outputs(out, table, meta | {"seconds": round(time.time() - started, 1)}, preset)
    return write_outputs(out, table, meta | {"seconds": round(time.time() - started, 1)}, preset)


# ---------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 and value != 0 else f"{value:.2f}"
    return str(value)


def _cell(row: Row, key: str, with_paper: bool) -> str:
    if not row.has_results:
        return "-"
    text = _fmt(row.metrics.get(key))
    paper = PAPER_TABLE10.get(row.name, {}).get(key) if with_paper else None
    return f"{text} ({paper:.2f})" if paper is not None else text


def markdown_table(rows: list[Row], with_paper: bool = False) -> str:
    """The table in Markdown; with ``with_paper``, paper values in parentheses."""
    cols = [("row", "attention")] + list(COLUMNS) + [("status", "status")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [r.label] + [_cell(r, k, with_paper) for k, _ in COLUMNS] + [r.status]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def paper_table() -> str:
    cols = [k for k, _ in COLUMNS if k in PAPER_TABLE10["-"]]
    lines = ["| attention | " + " | ".join(h for k, h in COLUMNS if k in cols) + " |", "|---|" + "|".join("---" for _ in cols) + "|"]
    for name, values in PAPER_TABLE10.items():
        lines.append(f"| {DISPLAY[name]} | " + " | ".join(f"{values[k]:.2f}" for k in cols) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path):
    """Grouped bars: one group per metric, one bar per row with results (IoU x 100).
    Suspect rows (a failed sanity check) are hatched, edged in red and named so in the
    legend. Returns the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure

    done = [r for r in rows if r.has_results]
    metrics = [(k, h) for k, h in COLUMNS if any(r.metrics.get(k) is not None for r in done)]
    fig = Figure(figsize=(max(6.0, 1.4 * len(metrics) + 2), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(done), 1)
    for i, r in enumerate(done):
        values = [float("nan") if r.metrics.get(k) is None else r.metrics[k] * (100 if k == "iou" else 1) for k, _ in metrics]
        marked = dict(hatch="//", edgecolor="red", linewidth=1.2) if r.suspect else {}
        ax.bar([j + (i - (len(done) - 1) / 2) * width for j in range(len(metrics))], values, width,
               label=f"{r.label} (suspect: failed a sanity check)" if r.suspect else r.label, **marked)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([h + (" x100" if k == "iou" else "") for k, h in metrics])
    ax.set_ylabel("percent / points")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title("dhat-seg ablate: attention methods" if done else "dhat-seg ablate: no finished rows yet")
    if done:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def write_outputs(out: Path, rows: list[Row], meta: Mapping[str, Any], preset: AblatePreset | None) -> dict[str, Any]:
    """ablation.md / .csv / .json / .png from the rows as they are now."""
    with_paper = bool(preset and preset.show_paper)
    data = {**meta, "rows": [r.to_dict() for r in rows], "table_markdown": markdown_table(rows, with_paper=with_paper)}
    if preset is not None and preset.show_paper:
        data["paper_table10"] = PAPER_TABLE10
    (out / "ablation.json").write_text(json.dumps(data, indent=2, default=str) + "\n")

    keys = [k for k, _ in COLUMNS] + [k for k, _ in EXTRA_COLUMNS] + ["worst_case", "robust_gap_train", "n_test", "n_aa", "n_gap_train"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "attention", "method", "status"] + keys + ["sanity", "sanity_n", "run_dir", "seconds"])
    for r in rows:
        d = r.to_dict()
        writer.writerow([d["row"], d["attention"] or "", d["method"], d["status"]] + ["" if d.get(k) is None else d[k] for k in keys]
                        + [sanity_summary(r.sanity), r.sanity["n"] if r.sanity else "",
                           d["run_dir"] or "", "" if r.seconds is None else r.seconds])
    (out / "ablation.csv").write_text(buf.getvalue())

    settings = meta.get("eval_settings", {})
    md = ["# dhat-seg ablate: attention methods (DHAT Table 10)", ""]
    if meta.get("preset"):
        md += [f"Preset `{meta['preset']}`: {meta.get('preset_description')}.", ""]
    if meta.get("overrides"):
        md += ["Overridden on the command line: " + ", ".join(f"`{k}={v}`" for k, v in meta["overrides"].items()) + ".", ""]
    md += [data["table_markdown"], ""]
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
        plot(rows, out / "ablation.png")
    except Exception as exc:  # a plotting problem must not lose the table
        print(f"warning: could not draw {out / 'ablation.png'}: {exc}", file=sys.stderr)
    return data


def base_config(preset: AblatePreset, overrides: Mapping[str, Any]) -> TrainConfig:
    """The shared training config: training preset <- ablate preset <- user overrides."""
    values = dict(preset.train)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return load_config(preset.base, values)
