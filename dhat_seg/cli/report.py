"""``dhat-seg report RUN [RUN ...]``: training curves of runs in one PNG, and the runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from dhat_seg.cli.common import user_errors
from dhat_seg.errors import UserError


def register(root: typer.Typer) -> None:
    """Adds the ``report`` command to the root app."""

    @root.command()
    @user_errors
    def report(
        runs: List[Path] = typer.Argument(..., help="run directories written by `dhat-seg train` (or ablate rows)"),
        out: Path = typer.Option(Path("report.png"), help="PNG file of the training curves"),
    ):
        """Draw training curves (loss terms, val clean/robust accuracy, max |logit|) of one or more runs into a
        PNG and print the runs side by side (settings, best epoch, val and test accuracy)."""
        from dhat_seg.reporting import report as build_report

        if out.suffix.lower() != ".png":
            raise UserError(f"--out {str(out)!r} is invalid; expected a .png file name")
        text, png = build_report(runs, out)
        typer.echo(text)
        typer.echo(f"\ncurves written to {png}")
