"""Paired differences: each row minus the study's reference row, seed by seed.

Rows of one seed share that seed's initialisation and data order, so the difference of
two rows at the same seed is free of most of the variation between seeds. With ``n``
seeds where both rows have a value, a row's paired difference is the mean of its ``n``
per-seed differences and their sample standard deviation (ddof=1); a difference whose
mean is more than two standard errors (2 std / sqrt(n)) from zero is marked ``*``. That
is a rough screen, not a test at a stated level: with n = 3 a t-test needs about 4.3
standard errors for p < 0.05.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from dhat_seg.studies.rows import SeedRows, mean_std


def paired_differences(rows: Iterable[SeedRows], reference: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{row name: {key: {"mean", "std", "n", "per_seed": {seed: diff}, "beyond_2se": bool|None}}}
    for every row other than ``reference`` that shares at least one seed with it."""
    rows = list(rows)
    ref = next((r for r in rows if r.name == reference), None)
    if ref is None:
        return {}
    ref_values = {seed: run.metrics for seed, run in ref.runs.items() if run.has_results}
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.name == reference:
            continue
        per_key: dict[str, Any] = {}
        for key in keys:
            diffs = {seed: float(run.metrics[key]) - float(ref_values[seed][key])
                     for seed, run in row.runs.items()
                     if run.has_results and seed in ref_values
                     and run.metrics.get(key) is not None and ref_values[seed].get(key) is not None}
            if not diffs:
                continue
            mean, std, n = mean_std(list(diffs.values()))
            beyond = None if std is None else (abs(mean) > 2 * std / math.sqrt(n) if std > 0 else mean != 0)
            per_key[key] = {"mean": mean, "std": std, "n": n, "per_seed": diffs, "beyond_2se": beyond}
        if per_key:
            out[row.name] = per_key
    return out


def paired_markdown(diffs: dict[str, dict[str, Any]], rows: Iterable[SeedRows], columns: Iterable[tuple[str, str]],
                    reference_label: str) -> str:
    """The paired differences as a Markdown table ("mean ± std (n)", ``*`` beyond 2 standard errors)."""
    columns = [(k, h) for k, h in columns if any(k in d for d in diffs.values())]
    if not diffs or not columns:
        return ""
    labels = {r.name: r.label for r in rows}
    lines = [f"| row - {reference_label} | " + " | ".join(h for _, h in columns) + " |",
             "|---|" + "|".join("---" for _ in columns) + "|"]
    for name, per_key in diffs.items():
        cells = []
        for key, _ in columns:
            d = per_key.get(key)
            if d is None:
                cells.append("n/a")
                continue
            digits = 4 if key == "iou" else 2
            text = f"{d['mean']:+.{digits}f}" + ("" if d["std"] is None else f" ± {d['std']:.{digits}f}") + f" ({d['n']})"
            cells.append(text + (" *" if d["beyond_2se"] else ""))
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
