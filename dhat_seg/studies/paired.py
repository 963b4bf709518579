"""Paired differences: one row minus another, seed by seed.

Rows of one seed share that seed's initialisation and data order, so the difference of
two rows at the same seed is free of most of the variation between seeds. With ``n``
seeds where both rows have a value, a paired difference is the mean of its ``n``
per-seed differences with their sample standard deviation (ddof=1) and the mean's
two-sided 95 % t-interval (``t(0.975, n - 1)``; none below two seeds). Two rows **differ
beyond the seed spread** on a metric when that interval excludes zero (the rule fixed in
docs/results.md for the method comparison). It is stated per pair without a correction
for the number of pairs: among many pairs, some will differ by chance.

:func:`paired_differences` gives every row against the study's reference row,
:func:`pairwise_differences` every pair of rows (the comparison's ``pairwise`` metrics).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from dhat_seg.studies.rows import SeedRows
from dhat_seg.studies.trend import t_interval


def _values(row: SeedRows) -> dict[int, dict[str, Any]]:
    return {seed: run.metrics for seed, run in row.runs.items() if run.has_results}


def paired_difference(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], key: str) -> dict[str, Any] | None:
    """``key`` of ``a`` minus ``b`` (per-seed metrics) over the seeds where both have it:
    {"mean", "std", "n", "low", "high", "per_seed": {seed: diff}, "differs": bool|None}; None
    when no seed pairs them. ``differs``: the 95 % t-interval excludes zero (None below two seeds)."""
    diffs = {seed: float(a[seed][key]) - float(b[seed][key]) for seed in a
             if seed in b and a[seed].get(key) is not None and b[seed].get(key) is not None}
    if not diffs:
        return None
    ci = t_interval(list(diffs.values()))
    differs = None if ci["low"] is None else bool(ci["low"] > 0 or ci["high"] < 0)
    return {**ci, "per_seed": diffs, "differs": differs}


def paired_differences(rows: Iterable[SeedRows], reference: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{row name: {key: :func:`paired_difference` of the row minus ``reference``}} for every
    row other than ``reference`` that shares at least one seed with it."""
    rows, keys = list(rows), list(keys)
    ref = next((r for r in rows if r.name == reference), None)
    if ref is None:
        return {}
    ref_values = _values(ref)
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.name == reference:
            continue
        values = _values(row)
        per_key = {key: d for key in keys if (d := paired_difference(values, ref_values, key)) is not None}
        if per_key:
            out[row.name] = per_key
    return out


def pairwise_differences(rows: Iterable[SeedRows], keys: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """{key: [{"a", "b", **:func:`paired_difference` of a minus b}]} for every pair of rows
    (``a`` before ``b`` in the table) that shares at least one seed with a value of ``key``."""
    rows = list(rows)
    values = {r.name: _values(r) for r in rows}
    out: dict[str, list[dict[str, Any]]] = {}
    for key in keys:
        pairs = []
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                d = paired_difference(values[a.name], values[b.name], key)
                if d is not None:
                    pairs.append({"a": a.name, "b": b.name, **d})
        if pairs:
            out[key] = pairs
    return out


def _cell(d: dict[str, Any] | None, digits: int) -> str:
    if d is None:
        return "n/a"
    if d["low"] is None:
        return f"{d['mean']:+.{digits}f} ({d['n']})"
    mark = " *" if d["differs"] else ""
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}] ({d['n']}){mark}"


def paired_markdown(diffs: dict[str, dict[str, Any]], rows: Iterable[SeedRows], columns: Iterable[tuple[str, str]],
                    reference_label: str) -> str:
    """The paired differences as a Markdown table ("mean [95 % t-interval] (n)", ``*`` when
    the interval excludes zero)."""
    columns = [(k, h) for k, h in columns if any(k in d for d in diffs.values())]
    if not diffs or not columns:
        return ""
    labels = {r.name: r.label for r in rows}
    lines = [f"| row - {reference_label} | " + " | ".join(h for _, h in columns) + " |",
             "|---|" + "|".join("---" for _ in columns) + "|"]
    for name, per_key in diffs.items():
        cells = [_cell(per_key.get(key), 4 if key == "iou" else 2) for key, _ in columns]
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pairwise_markdown(pairs: dict[str, list[dict[str, Any]]], rows: Sequence[SeedRows],
                      headers: dict[str, str]) -> str:
    """One matrix per metric of :func:`pairwise_differences`: the row numbered ``i`` against
    column ``j``: ``+`` higher beyond the seed spread, ``-`` lower, ``.`` within it, blank
    when fewer than two seeds pair them (or on the diagonal)."""
    rows = [r for r in rows if any(r.name in (p["a"], p["b"]) for ps in pairs.values() for p in ps)]
    if not rows:
        return ""
    index = {r.name: i for i, r in enumerate(rows, 1)}
    parts = []
    for key, ps in pairs.items():
        sign: dict[tuple[str, str], str] = {}
        for p in ps:
            if p["differs"] is None:
                continue
            ab = "." if not p["differs"] else "+" if p["mean"] > 0 else "-"
            sign[(p["a"], p["b"])], sign[(p["b"], p["a"])] = ab, {"+": "-", "-": "+"}.get(ab, ab)
        counted = sum(1 for p in ps if p["differs"] is not None)
        differ = sum(1 for p in ps if p["differs"])
        lines = [f"**{headers.get(key, key)}**: {differ} of {counted} pairs differ beyond the seed spread.", "",
                 "| row | " + " | ".join(str(i) for i in index.values()) + " |",
                 "|---|" + "|".join(":-:" for _ in index) + "|"]
        for r in rows:
            cells = [sign.get((r.name, other.name), "") for other in rows]
            lines.append(f"| {index[r.name]} {r.label} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
