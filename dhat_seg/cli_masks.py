"""``dhat-seg masks ...``: build, inspect and score per-sample foreground mask caches."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Per-sample foreground mask caches: build, info, show, score.")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="masks")
