"""What a study's rows are: the one thing that differs between ``dhat-seg ablate`` (one row
per attention method) and ``dhat-seg compare`` (one row per training method).

The runner (:func:`dhat_seg.studies.run.run_study`) and the outputs
(:mod:`dhat_seg.studies.output`) read everything row-specific from a :class:`Study`: how a
row list is parsed, a row's label and run-directory name, its training config, whether it
can run, its descriptive CSV/JSON fields, the table's columns and the paper's numbers to
print beside the measured ones. The training and evaluation settings (presets, seeds,
reuse, resume, sanity checks, failed and skipped rows) are shared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

#: (key in a row's metrics, column header). BG-gap is the clean one; the PGD-10 BG-gap
#: is in the CSV/JSON. IoU is the attention foreground IoU with the ground truth.
#: mixed-rand and only-FG are the Backgrounds-Challenge clean accuracies (random
#: backgrounds; objects on black); no-FG (background's class) is in the CSV/JSON.
COLUMNS = (("clean", "Clean"), ("pgd10", "PGD-10"), ("cw", "C&W"), ("aa", "AA"), ("robust_gap", "Robust Gap"),
           ("bg_gap", "BG-gap"), ("mixed_rand", "mixed-rand"), ("only_fg", "only-FG"), ("iou", "IoU"))
EXTRA_COLUMNS = (("bg_gap_pgd10", "BG-gap PGD-10"), ("no_fg_bg_class", "no-FG (bg class)"),
                 ("mixed_rand_pgd10", "mixed-rand PGD-10"), ("only_fg_pgd10", "only-FG PGD-10"))


def _no_problem(name: str, cfg: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Study:
    """The row specification of a study (see the module doc)."""

    #: the command ("ablate", "compare"): messages and hints name it
    command: str
    #: output files OUT/<stem>.md, .csv, .json, .png
    stem: str
    #: heading of the markdown and the plot, e.g. "attention methods"
    title: str
    #: header of the table's first column
    row_header: str
    #: row list (a CLI value) -> (row names, {name: why it is skipped without running})
    parse: Callable[[str], tuple[list[str], dict[str, str]]]
    #: (the shared base config, row name) -> the row's training config
    config: Callable[[Any, str], Any]
    #: row name -> its label in the table
    label: Callable[[str], str]
    #: row name -> its run directory name
    key: Callable[[str], str]
    #: row name -> descriptive fields of the CSV/JSON (keys: ``describe_keys``, in order)
    describe: Callable[[str], dict[str, Any]]
    describe_keys: tuple[str, ...]
    #: (row name, its config) -> None when it can run, else why not
    readiness: Callable[[str, Any], str | None] = _no_problem
    columns: tuple[tuple[str, str], ...] = COLUMNS
    extra_columns: tuple[tuple[str, str], ...] = EXTRA_COLUMNS
    #: what the study reproduces, in the markdown's heading, e.g. "DHAT Table 10"
    reference: str = ""
    #: the paper's numbers per row name (printed in parentheses with a preset's show_paper)
    paper: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    #: labels of the paper's rows in the paper table (default: ``label``)
    paper_labels: Mapping[str, str] = field(default_factory=dict)
    #: what the paper's numbers are, e.g. "the paper's Table 10 (WRN-28-10, CIFAR-10)"
    paper_caption: str = ""
    #: heading of the paper's table, e.g. "Paper Table 10"
    paper_heading: str = ""
    #: key of the paper's numbers in <stem>.json
    paper_key: str = "paper"
    #: the plot's attention-IoU panels (attention rows)
    iou_panels: bool = False
    #: the row every other row is compared with seed by seed (e.g. "-", UIAT, in the
    #: ablation); None: no paired differences
    reference_row: str | None = None
    #: metrics on which every pair of rows is compared seed by seed (the comparison's
    #: "which methods differ"; :func:`dhat_seg.studies.paired.pairwise_differences`)
    pairwise_keys: tuple[str, ...] = ()
    #: preset name -> fields that differ under that preset (e.g. another paper's table and
    #: columns: the PART paper under ``part-paper``)
    per_preset: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def for_preset(self, preset_name: str | None) -> "Study":
        """The study as it runs under the preset ``preset_name`` (itself when nothing differs)."""
        changes = self.per_preset.get(preset_name or "", {})
        return dataclasses.replace(self, **changes) if changes else self

    def paper_label(self, name: str) -> str:
        return self.paper_labels.get(name) or self.label(name)
