"""Run-directory helpers shared by the tests of exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def metrics(run: Path) -> list[dict]:
    """A run's metrics.jsonl records without their timings."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def killed_after_first_epoch(straight: Path, resumed: Path) -> None:
    """Copy the finished two-epoch run ``straight`` to ``resumed`` as a job killed after epoch 1
    leaves it: its second checkpoint, metrics line and summary never written."""
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "epoch_0002")
    pointers = json.loads((resumed / "checkpoints" / "pointers.json").read_text())
    (resumed / "checkpoints" / "pointers.json").write_text(json.dumps({k: "epoch_0001" for k in pointers}))
    (resumed / "metrics.jsonl").write_text((straight / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    (resumed / "summary.json").unlink()
