"""Reading and reporting training runs: epoch tables, training curves, run comparisons.

A training run directory (written by ``dhat-seg train``) holds ``config.yaml``,
``metrics.jsonl`` (one JSON object per epoch), ``summary.json`` (final test results,
once training has finished) and ``checkpoints/``. This module turns those files into

* :class:`~dhat_seg.epoch_table.EpochTable` (in :mod:`dhat_seg.epoch_table`): an aligned,
  rounded text table of epoch records, one row at a time;
* :func:`load_run`: a :class:`RunRecord` read from a run directory, with a
  :class:`~dhat_seg.errors.UserError` naming the problem when it is not one;
* :func:`plot_runs`: one PNG of training curves (loss terms, validation accuracy,
  max |logit|) for one or several runs;
* :func:`compare_text`: several runs side by side as an aligned text table;
* :func:`report`: the last two together.

It is a pure library: nothing is printed, results are returned. It does not import
torch, so it is cheap to import from the CLI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from dhat_seg.errors import UserError

from dhat_seg.epoch_table import MISSING, _GAP, EpochTable, _is_loss_term, _is_number, default_columns, format_value, header_for  # noqa: F401

# The run directory layout (the same names as dhat_seg.run.trainer, which imports torch).
CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.yaml", "metrics.jsonl", "summary.json"

# ----------------------------------------------------------------------------- loading


@dataclass
class RunRecord:
    """One training run as read from its directory."""

    path: Path
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None


def _not_a_run(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a training run directory ({why}); "
                     f"expected a folder written by dhat-seg train")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (blank lines skipped); UserError naming the
    file and line of a line that is not a JSON object."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}, line {number}: not valid JSON ({exc.msg}); "
                            f"expected one JSON object per epoch") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {number}: expected a JSON object per epoch, "
                            f"got {type(record).__name__}")
        records.append(record)
    return records


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _read_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_run(path: str | Path) -> RunRecord:
    """Reads a run directory: config.yaml ({} when absent), metrics.jsonl (required;
    may be empty while the first epoch runs), summary.json (None until training ends)."""
    path = Path(path)
    if not path.exists():
        raise _not_a_run(path, "it does not exist")
    if not path.is_dir():
        raise _not_a_run(path, "it is a file, not a folder")
    metrics_path = path / METRICS_FILE
    if not metrics_path.is_file():
        raise _not_a_run(path, f"no {METRICS_FILE}")
    return RunRecord(path=path, name=path.resolve().name or str(path), config=_read_config(path / CONFIG_FILE),
                     metrics=read_metrics(metrics_path), summary=_read_summary(path / SUMMARY_FILE))


def display_names(runs: Sequence[RunRecord]) -> list[str]:
    """The runs' names, with the parent folder prepended where names repeat
    (``seed-0/gradcam`` and ``seed-1/gradcam``)."""
    names = [r.name for r in runs]
    return [f"{r.path.resolve().parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


# ----------------------------------------------------------------------------- plotting

_LINESTYLES = ("-", "--", ":", "-.")


def _series(metrics: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key``; epochs where it is missing or None are left out."""
    xs, ys = [], []
    for i, record in enumerate(metrics, start=1):
        value = record.get(key)
        if _is_number(value):
            xs.append(record.get("epoch", i))
            ys.append(float(value))
    return xs, ys


def _keys(runs: Sequence[RunRecord], wanted) -> list[str]:
    """The keys of every run's records that satisfy ``wanted``, in first-seen order."""
    seen: dict[str, None] = {}
    for run in runs:
        for record in run.metrics:
            for key in record:
                if wanted(key):
                    seen.setdefault(key, None)
    return list(seen)


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="grey", transform=ax.transAxes)


