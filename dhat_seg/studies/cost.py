"""What a study's runs cost, read from their run folders alone, so that a table regenerated
later (``--report-only``) states the same figures."""

from __future__ import annotations

import json
from pathlib import Path


def run_cost(run_dir: Path) -> dict[str, float | None]:
    """What a finished run cost, from its folder alone (so a report regenerated later gives the
    same figure): ``train_s``, the sum of its epochs' seconds (metrics.jsonl), and ``eval_s``,
    its evaluation's total seconds (eval.json); None where the file or the figure is missing."""
    train = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        try:
            train = round(sum(float(json.loads(line).get("seconds") or 0)
                              for line in metrics.read_text().splitlines() if line.strip()), 1)
        except (ValueError, AttributeError):
            train = None
    evaluation = None
    report = run_dir / "eval.json"
    if report.is_file():
        try:
            total = (json.loads(report.read_text()).get("seconds") or {}).get("total")
            evaluation = None if total is None else round(float(total), 1)
        except (ValueError, AttributeError):
            evaluation = None
    return {"train_s": train, "eval_s": evaluation}


def total_cost(rows: list) -> dict[str, float]:
    """``train_s`` and ``eval_s`` summed over the rows' runs (:class:`Row` or :class:`SeedRows`)
    that recorded them, and ``runs``: how many runs had either."""
    runs = [r for entry in rows for r in (entry.runs.values() if hasattr(entry, "runs") else [entry])]
    costs = [r.cost for r in runs if r.cost and (r.cost.get("train_s") is not None or r.cost.get("eval_s") is not None)]
    return {"train_s": round(sum(c.get("train_s") or 0 for c in costs), 1),
            "eval_s": round(sum(c.get("eval_s") or 0 for c in costs), 1), "runs": len(costs)}
