"""Helpers shared by the ``dhat-seg`` commands: error handling, ``KEY=VALUE`` parsing,
tables, and where a run's settings start."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import typer

from dhat_seg.errors import UserError


def user_errors(fn):
    """Turn UserError (and Ctrl-C) into one line and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished epochs are checkpointed; continue with --resume --out RUN_DIR", err=True)
            raise typer.Exit(130) from None

    return wrapper


def parse_key_values(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a pair without ``=`` is an error naming ``flag``."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"{flag} {pair!r} is invalid; expected KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` with YAML-typed values (``--set milestones=[6,7]``)."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in parse_key_values(pairs, "--set").items()}


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Rows as an aligned text table with a header and a rule; None -> '-'."""
    cells = [[h for _, h in columns]] + [[("-" if r.get(k) is None else str(r.get(k))) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    typer.echo(format_table(rows, columns))


def config_base(config: str | None, *, resume: bool, out: Path | None, has_settings: bool) -> str | Path | None:
    """Where a run's settings start, before the options given on the command line.

    ``--config`` if given; for ``--resume``, the run's own saved config; ``dhat-seg
    train`` with no settings at all (only --out, --seed, --device, --cache-dir), the
    ``quick`` demo preset; otherwise the paper's recipe (the config defaults), so that
    settings given on the command line never mix silently with a preset made for
    something else.
    """
    if config is not None:
        return config
    if resume and out is not None and (out / "config.yaml").is_file():
        return out / "config.yaml"
    return None if has_settings else "quick"


def log(message: str) -> None:
    """A message for the user (stderr, through logging: ``-q`` silences it)."""
    import logging

    logging.getLogger("dhat_seg.cli").info(message)


def show_progress() -> bool:
    """Progress bars unless ``-q`` (they also stay off when stderr is not a terminal)."""
    import logging

    return logging.getLogger("dhat_seg").getEffectiveLevel() <= logging.INFO
