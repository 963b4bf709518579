"""Table 10's question as tests fixed in advance: does a better foreground mask change
what DHAT learns? (docs/results.md, "Hypotheses", states them in words; this module is
their arithmetic, pure functions of the study's rows.)

Every test is paired by seed. At seed ``s`` an attention row ``A`` gives

* its attention IoU with the ground truth, ``iou(A, s)`` (the ``iou`` column), and
* its difference from the reference row (UIAT, the same pipeline without background
  extraction) on a metric ``m``: ``d(A, s) = m(A, s) - m(UIAT, s)``.

A **trend** hypothesis (the metric's difference rises, or falls, with the IoU) is tested
on the slope of an ordinary least-squares line of ``d(A, s)`` on ``iou(A, s)`` across the
attention rows of one seed, one slope per seed; the seeds are the replicates. The
estimate is the mean of the per-seed slopes with its two-sided 95 % t-interval over
seeds (``t(0.975, n - 1)``; ``n`` the seeds with a slope). Verdict: **supported** when
the interval lies wholly on the predicted side of zero, **against** when it lies wholly
on the other side, else **inconclusive**. A slope is in points of the metric per unit
of IoU (from no overlap to the exact mask); the Spearman rank correlation between each
row's mean IoU and mean difference is printed beside it as a description, not a test.

A **floor** hypothesis (no mask costs more than ``margin`` points) is tested row by row
on the 95 % t-interval of the mean paired difference: **supported** when every
attention row's interval lies above ``-margin``, **against** when some row's interval
lies wholly below it, else **inconclusive**.

Rows without an IoU (UIAT itself, methods on data without masks) take no part; a seed
needs two attention rows with different IoUs for a slope, and a test needs two seeds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

LEVEL = 0.95


@dataclass(frozen=True)
class Hypothesis:
    """One fixed hypothesis: a metric, a kind ("trend" or "floor") and its direction."""

    name: str
    key: str
    header: str
    claim: str
    kind: str  # "trend": the slope's sign; "floor": every row's paired difference > -margin
    direction: int = 0  # trend: +1 the difference rises with IoU, -1 it falls
    margin: float = 0.0  # floor: the largest loss (points) that still counts as no loss


#: The hypotheses of docs/results.md ("Hypotheses"), in its order. Changing one after
#: results exist changes what was tested: add a new one instead.
HYPOTHESES: tuple[Hypothesis, ...] = (
    Hypothesis("H1", "mixed_rand", "mixed-rand", "DHAT's accuracy on random backgrounds, minus UIAT's, rises with the mask IoU",
               "trend", +1),
    Hypothesis("H2", "no_fg_bg_class", "no-FG (bg class)",
               "reliance on the background (object removed, read as the background's class), minus UIAT's, falls with the mask IoU",
               "trend", -1),
    Hypothesis("H3", "robust_gap", "Robust Gap", "the Robust Gap, minus UIAT's, falls with the mask IoU", "trend", -1),
    Hypothesis("H4", "aa", "AA", "no mask costs more than 5 points of AutoAttack accuracy against UIAT", "floor", margin=5.0),
    Hypothesis("H5", "pgd10", "PGD-10", "PGD-10 accuracy, minus UIAT's, rises with the mask IoU (the paper's Table 10 trend)",
               "trend", +1),
)


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got {df}")
    return float(t.ppf(0.5 + level / 2, df))


def t_interval(values: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """{"mean", "std" (ddof=1), "n", "low", "high"}: the mean's two-sided t-interval;
    std/low/high None below two values."""
    from dhat_seg.studies.rows import mean_std

    mean, std, n = mean_std([float(v) for v in values])
    if std is None:
        return {"mean": mean, "std": None, "n": n, "low": None, "high": None}
    half = t_quantile(n - 1, level) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "low": mean - half, "high": mean + half}


def ols_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """(slope, intercept) of the least-squares line of ys on xs; None with fewer than two
    points or no spread in xs."""
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys differ in length ({len(xs)} vs {len(ys)})")
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 1e-12:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties: average ranks); None below three points or
    when either side is constant."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def _by_seed(row) -> dict[int, Mapping[str, Any]]:
    return {seed: run.metrics for seed, run in row.runs.items() if run.has_results}


def paired_points(rows: Iterable, reference: str, key: str) -> dict[int, list[tuple[str, float, float]]]:
    """{seed: [(row name, iou, row's key - reference's key), ...]} over the rows that have an
    IoU and ``key`` at that seed, where the reference has ``key`` too (rows: :class:`SeedRows`)."""
    rows = list(rows)
    ref = next((r for r in rows if r.name == reference), None)
    if ref is None:
        return {}
    ref_values = _by_seed(ref)
    points: dict[int, list[tuple[str, float, float]]] = {}
    for row in rows:
        if row.name == reference:
            continue
        for seed, metrics in _by_seed(row).items():
            base = ref_values.get(seed, {}).get(key)
            if metrics.get("iou") is None or metrics.get(key) is None or base is None:
                continue
            points.setdefault(seed, []).append((row.name, float(metrics["iou"]), float(metrics[key]) - float(base)))
    return dict(sorted(points.items()))


def _verdict(low: float | None, high: float | None, direction: int) -> str:
    if low is None or high is None:
        return "not measured"
    if direction * low > 0 and direction * high > 0:
        return "supported"
    if direction * low < 0 and direction * high < 0:
        return "against"
    return "inconclusive"


def row_means(points: Mapping[int, list[tuple[str, float, float]]]) -> dict[str, dict[str, Any]]:
    """{row: {"iou": mean IoU, "diff": 95 % t-interval of its paired differences}} over the seeds."""
    ious: dict[str, list[float]] = {}
    diffs: dict[str, list[float]] = {}
    for seed_points in points.values():
        for name, iou, diff in seed_points:
            ious.setdefault(name, []).append(iou)
            diffs.setdefault(name, []).append(diff)
    return {name: {"iou": statistics.fmean(ious[name]), "diff": t_interval(diffs[name])} for name in ious}


def trend_test(rows: Iterable, reference: str, hyp: Hypothesis) -> dict[str, Any]:
    """The trend test of ``hyp`` (see the module doc)."""
    points = paired_points(rows, reference, hyp.key)
    fits = {seed: ols_slope([p[1] for p in pts], [p[2] for p in pts]) for seed, pts in points.items()}
    fits = {seed: fit for seed, fit in fits.items() if fit is not None}
    slope = t_interval([fit[0] for fit in fits.values()])
    means = row_means(points)
    rho = spearman([m["iou"] for m in means.values()], [m["diff"]["mean"] for m in means.values()])
    return {"hypothesis": hyp.name, "key": hyp.key, "claim": hyp.claim, "kind": hyp.kind, "direction": hyp.direction,
            "statistic": "mean per-seed OLS slope of the paired difference on IoU (points per unit IoU)",
            "estimate": slope["mean"], "low": slope["low"], "high": slope["high"], "n_seeds": slope["n"],
            "per_seed_slope": {seed: fit[0] for seed, fit in fits.items()},
            "per_seed_intercept": {seed: fit[1] for seed, fit in fits.items()},
            "rows": sorted(means), "per_row": means, "spearman_row_means": rho,
            "verdict": _verdict(slope["low"], slope["high"], hyp.direction)}


def floor_test(rows: Iterable, reference: str, hyp: Hypothesis) -> dict[str, Any]:
    """The floor test of ``hyp`` (see the module doc)."""
    points = paired_points(rows, reference, hyp.key)
    means = row_means(points)
    tested = {name: m["diff"] for name, m in means.items() if m["diff"]["low"] is not None}
    below = {name: d for name, d in tested.items() if d["high"] < -hyp.margin}
    # the row shown is the one that decides the verdict: wholly below the floor (against), else
    # the lowest interval (supported: the closest to the floor; inconclusive: one across it)
    if not tested:
        verdict, worst = "not measured", None
    elif below:
        verdict, worst = "against", min(below, key=lambda name: below[name]["high"])
    else:
        verdict = "supported" if all(d["low"] > -hyp.margin for d in tested.values()) else "inconclusive"
        worst = min(tested, key=lambda name: tested[name]["low"])
    return {"hypothesis": hyp.name, "key": hyp.key, "claim": hyp.claim, "kind": hyp.kind, "margin": hyp.margin,
            "statistic": f"each attention row's mean paired difference (points), 95 % t-interval; floor -{hyp.margin:g}",
            "estimate": tested[worst]["mean"] if worst else None, "low": tested[worst]["low"] if worst else None,
            "high": tested[worst]["high"] if worst else None, "worst_row": worst,
            "n_seeds": tested[worst]["n"] if worst else 0,  # the shown row's own n
            "per_row": means, "rows": sorted(means), "verdict": verdict}


def evaluate_hypotheses(rows: Iterable, reference: str,
                    hypotheses: Sequence[Hypothesis] = HYPOTHESES) -> list[dict[str, Any]]:
    """Every hypothesis' test result, in order."""
    rows = list(rows)
    return [trend_test(rows, reference, h) if h.kind == "trend" else floor_test(rows, reference, h) for h in hypotheses]


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def paper_differences(key: str, paper: Mapping[str, Mapping[str, float]], reference: str,
                      labels: Mapping[str, str] | None = None) -> str:
    """What the paper's table says on a hypothesis' metric: each of its other rows minus its
    reference row, in its order ("Grad-CAM +1.8, SAM +3.8"), or "not measured" when the paper
    has no such column. The paper gives no IoU, so this is the direction a better segmenter
    moved the metric there, not a slope."""
    labels = labels or {}
    base = paper.get(reference, {}).get(key)
    diffs = [(name, values[key] - base) for name, values in paper.items()
             if name != reference and base is not None and key in values]
    if not diffs:
        return "not measured"
    return ", ".join(f"{labels.get(name, name)} {_num(d)}" for name, d in diffs)


