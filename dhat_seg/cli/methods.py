"""``dhat-seg methods``: the training methods registered, their bases and their settings."""

from __future__ import annotations

import dataclasses

import typer

from dhat_seg.cli.common import print_table, user_errors


def describe_settings(entry) -> str:
    """``trades.beta=6.0, ...``: a method's settings with their defaults ('-' for none)."""
    if entry.settings is None:
        return "-"
    return ", ".join(f"{entry.name}.{f.name}={f.default!r}" for f in dataclasses.fields(entry.settings))


def register(root: typer.Typer) -> None:
    """Adds the ``methods`` command to the root app."""

    @root.command()
    @user_errors
    def methods():
        """List the training methods: name, the bases it builds on, whether it is a base, and its settings
        (``--set METHOD.KEY=VALUE``) with their defaults."""
        from dhat_seg.training_methods import TRAINING_METHODS

        rows = [{"name": e.name, "bases": "|".join(e.allowed_bases()) or "-", "is base": "yes" if e.is_base else "-",
                 "attack mode": e.attack_mode, "settings (defaults)": describe_settings(e)}
                for e in TRAINING_METHODS.values()]
        print_table(rows, [(k, k) for k in ("name", "bases", "is base", "attack mode", "settings (defaults)")])
        typer.echo("\nany method: --set awp=true (adversarial weight perturbation); descriptions: docs/methods.md")
