"""``dhat-seg plugins``: the attention methods installed, and whether each can run."""

from __future__ import annotations

import typer

from dhat_seg.cli.common import print_table, user_errors


def register(root: typer.Typer) -> None:
    """Adds the ``plugins`` command to the root app."""

    @root.command()
    @user_errors
    def plugins():
        """List the attention methods: name, plugin, kind and whether each is ready to run."""
        from dhat_seg.attention.plugin_manager import attention_methods

        methods = attention_methods()  # a plugin that fails to load is reported once, through logging
        rows, reasons = [], []
        for spec in methods.values():
            problem = spec.readiness()
            rows.append({"name": spec.name, "plugin": spec.plugin, "kind": spec.kind,
                         "ready": "yes" if problem is None else "no (see below)", "description": spec.description})
            if problem:
                reasons.append(f"{spec.name}: {problem}")
        print_table(rows, [("name", "name"), ("plugin", "plugin"), ("kind", "kind"), ("ready", "ready"), ("description", "description")])
        if reasons:
            typer.echo("\nnot ready:")
            for line in reasons:
                typer.echo(f"  {line}")