def hypotheses_markdown(results: Sequence[Mapping[str, Any]], labels: Mapping[str, str] | None = None,
                        paper: Mapping[str, Mapping[str, float]] | None = None, reference: str = "-") -> str:
    """The results as a Markdown table: hypothesis, metric, estimate [95 % interval] (seeds), verdict;
    with ``paper`` (its rows' metrics by row name), a last column of :func:`paper_differences`."""
    labels = labels or {}
    lines = ["| hypothesis | metric | estimate [95 % interval] (seeds) | rank corr. of row means | verdict |"
             + (" the paper: each mask minus UIAT |" if paper else ""),
             "|---|---|---|---|---|" + ("---|" if paper else "")]
    for r in results:
        hyp = next((h for h in HYPOTHESES if h.name == r["hypothesis"]), None)
        metric = hyp.header if hyp else r["key"]
        if r["kind"] == "trend":
            estimate = f"slope {_num(r['estimate'])} [{_num(r['low'])}, {_num(r['high'])}] pts/IoU ({r['n_seeds']})"
            rho = "n/a" if r.get("spearman_row_means") is None else f"{r['spearman_row_means']:+.2f}"
        else:
            worst = labels.get(r.get("worst_row"), r.get("worst_row")) or "n/a"
            estimate = f"worst row {worst}: {_num(r['estimate'])} [{_num(r['low'])}, {_num(r['high'])}] pts ({r['n_seeds']})"
            rho = ""
        lines.append(f"| {r['hypothesis']}: {r['claim']} | {metric} | {estimate} | {rho} | {r['verdict']} |"
                     + (f" {paper_differences(r['key'], paper, reference, labels)} |" if paper else ""))
    return "\n".join(lines)
