"""Epoch records as an aligned, rounded text table (stdout while training, or a finished
run): :class:`EpochTable`, :func:`format_value`, :func:`default_columns`. Pure, no torch."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence




MISSING = "-"
BEST_MARK = "*"
_GAP = "  "

# ----------------------------------------------------------------------------- values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fixed(value: float, decimals: int) -> str:
    if not math.isfinite(value):
        return str(value)  # nan, inf, -inf
    return f"{value:.{decimals}f}"


def format_value(key: str, value: Any) -> str:
    """One metrics value as short text: ``lr`` with up to 4 significant digits, losses
    (``train_*``) 4 decimals, accuracies and logit sizes 2 decimals, ``seconds`` 1
    decimal, ``epoch`` as an integer, ``best`` as ``*`` or nothing, None as ``-``."""
    if value is None:
        return MISSING
    if key == "best":
        return BEST_MARK if value else ""
    if isinstance(value, bool):
        return str(value).lower()
    if not _is_number(value):
        return str(value)
    if key == "epoch":
        return str(int(value))
    if key == "lr":
        return f"{value:.4g}"
    if key == "seconds":
        return _fixed(value, 1)
    if key.endswith("_acc") or "max_logit" in key:
        return _fixed(value, 2)
    if key.startswith("train_"):
        return _fixed(value, 4)
    return f"{value:.4g}"


# ----------------------------------------------------------------------------- epoch table

#: Short headers of the well-known keys; any other ``train_*`` key drops its prefix.
HEADERS: dict[str, str] = {
    "epoch": "ep",
    "lr": "lr",
    "train_loss": "loss",
    "val_clean_acc": "val_clean",
    "val_robust_acc": "val_rob",
    "train_max_logit_clean": "max|z|",
    "train_max_logit_adv": "max|z_adv|",
    "train_max_logit_background": "max|z_bg|",
    "best": "best",
    "seconds": "s",
}

#: Widths that hold typical values, so rows align before all values are known.
_MIN_WIDTH = {"epoch": 4, "lr": 9, "seconds": 7, "best": 4}
_DEFAULT_WIDTH = {"train": 8, "acc": 6, "logit": 8, "other": 8}


def header_for(key: str) -> str:
    """The short column header of a record key (``train_ce_adv`` -> ``ce_adv``)."""
    if key in HEADERS:
        return HEADERS[key]
    if key.startswith("train_max_logit_"):
        return f"max|z_{key[len('train_max_logit_'):]}|"
    if key.startswith("train_"):
        return key[len("train_"):]
    return key


def _kind(key: str) -> str:
    if "max_logit" in key:
        return "logit"
    if key.endswith("_acc"):
        return "acc"
    if key.startswith("train_"):
        return "train"
    return "other"


def column_width(key: str) -> int:
    """The fixed width of a column: its header or its typical value, whichever is longer."""
    typical = _MIN_WIDTH.get(key, _DEFAULT_WIDTH[_kind(key)])
    return max(len(header_for(key)), typical)


def _is_loss_term(key: str) -> bool:
    return key.startswith("train_") and "max_logit" not in key


def default_columns(record: Mapping[str, Any]) -> list[str]:
    """The columns for records like ``record``, in reading order: epoch, lr, the loss
    terms (``train_loss`` first), validation accuracies, other values, the logit sizes,
    the best marker, seconds. Only keys present in ``record`` are taken."""
    keys = list(record)
    first = [k for k in ("epoch", "lr") if k in record]
    losses = (["train_loss"] if "train_loss" in record else []) + [
        k for k in keys if _is_loss_term(k) and k != "train_loss"]
    val = [k for k in ("val_clean_acc", "val_robust_acc") if k in record]
    logits = [k for k in keys if k.startswith("train_max_logit")]
    last = [k for k in ("best", "seconds") if k in record]
    taken = set(first + losses + val + logits + last)
    others = [k for k in keys if k not in taken]
    return first + losses + val + others + logits + last


def _fit(key: str, value: Any, width: int) -> str:
    """``format_value``, shortened to 4 significant digits when it would not fit."""
    text = format_value(key, value)
    if len(text) > width and _is_number(value):
        text = f"{value:.4g}"
        if len(text) > width:
            text = f"{value:.2g}"
    return text


class EpochTable:
    """Epoch records as an aligned text table, one line per record.

    ``columns`` are record keys; by default they are taken from the first record seen
    (:func:`default_columns`), and a key that first appears in a later record is not
    shown. Every column has a fixed width (:func:`column_width`), so rows printed one
    at a time line up with the header::

        table = EpochTable()
        for i, record in enumerate(records):
            if i == 0:
                print(table.header(record))
            print(table.row(record))
    """

    def __init__(self, columns: Sequence[str] | None = None):
        self.columns: list[str] | None = list(columns) if columns is not None else None

    def _ensure_columns(self, record: Mapping[str, Any] | None) -> list[str]:
        if self.columns is None:
            if record is None:
                raise ValueError("EpochTable has no columns yet: pass columns=, or the first record to header()")
            self.columns = default_columns(record)
        return self.columns

    @property
    def widths(self) -> list[int]:
        return [column_width(k) for k in self.columns or []]

    def _join(self, cells: Iterable[str]) -> str:
        return _GAP.join(c.rjust(w) for c, w in zip(cells, self.widths))

    def header(self, record: Mapping[str, Any] | None = None) -> str:
        """Two lines: the column headers and a rule under them. ``record`` (the first
        record) decides the columns when they were not given."""
        columns = self._ensure_columns(record)
        names = self._join(header_for(k) for k in columns)
        return names + "\n" + self.rule()

    def rule(self) -> str:
        """A line of dashes as wide as the table."""
        return _GAP.join("-" * w for w in self.widths)

    def row(self, record: Mapping[str, Any]) -> str:
        """One record as a line of the table (keys not in the columns are left out; a
        column the record lacks shows ``-``)."""
        columns = self._ensure_columns(record)
        return self._join(_fit(k, record.get(k), w) for k, w in zip(columns, self.widths))

    def render(self, records: Sequence[Mapping[str, Any]]) -> str:
        """The whole table (header, rule, one row per record) as one string."""
        if not records and self.columns is None:
            return ""
        lines = [self.header(records[0] if records else None)]
        lines += [self.row(r) for r in records]
        return "\n".join(lines)




class EpochPrinter:
    """Writes epoch records one line at a time as an :class:`EpochTable` through ``write``
    (e.g. ``print``; the full records stay in metrics.jsonl). The columns are what the
    training method logs: taken from the first record, and when a later record brings keys
    the table lacks (DHAT's loss terms after epochs of attention burn-in trained as UIAT),
    the columns are taken again from that record and the header is printed again.
    ``prefix`` starts every line (e.g. an indent for a nested run)."""

    def __init__(self, write: Callable[[str], None] = print, prefix: str = ""):
        self.write, self.prefix, self.table = write, prefix, None

    def __call__(self, record: Mapping[str, Any]) -> None:
        if self.table is None or any(k not in (self.table.columns or []) for k in record):
            self.table = EpochTable(default_columns(record))
            for line in self.table.header(record).splitlines():
                self.write(self.prefix + line)
        self.write(self.prefix + self.table.row(record))
