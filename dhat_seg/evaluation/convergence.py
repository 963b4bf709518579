"""Did a run end on a plateau? The convergence verdict of ``train``, ``ablate`` and
``compare``.

A table that sets a converged row beside one still climbing measures the speed of
convergence, not the method. The verdict reads a run's ``metrics.jsonl`` (one record per
epoch) and compares the validation clean and robust accuracy of the last epoch with
their values ``window`` epochs earlier: a row whose either accuracy moved by more than
``threshold`` points over its last ``window`` epochs is marked ("still climbing: +5.3
PGD over the last 2 epochs").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

#: Default: a run is on a plateau when neither accuracy moved by more than 2 points
#: over its last 2 epochs.
DEFAULT_THRESHOLD = 2.0
DEFAULT_WINDOW = 2
#: (metrics.jsonl key, name in the verdict)
_KEYS = (("val_clean_acc", "clean"), ("val_robust_acc", "PGD"))


@dataclass(frozen=True)
class Convergence:
    """The verdict on one run.

    Attributes:
        converged: True on a plateau, False when still moving, None when the run is too
            short (or logged no validation accuracy) to tell.
        changes: accuracy name -> last value minus the value ``window`` epochs earlier
            (points).
        epochs: epochs with validation accuracies.
        window, threshold: the settings of the verdict.
    """

    converged: bool | None
    changes: dict[str, float]
    epochs: int
    window: int
    threshold: float

    def describe(self) -> str:
        span = f"over the last {self.window} epochs"
        if self.converged is None:
            return f"convergence unknown: {self.epochs} epoch(s) with validation accuracy, needs {self.window + 1}"
        if self.converged:
            moved = ", ".join(f"{name} {change:+.1f}" for name, change in self.changes.items())
            return f"converged ({moved} {span})"
        name, change = max(self.changes.items(), key=lambda item: abs(item[1]))
        return f"still {'climbing' if change > 0 else 'falling'}: {change:+.1f} {name} {span}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"verdict": self.describe()}


def verdict(records: Iterable[Mapping[str, Any]], *, threshold: float = DEFAULT_THRESHOLD,
            window: int = DEFAULT_WINDOW) -> Convergence:
    """The verdict on a run from its per-epoch records (``metrics.jsonl``, in epoch order)."""
    if threshold < 0 or window < 1:
        raise ValueError(f"threshold {threshold} and window {window}: expected threshold >= 0 and window >= 1")
    rows = [r for r in records if all(r.get(key) is not None for key, _ in _KEYS)]
    if len(rows) <= window:
        return Convergence(None, {}, len(rows), window, threshold)
    last, earlier = rows[-1], rows[-1 - window]
    changes = {name: round(float(last[key]) - float(earlier[key]), 2) for key, name in _KEYS}
    converged = all(abs(change) <= threshold for change in changes.values())
    return Convergence(converged, changes, len(rows), window, threshold)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The epoch records of a run's ``metrics.jsonl`` (unreadable lines skipped; the last
    record of an epoch wins, as after a resume)."""
    path = Path(run_dir) / "metrics.jsonl"
    by_epoch: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def run_verdict(run_dir: str | Path, *, threshold: float = DEFAULT_THRESHOLD,
                window: int = DEFAULT_WINDOW) -> Convergence:
    """:func:`verdict` of the run in ``run_dir``."""
    return verdict(read_metrics(run_dir), threshold=threshold, window=window)
