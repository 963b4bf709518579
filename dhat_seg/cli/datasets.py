"""``dhat-seg datasets``: the datasets dhat-seg reads, and what an image folder holds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dhat_seg.cli.common import print_table, user_errors


def register(root: typer.Typer) -> None:
    """Adds the ``datasets`` command to the root app."""

    @root.command()
    @user_errors
    def datasets(
        data_root: Optional[Path] = typer.Option(None, "--data-root", metavar="ROOT",
                                                 help="an image folder: list the splits, images, classes and masks "
                                                      "that --set data=folder --set data_root=ROOT reads"),
        read_masks: bool = typer.Option(False, "--read-masks",
                                        help="with --data-root: read every mask (checks format and size; "
                                             "gives the mean foreground fraction)"),
    ):
        """List the datasets (name, classes, splits, masks); with --data-root, what an image folder holds."""
        from dhat_seg.data.registry import list_datasets

        if data_root is None:
            rows = [{"name": d.name, "classes": d.num_classes or "from the folders",
                     "splits": ", ".join(d.splits), "masks": _masks_of(d.name), "description": d.description}
                    for d in list_datasets()]
            print_table(rows, [(k, k) for k in ("name", "classes", "splits", "masks", "description")])
            typer.echo("\nan image folder's layout, masks and test splits: docs/datasets.md; check one with "
                       "dhat-seg datasets --data-root ROOT")
            return
        from dhat_seg.data.folder import describe_folder, folder_splits
        from dhat_seg.errors import UserError

        if not folder_splits(data_root):
            raise UserError(f"--data-root {str(data_root)!r} is not a folder: expected an image folder "
                            f"(ROOT/train/<class>/<images>, ...)")
        rows = describe_folder(data_root, read_masks=read_masks)
        print_table(rows, [(k, k) for k in ("split", "images", "classes", "from", "masks")])
        splits = {r["split"] for r in rows}
        missing = [s for s in ("test-mixed-rand", "test-only-fg", "test-no-fg") if s not in splits]
        typer.echo("\nBackgrounds-Challenge accuracies: " + ("yes" if not missing else f"no ({'/, '.join(missing)}/ missing)")
                   + "; attention IoU: " + _iou_verdict(rows))


def _iou_verdict(rows: list[dict]) -> str:
    test = [r for r in rows if r["split"] == "test"]
    if not test:
        return "no (no test/ split)"
    return "yes" if test[0]["masks"] != "-" else "no (masks/test/ missing)"


def _masks_of(name: str) -> str:
    return {"synthetic": "exact", "digits": "exact (the ink)", "folder": "ROOT/masks/<split>/"}.get(name, "-")
