"""``dhat-seg ablate``: one run per attention method, the paper's Table 10."""

from __future__ import annotations

import typer


def register(root: typer.Typer) -> None:
    """Adds the ``ablate`` command to the root app."""