def _legend(ax, colour_items: list[tuple[str, str]], style_items: list[tuple[str, str]]) -> None:
    """A legend with colours and line styles explained separately."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linestyle="-", label=label) for label, c in colour_items]
    if len(style_items) > 1:
        handles += [Line2D([], [], color="black", linestyle=s, label=label) for label, s in style_items]
    if handles:
        ax.legend(handles=handles, fontsize=7)


def _loss_panel(ax, runs: Sequence[RunRecord], names: Sequence[str]) -> None:
    terms = _keys(runs, _is_loss_term)
    colours = {k: f"C{i % 10}" for i, k in enumerate(terms)}
    drawn = False
    for j, run in enumerate(runs):
        for key in terms:
            xs, ys = _series(run.metrics, key)
            if xs:
                ax.plot(xs, ys, color=colours[key], linestyle=_LINESTYLES[j % len(_LINESTYLES)], marker=".")
                drawn = True
    ax.set_title("training loss terms (epoch mean)")
    ax.set_ylabel("loss")
    if not drawn:
        _no_data(ax)
    _legend(ax, [(header_for(k), colours[k]) for k in terms],
            [(n, _LINESTYLES[j % len(_LINESTYLES)]) for j, n in enumerate(names)])


def _accuracy_panel(ax, runs: Sequence[RunRecord], names: Sequence[str]) -> None:
    styles = {"val_clean_acc": "-", "val_robust_acc": "--"}
    drawn = False
    for j, run in enumerate(runs):
        for key, style in styles.items():
            xs, ys = _series(run.metrics, key)
            if xs:
                ax.plot(xs, ys, color=f"C{j % 10}", linestyle=style, marker=".")
                drawn = True
    ax.set_title("validation accuracy")
    ax.set_ylabel("%")
    if not drawn:
        _no_data(ax)
    _legend(ax, [(n, f"C{j % 10}") for j, n in enumerate(names)], [("clean", "-"), ("robust (PGD)", "--")])


def _logit_panel(ax, runs: Sequence[RunRecord], names: Sequence[str]) -> None:
    keys = _keys(runs, lambda k: k.startswith("train_max_logit"))
    styles = {k: _LINESTYLES[i % len(_LINESTYLES)] for i, k in enumerate(keys)}
    positive = False
    for j, run in enumerate(runs):
        for key in keys:
            xs, ys = _series(run.metrics, key)
            if xs:
                ax.plot(xs, ys, color=f"C{j % 10}", linestyle=styles[key], marker=".")
                positive = positive or any(y > 0 for y in ys)
    ax.set_title("max |logit| (epoch maximum)")
    ax.set_ylabel("|logit|")
    if positive:
        ax.set_yscale("log")
    else:
        _no_data(ax)
    _legend(ax, [(n, f"C{j % 10}") for j, n in enumerate(names)],
            [(k[len("train_max_logit_"):] or k, s) for k, s in styles.items()])


def plot_runs(runs: Sequence[RunRecord], out_png: str | Path) -> Path:
    """Writes one PNG of training curves (Agg backend, no display): training loss
    terms (colour per term, line style per run), validation clean (solid) and robust
    (dashed) accuracy (colour per run), max |logit| on a log scale (colour per run, line
    style per input); x axis: epoch. Returns the path written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out_png = Path(out_png)
    names = display_names(runs)
    fig = Figure(figsize=(15.0, 4.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    _loss_panel(axes[0], runs, names)
    _accuracy_panel(axes[1], runs, names)
    _logit_panel(axes[2], runs, names)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle("dhat-seg training: " + (", ".join(names) if names else "no runs"))
    # fixed margins: tight_layout would draw the figure a second time (slow)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.85, wspace=0.25)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


# ----------------------------------------------------------------------------- comparison


def _best_record(metrics: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The last record marked best (the trainer marks each new best), or None."""
    marked = [r for r in metrics if r.get("best")]
    return marked[-1] if marked else None


def _setting(run: RunRecord, key: str) -> Any:
    if run.summary is not None and key in run.summary:
        return run.summary[key]
    return run.config.get(key)


def _attention(run: RunRecord) -> Any:
    if run.summary is not None and "attention" in run.summary:
        return run.summary["attention"]
    # only DHAT uses attention; other methods keep the (unused) default in their config
    return run.config.get("attention") if _setting(run, "method") == "dhat" else None


def _epochs(run: RunRecord) -> str:
    total = _setting(run, "epochs")
    done = run.metrics[-1].get("epoch", len(run.metrics)) if run.metrics else 0
    if total is None:
        return str(done) if run.metrics else MISSING
    return str(total) if done == total else f"{done}/{total}"


def _max_logit(run: RunRecord) -> float | None:
    values = [v for r in run.metrics for k, v in r.items() if k.startswith("train_max_logit") and _is_number(v)]
    return max(values) if values else None


def _total_seconds(run: RunRecord) -> float | None:
    values = [r["seconds"] for r in run.metrics if _is_number(r.get("seconds"))]
    return sum(values) if values else None


def _text(value: Any, key: str = "") -> str:
    if value is None:
        return MISSING
    return format_value(key, value) if _is_number(value) else str(value)


def comparison_rows(run: RunRecord) -> list[tuple[str, str]]:
    """(label, text) of one run for :func:`compare_text`."""
    last = run.metrics[-1] if run.metrics else {}
    best = _best_record(run.metrics) or {}
    summary = run.summary or {}
    best_epoch = best.get("epoch", summary.get("best_epoch"))
    n_test = summary.get("n_test")
    return [
        ("method", _text(_setting(run, "method"))),
        ("attention", _text(_attention(run))),
        ("model", _text(_setting(run, "model"))),
        ("data", _text(_setting(run, "data"))),
        ("epochs", _epochs(run)),
        ("seed", _text(_setting(run, "seed"), "epoch")),
        ("best epoch", _text(best_epoch, "epoch")),
        ("val clean % (final)", _text(last.get("val_clean_acc"), "val_clean_acc")),
        ("val robust % (final)", _text(last.get("val_robust_acc"), "val_robust_acc")),
        ("val clean % (best)", _text(best.get("val_clean_acc"), "val_clean_acc")),
        ("val robust % (best)", _text(best.get("val_robust_acc"), "val_robust_acc")),
        ("test clean %", _text(summary.get("clean_acc"), "clean_acc")),
        ("test PGD-10 %", _text(summary.get("pgd10_acc"), "pgd10_acc")),
        ("n test", _text(n_test, "epoch")),
        ("max |logit|", _text(_max_logit(run), "max_logit")),
        ("train seconds", _text(_total_seconds(run), "seconds")),
    ]


def compare_text(runs: Sequence[RunRecord]) -> str:
    """The runs side by side: one column per run (headed by its name), one row per
    setting or result; ``-`` where a value is missing (e.g. no summary.json yet)."""
    names = display_names(runs)
    per_run = [comparison_rows(r) for r in runs]
    labels = [label for label, _ in per_run[0]] if per_run else [label for label, _ in comparison_rows(
        RunRecord(path=Path("."), name=""))]
    columns = [[name] + [text for _, text in rows] for name, rows in zip(names, per_run)]
    label_width = max(len("run"), *(len(l) for l in labels))
    widths = [max(len(c) for c in column) for column in columns]

    def line(first: str, cells: Sequence[str]) -> str:
        return _GAP.join([first.ljust(label_width)] + [c.rjust(w) for c, w in zip(cells, widths)]).rstrip()

    lines = [line("run", names), _GAP.join(["-" * label_width] + ["-" * w for w in widths])]
    lines += [line(label, [column[i + 1] for column in columns]) for i, label in enumerate(labels)]
    return "\n".join(lines)


def report(paths: Sequence[str | Path], out_png: str | Path) -> tuple[str, Path]:
    """Loads the runs at ``paths``; returns their :func:`compare_text` table and the
    PNG written by :func:`plot_runs`."""
    if not paths:
        raise UserError("no run directories given; expected one or more folders written by dhat-seg train")
    runs = [load_run(p) for p in paths]
    return compare_text(runs), plot_runs(runs, out_png)
