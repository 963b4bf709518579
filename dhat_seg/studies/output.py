"""A study's outputs (the ablation's, the comparison's): markdown/csv/json tables and the plot.
Everything row-specific comes from the rows' :class:`~dhat_seg.studies.study.Study`
(default: the attention ablation).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Mapping

from dhat_seg.studies.paired import pairwise_differences, pairwise_markdown, paired_differences, paired_markdown
from dhat_seg.studies.cost import total_cost
from dhat_seg.studies.rows import ATTENTION_STUDY, AblatePreset, Row, SeedRows, sanity_summary
from dhat_seg.studies.study import Study


# ---------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------


#: columns that hold fractions in [0, 1] (printed with 4 decimals; the others are % or points: 2)
FRACTION_COLUMNS = frozenset({"iou"})


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if key in FRACTION_COLUMNS else f"{value:.2f}"
    return str(value)


def _fmt_std(std: float, key: str = "") -> str:
    """The std with the precision of its column."""
    return _fmt(float(std), key)


def _paper(row, key: str, with_paper: bool) -> str:
    paper = row.spec.paper.get(row.name, {}).get(key) if with_paper else None
    return f" ({paper:.2f})" if paper is not None else ""


def _study(rows: list, study: Study | None) -> Study:
    """The given study, else the rows' (the ablation's without rows)."""
    return study or (rows[0].spec if rows else ATTENTION_STUDY)


def _cell(row: Row, key: str, with_paper: bool) -> str:
    if not row.has_results:
        return "-"
    return _fmt(row.metrics.get(key), key) + _paper(row, key, with_paper)


def _stat_cell(entry: "SeedRows", key: str, with_paper: bool) -> str:
    """"mean ± std" over the seeds ("(n=k)" when fewer seeds than the row's n have the value)."""
    if not entry.has_results:
        return "-"
    mean, std, n = entry.stat(key)
    if mean is None:
        return "n/a"
    text = _fmt(mean, key) + ("" if std is None else f" ± {_fmt_std(std, key)}")
    if n != len(entry.done):
        text += f" (n={n})"
    return text + _paper(entry, key, with_paper)


def _single(rows: list) -> list[Row] | None:
    """The rows as plain rows when there is one seed (or they are plain rows), else None."""
    if all(isinstance(r, Row) for r in rows):
        return list(rows)
    if all(len(r.runs) == 1 for r in rows):
        return [next(iter(r.runs.values())) for r in rows]
    return None


def markdown_table(rows: list, with_paper: bool = False, study: Study | None = None) -> str:
    """The table in Markdown; with ``with_paper``, paper values in parentheses. Several
    seeds: "mean ± std" cells and a column n (seeds with results)."""
    study = _study(rows, study)
    single = _single(rows)
    multi = single is None
    columns = list(study.columns)
    cols = [("row", study.row_header)] + columns + ([("n", "n")] if multi else []) + [("status", "status")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in (rows if multi else single):
        if multi:
            cells = [r.label] + [_stat_cell(r, k, with_paper) for k, _ in columns] + [str(len(r.done)), r.shown_status]
        else:
            cells = [r.label] + [_cell(r, k, with_paper) for k, _ in columns] + [r.shown_status]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def paper_table(study: Study | None = None) -> str:
    """The paper's numbers of a study (default: Table 10) as a Markdown table."""
    study = study or ATTENTION_STUDY
    cols = [(k, h) for k, h in study.columns if any(k in values for values in study.paper.values())]
    lines = [f"| {study.row_header} | " + " | ".join(h for _, h in cols) + " |", "|---|" + "|".join("---" for _ in cols) + "|"]
    for name, values in study.paper.items():
        lines.append(f"| {study.paper_label(name)} | " + " | ".join(_fmt(values.get(k), k) for k, _ in cols) + " |")
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


def _hypothesis_panel(ax, result: Mapping[str, Any], rows: list, colours: dict[str, str], header: str) -> None:
    """One hypothesis: each attention row's mean paired difference from the reference (y,
    95 % t-interval over seeds) at its mean attention IoU (x); a trend's mean per-seed
    line; 0 (the reference) and a floor's margin as horizontal lines."""
    means = result["per_row"]
    labels = {r.name: r.label for r in rows}
    for name, m in means.items():
        d = m["diff"]
        half = None if d["low"] is None else d["mean"] - d["low"]
        ax.errorbar([m["iou"]], [d["mean"]], yerr=None if half is None else [half], fmt="o", capsize=3, markersize=5,
                    color=colours.get(name, "C0"))
        right = m["iou"] > 0.75
        ax.annotate(labels.get(name, name), (m["iou"], d["mean"]), textcoords="offset points",
                    xytext=(-5 if right else 5, 4), fontsize=6, ha="right" if right else "left")
    ax.axhline(0, color="black", linewidth=0.8, linestyle="--")
    if result["kind"] == "trend" and result["per_seed_slope"]:
        from statistics import fmean

        slope, intercept = result["estimate"], fmean(result["per_seed_intercept"].values())
        ax.plot([0, 1], [intercept, intercept + slope], color="grey", linewidth=1.0)
    if result["kind"] == "floor":
        ax.axhline(-result["margin"], color="red", linewidth=0.8, linestyle=":")
    interval = "" if result["low"] is None else f" [{result['low']:+.1f}, {result['high']:+.1f}]"
    what = "slope" if result["kind"] == "trend" else "worst row"
    estimate = "n/a" if result["estimate"] is None else f"{result['estimate']:+.1f}"
    ax.set_title(f"{result['hypothesis']}: {header}; {what} {estimate}{interval}: {result['verdict']}", fontsize=8)
    ax.set_xlabel("attention IoU with the ground truth", fontsize=7)
    ax.set_ylabel(f"{header}, row - reference (points)", fontsize=7)
    ax.set_xlim(-0.02, 1.02)
    ax.tick_params(labelsize=7)


def _colour(i: int, n: int):
    """Row ``i`` of ``n``'s colour: matplotlib's default cycle up to 10 rows; beyond, the
    tab20, tab20b and tab20c colours (60), so that no two rows share one."""
    if n <= 10:
        return f"C{i}"
    from matplotlib import colormaps

    maps = ("tab20", "tab20b", "tab20c")
    return colormaps[maps[(i // 20) % 3]](i % 20)


def plot(rows: list, path: Path, study: Study | None = None, hypotheses: list[dict[str, Any]] | None = None):
    """Top: grouped bars, one group per metric, one bar per row with results (IoU x 100),
    error bars = std over seeds (several seeds). Suspect rows (a failed sanity check) are
    hatched, edged in red and named so in the legend. Bottom (a study with
    ``iou_panels``, the ablation): attention IoU (x) against BG-gap and against AA (y;
    PGD-10 when AA was not measured), one point per attention method, error bars = std
    over seeds; UIAT, without attention, as a horizontal line. Accepts :class:`Row` or
    :class:`SeedRows`. Returns the figure (axes: bars[, IoU vs BG-gap, IoU vs AA])."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure

    study = _study(rows, study)
    done = [r for r in rows if r.has_results]
    colours = {r.name: _colour(i, len(done)) for i, r in enumerate(done)}
    seeds = max((len(getattr(r, "done", [r])) for r in done), default=1)
    metrics = [(k, h) for k, h in study.columns if any(r.stat(k)[0] is not None for r in done)]
    if hypotheses is None:
        hypotheses = _hypothesis_results(rows, study) if seeds > 1 else []
    height = 12.0 if hypotheses else 8.4 if study.iou_panels else 4.8
    fig = Figure(figsize=(max(12.0 if hypotheses else 9.0, 1.4 * len(metrics) + 2), height))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, 3) if hypotheses else None
    ax = (fig.add_subplot(grid[0, :]) if hypotheses else fig.add_subplot(2, 1, 1) if study.iou_panels
          else fig.add_subplot(1, 1, 1))
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
    title = f"dhat-seg {study.command}: " + (study.title if done else "no finished rows yet")
    ax.set_title(title + (f" (mean ± std over up to {seeds} seeds)" if seeds > 1 else ""))
    if done:  # beside the bars once there are many rows, so it hides none of them
        ax.legend(fontsize=8, **({} if len(done) <= 8 else dict(loc="upper left", bbox_to_anchor=(1.005, 1.0),
                                                                 ncol=1 + len(done) // 13)))
    if hypotheses:
        from dhat_seg.studies.trend import HYPOTHESES

        headers = {h.name: h.header for h in HYPOTHESES}
        for i, result in enumerate(hypotheses[:6]):
            _hypothesis_panel(fig.add_subplot(grid[1 + i // 3, i % 3]), result, rows, colours,
                              headers.get(result["hypothesis"], result["key"]))
    elif study.iou_panels:
        _iou_panel(fig.add_subplot(2, 2, 3), done, colours, "bg_gap", "BG-gap", "points")
        robust = "aa" if any(r.stat("aa")[0] is not None for r in done) or not done else "pgd10"
        _iou_panel(fig.add_subplot(2, 2, 4), done, colours, robust, "AA" if robust == "aa" else "PGD-10", "%")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def _hypothesis_results(rows: list, study: Study) -> list[dict[str, Any]]:
    """The fixed hypotheses' tests (:mod:`dhat_seg.studies.trend`) of a several-seed study
    with attention IoUs and a reference row; [] otherwise."""
    from dhat_seg.studies.trend import evaluate_hypotheses

    if not study.iou_panels or study.reference_row is None or _single(rows) is not None:
        return []
    if not any(r.name == study.reference_row and r.has_results for r in rows):
        return []
    return [{**r, "reference": study.reference_row} for r in evaluate_hypotheses(rows, study.reference_row)]


def flagged_rows(rows: list) -> dict[str, list[str]]:
    """{row name: why} for the rows of a several-seed study with a seed that failed a
    gradient-masking sanity check or ended off a plateau (docs/results.md: such rows stay
    in the hypotheses' tests, are named, and the tests are also given without them)."""
    flagged: dict[str, list[str]] = {}
    for row in rows:
        for seed, run in getattr(row, "runs", {}).items():
            if run.has_results and (run.suspect or run.climbing):
                flagged.setdefault(row.name, []).append(f"seed {seed}: {run.status if run.suspect else run.climbing}")
    return flagged


def _time_line(rows: list, meta: Mapping[str, Any]) -> str:
    """The command's wall time (none for a report regenerated with --report-only) and the
    compute its rows' runs recorded in their folders."""
    cost = total_cost(rows)
    wall = ("Report regenerated from the run folders (no wall time). " if meta.get("seconds") is None
            else f"Total time {meta.get('seconds')} s. ")
    if any(row.pending for row in rows):
        wall += "`pending`: not finished yet" + (" (--report-only trains nothing). " if meta.get("seconds") is None else ". ")
    if not cost["runs"]:
        return wall.rstrip()
    return wall + (f"Compute recorded in the {cost['runs']} runs' folders: training {cost['train_s'] / 60:.1f} min, "
                   f"evaluation {cost['eval_s'] / 60:.1f} min (summed; runs side by side overlap in wall time).")


#: CSV/JSON keys beyond the table columns.
MORE_KEYS = ("worst_case", "robust_gap_train", "n_test", "n_aa", "n_gap_train")


def _csv(value: Any) -> Any:
    return "" if value is None else str(value).lower() if isinstance(value, bool) else value


def write_outputs(out: Path, rows: list, meta: Mapping[str, Any], preset: AblatePreset | None,
                  study: Study | None = None) -> dict[str, Any]:
    """<stem>.md / .csv / .json / .png (ablation.* for the ablation) from the rows as they
    are now (:class:`Row`, or :class:`SeedRows` of one or more seeds)."""
    study = _study(rows, study)
    with_paper = bool(preset and preset.show_paper and study.paper)
    single = _single(rows)
    keys = [k for k, _ in study.columns] + [k for k, _ in study.extra_columns] + list(MORE_KEYS)
    described = list(study.describe_keys)
    json_rows = [r.to_dict() for r in single] if single is not None else [r.to_dict(keys) for r in rows]
    data = {**meta, "compute": total_cost(rows), "rows": json_rows, "table_markdown": markdown_table(rows, with_paper=with_paper, study=study)}
    paired = ""
    if single is None and study.reference_row is not None:
        diff_keys = [k for k, _ in study.columns if k != "iou"]
        diffs = paired_differences(rows, study.reference_row, diff_keys)
        data["paired_differences"] = {"reference": study.reference_row, "rows": diffs}
        paired = paired_markdown(diffs, rows, study.columns, study.label(study.reference_row))
    pairwise = ""
    if single is None and study.pairwise_keys:
        pairs = pairwise_differences(rows, study.pairwise_keys)
        data["pairwise"] = pairs
        headers = dict(study.columns) | dict(study.extra_columns)
        pairwise = pairwise_markdown(pairs, rows, headers)
    hypotheses = _hypothesis_results(rows, study)
    flagged, unflagged = {}, []
    if hypotheses:
        data["hypotheses"] = hypotheses
        flagged = flagged_rows(rows)
        if flagged:
            unflagged = _hypothesis_results([r for r in rows if r.name not in flagged or r.name == study.reference_row],
                                            study)
            data["hypotheses_flagged_rows"] = flagged
            data["hypotheses_without_flagged"] = unflagged
    if with_paper:
        data[study.paper_key] = {name: dict(values) for name, values in study.paper.items()}
    (out / f"{study.stem}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")

    buf = io.StringIO()
    writer = csv.writer(buf)
    if single is not None:
        writer.writerow(["row"] + described + ["status"] + keys + ["sanity", "sanity_n", "run_dir", "seconds"])
        for r in single:
            d = r.to_dict()
            writer.writerow([d["row"]] + [_csv(d[k]) for k in described] + [d["status"]] + [_csv(d.get(k)) for k in keys]
                            + [sanity_summary(r.sanity), r.sanity["n"] if r.sanity else "",
                               d["run_dir"] or "", _csv(r.seconds)])
    else:
        writer.writerow(["row"] + described + ["status", "n_seeds"]
                        + [f"{k}_{part}" for k in keys for part in ("mean", "std", "n")]
                        + ["seeds", "sanity", "run_dirs", "seconds"])
        for r in rows:
            d = r.to_dict(keys)
            cells = []
            for k in keys:
                mean, std, n = r.stat(k)
                cells += [_csv(mean), _csv(std), n]
            writer.writerow([d["row"]] + [_csv(d[k]) for k in described] + [d["status"], d["n_seeds"]] + cells
                            + [" ".join(map(str, r.seeds)), r.sanity_summary(),
                               " ".join(x.run_dir or "" for x in r.runs.values()), _csv(r.seconds)])
    (out / f"{study.stem}.csv").write_text(buf.getvalue())

    settings = meta.get("eval_settings", {})
    columns = {k for k, _ in study.columns}
    md = [f"# dhat-seg {study.command}: {study.title}" + (f" ({study.reference})" if study.reference else ""), ""]
    if meta.get("preset"):
        md += [f"Preset `{meta['preset']}`: {meta.get('preset_description')}.", ""]
    if meta.get("overrides"):
        md += ["Overridden on the command line: " + ", ".join(f"`{k}={v}`" for k, v in meta["overrides"].items()) + ".", ""]
    md += [data["table_markdown"], ""]
    trained = [f"{r.label}: {r.trains}" for r in rows if r.trains]
    if trained:
        md += ["Rows as trained: " + "; ".join(trained) + ".", ""]
    if single is None:
        seeds = rows[0].seeds if rows else meta.get("seeds", [])
        md += [f"Every row ran once per seed ({', '.join(map(str, seeds))}; seed `s` in `{out}/seed-<s>/<row>/`). "
               "Cells: mean ± sample standard deviation (ddof=1) over the seeds with results; n: their number "
               "(a cell's own n in parentheses when smaller). Suspect seeds are included and the row marked. The data "
               "is the same for every seed (data_seed), so every seed of a row shares its attention model and masks. "
               f"Every seed's values: {study.stem}.json, `per_seed`.", ""]
        if paired:
            md += [f"## Paired by seed: each row minus {study.label(study.reference_row)}", "",
                   "The difference at each seed (same initialisation and data order), then its mean over the seeds "
                   "where both rows have a value with the mean's 95 % t-interval [low, high] and (n). `*`: the "
                   "interval excludes zero (beyond the seed spread; per cell, without a correction for the number "
                   f"of cells). Every seed's difference: {study.stem}.json, `paired_differences`.", "", paired, ""]
        if pairwise:
            md += ["## Which rows differ beyond the seed spread", "",
                   "Every pair of rows, paired by seed: row (numbered) minus column. `+`: the row is higher and the "
                   "95 % t-interval of the paired difference excludes zero; `-`: lower and excludes zero; `.`: the "
                   "interval contains zero; blank: fewer than two seeds pair them. Per pair, without a correction "
                   "for the number of pairs. Every pair's mean, interval and per-seed differences: "
                   f"{study.stem}.json, `pairwise`.", "", pairwise, ""]
        if hypotheses:
            from dhat_seg.studies.trend import hypotheses_markdown

            row_labels = {**{n: study.paper_label(n) for n in study.paper}, **{r.name: r.label for r in rows}}
            paper = study.paper if study.reference_row in study.paper else None
            md += ["## Hypotheses: attention quality against the paired differences", "",
                   f"The hypotheses fixed before the runs (dhat-seg's docs, Results), tested on the rows with an "
                   f"attention IoU, each seed's values minus {study.label(study.reference_row)}'s. Trend: the mean over "
                   "seeds of each seed's least-squares slope of the difference on the IoU (points per unit IoU), with "
                   "its 95 % t-interval; supported when the interval lies wholly on the predicted side of zero, against "
                   "when wholly on the other, else inconclusive. Floor: every row's mean paired difference with its "
                   "95 % t-interval against the margin. Rank corr.: Spearman's, between the rows' mean IoU and mean "
                   f"difference (a description, not a test). Per seed and per row: {study.stem}.json, `hypotheses`."
                   + (f" Last column: {study.paper_caption}, each mask's row minus UIAT's (no IoU there: the "
                      "direction a better segmenter moved the metric)." if paper else ""),
                   "", hypotheses_markdown(hypotheses, row_labels, paper, study.reference_row), ""]
            if flagged:
                names = "; ".join(f"{study.label(name)} ({', '.join(why)})" for name, why in flagged.items())
                md += [f"Rows with a seed that failed a sanity check or ended off a plateau, kept above: {names}. "
                       "The same tests without them (the reference row kept): "
                       f"{study.stem}.json, `hypotheses_without_flagged`.", "",
                       hypotheses_markdown(unflagged, row_labels, paper, study.reference_row), ""]
    md += ["Clean, PGD-10, " + ("PGD-20, " if "pgd20" in columns else "")
           + "C&W (PGD-20 on the C&W margin loss), AA (AutoAttack standard): test accuracy in %, eps 8/255. "
           f"Robust Gap: {settings.get('gap_attack', 'pgd10')} accuracy on training samples minus on test samples "
           "(points; smaller is better). "
           + ("BG-gap: clean accuracy on `test` (training-like backgrounds) minus `test-mixed-rand` (random backgrounds), "
              "points. " if "bg_gap" in columns else "")
           + ("mixed-rand, only-FG: Backgrounds-Challenge clean accuracy (%) with random backgrounds and with the "
              "objects on black; no-FG (in the CSV/JSON): the objects blacked out, scored against the background's "
              "class. " if "mixed_rand" in columns else "")
           + ("IoU: attention foreground vs ground-truth masks (mean over test images). " if "iou" in columns else "")
           + "n/a = not measurable here.",
           f"Evaluation: {settings.get('n_examples') or 'all'} test examples, AutoAttack on {settings.get('aa_examples') or 'all'}, "
           f"Robust Gap on {settings.get('gap_examples') or 'as many'} training samples. " + _time_line(rows, meta),
           f"Every row ran the gradient-masking sanity checks of `dhat-seg eval --sanity` on the first "
           f"{settings.get('sanity_examples') or 'all'} test samples (iterative beats single-step, robustness "
           "falls as eps grows, unbounded attack succeeds, white-box beats transfer, random sampling finds nothing PGD "
           "misses). Each but the unbounded one is an exact one-sided binomial test at alpha 0.01 (the paired ones: "
           "sign tests on the samples only one of two attacks breaks; the noise check: against 2% of the PGD-robust "
           "samples). A row marked `suspect` failed one, shown with its evidence (count of n, p-value): its robust "
           "accuracies may come from masked gradients, not robustness (nulls and counts in the row's eval.json, "
           "`sanity`)."]
    if with_paper:
        md += ["", f"Values in parentheses: {study.paper_caption}.", "", f"## {study.paper_heading}", "", paper_table(study)]
    (out / f"{study.stem}.md").write_text("\n".join(md) + "\n")
    try:
        plot(single if single is not None else rows, out / f"{study.stem}.png", study, hypotheses)
    except Exception as exc:  # a plotting problem must not lose the table
        print(f"warning: could not draw {out / (study.stem + '.png')}: {exc}", file=sys.stderr)
    return data
