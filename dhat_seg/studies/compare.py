"""The method comparison (``dhat-seg compare``): one row per training method, same data,
model, schedule and evaluation; the paper's main-results rows beside them.

It is a :class:`~dhat_seg.studies.study.Study` run by the ablation's machinery
(:func:`dhat_seg.studies.run.run_study`): the same presets (``ABLATE_PRESETS``), seeds,
reuse of finished rows, resume of interrupted ones, gradient-masking sanity checks per
row, failed and skipped rows, and tables and plot. Only the rows differ: a row is a
training method, plain (``standard, at, trades, mart, uiat, dhat, cfa, sglr``) or composed
(:data:`METHOD_ROWS`: ``awp`` = AT-AWP, ``trades-awp``, ``dhat-awp``, ``dhat-trades``,
``dhat-mart``, ``dhat-cfa`` = DHAT on CFA's loss, calibration and weight average; ``fsr``,
``fsr-trades``, ``fsr-mart`` = FSR on AT, TRADES, MART, trained and evaluated on the shared
model with the FSR module, ``<model>_fsr``; ``part``, ``part-t``, ``part-m`` = PART on AT, TRADES,
MART, with :func:`part_settings`: ``--attention`` picks their masks too; ``again`` = AT with
AGAIN's batches as the supplementary specifies, :mod:`dhat_seg.training_methods.again`;
``again-code`` = AGAIN as its authors released it, on the shared model with AGAIN's auxiliary
heads, ``<model>_again``, with AWP as released, :mod:`dhat_seg.training_methods.again_code`). A row
whose method is None would be reported as ``skipped: not implemented in this version``,
without numbers (none is, in this version).

    OUT/<row>/ (OUT/seed-<s>/<row>/ with several seeds)   one run directory per row
    OUT/comparison.{md,csv,json,png}                      the table, rewritten after every row

Every row's config is the shared base config (training preset <- compare preset <-
``--set``) with the row's ``method``, ``base`` and ``awp`` settings; the DHAT rows read
one attention method (``--attention``, default: the preset's, Grad-CAM in both).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dhat_seg.studies.rows import AblatePreset, readiness
from dhat_seg.studies.variants import parse_variant, split_rows, variant_name
from dhat_seg.studies.study import COLUMNS, EXTRA_COLUMNS, Study
from dhat_seg.config import TrainConfig, needs_attention
from dhat_seg import method_defaults
from dhat_seg.errors import UserError
from dhat_seg.method_defaults import (AGAIN_CODE_AWP_GAMMA, AGAIN_CODE_AWP_WARMUP, AGAIN_CODE_EPOCHS,
                                      scaled_warmup)

NOT_IMPLEMENTED = "not implemented in this version"


@dataclass(frozen=True)
class MethodRow:
    """A row of the comparison: a training method with its ``base`` and AWP settings
    (``method`` None: a method dhat-seg does not implement)."""

    name: str
    label: str
    method: str | None
    base: str = "at"
    awp: bool = False
    awp_gamma: float | None = None
    #: AWP warm-up epochs at the paper's 100 epochs (``awp_epochs``); scaled with the row's epochs
    awp_warmup: int = 0
    awp_epochs: int = 100
    #: the row's method settings (``{"again": {"form": "code"}}``: AGAIN as released, on ``<model>_again``)
    options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


#: Every known row, in the table's order for ``--methods all``. AT-AWP: gamma 1e-2,
#: no warm-up; TRADES-AWP: gamma 5e-3, AWP from the 10th of 100 epochs (the official
#: ``--awp-warmup 10`` against 1-based epochs: 9 warm-up epochs; Wu et al. 2020, config.py's
#: AWP note); DHAT-AWP takes AT-AWP's (DHAT's base loss is AT's). AGAIN as released: gamma
#: 5e-3, AWP from the 10th of 200 epochs (9 warm-up epochs). Warm-ups scale with the row's epochs.
METHOD_ROWS: dict[str, MethodRow] = {
    r.name: r
    for r in (
        MethodRow("standard", "Standard", "standard"),
        MethodRow("at", "AT", "at"),
        MethodRow("trades", "TRADES", "trades"),
        MethodRow("mart", "MART", "mart"),
        MethodRow("awp", "AT-AWP", "at", awp=True, awp_gamma=1e-2),
        MethodRow("trades-awp", "TRADES-AWP", "trades", awp=True, awp_gamma=5e-3, awp_warmup=9),
        MethodRow("uiat", "UIAT", "uiat"),
        MethodRow("dhat", "DHAT", "dhat"),
        MethodRow("dhat-awp", "DHAT-AWP", "dhat", awp=True, awp_gamma=1e-2),
        MethodRow("dhat-trades", "DHAT-TRADES", "dhat", base="trades"),
        MethodRow("dhat-mart", "DHAT-MART", "dhat", base="mart"),
        MethodRow("sglr", "SGLR", "sglr"),
        MethodRow("cfa", "CFA", "cfa"),
        MethodRow("dhat-cfa", "DHAT-CFA", "dhat", base="cfa"),
        MethodRow("fsr", "AT+FSR", "fsr"),
        MethodRow("fsr-trades", "TRADES+FSR", "fsr", base="trades"),
        MethodRow("fsr-mart", "MART+FSR", "fsr", base="mart"),
        MethodRow("part", "PART", "part"),
        MethodRow("part-t", "PART-T", "part", base="trades"),
        MethodRow("part-m", "PART-M", "part", base="mart"),
        MethodRow("again", "AT+AGAIN", "again"),
        MethodRow("again-code", "AT+AGAIN (as released)", "again", awp=True, awp_gamma=AGAIN_CODE_AWP_GAMMA,
                  awp_warmup=AGAIN_CODE_AWP_WARMUP - 1, awp_epochs=AGAIN_CODE_EPOCHS, options={"again": {"form": "code"}}),
    )
}
ALIASES = {"at-awp": "awp", "at-again": "again", "again-paper": "again", "again-released": "again-code", "at-fsr": "fsr", "trades-fsr": "fsr-trades", "mart-fsr": "fsr-mart",
           "fsr-t": "fsr-trades", "fsr-m": "fsr-mart",
           "part-at": "part", "part-trades": "part-t", "part-mart": "part-m"}
DEFAULT_METHODS = "at,trades,mart,awp,uiat,dhat"
#: ``--methods paper``: the rows of the paper's main results, in its order.
PAPER_ROWS = ("mart", "awp", "uiat", "sglr", "dhat", "dhat-cfa")

#: The DHAT paper's main results: WRN-28-10 on CIFAR-10, L-inf eps 8/255; Clean, PGD-10,
#: C&W, AA accuracy (%) and Robust Gap (points). Source: Zhang et al., "DHAT", ICCV 2025,
#: main-results table (REFERENCE section 1). Keys: compare's row names ("awp" is the
#: paper's "AWP").
PAPER_MAIN_RESULTS: dict[str, dict[str, float]] = {
    "mart": {"clean": 82.99, "pgd10": 56.25, "cw": 52.26, "aa": 50.67, "robust_gap": 9.52},
    "awp": {"clean": 82.67, "pgd10": 57.80, "cw": 54.82, "aa": 51.90, "robust_gap": 6.90},
    "uiat": {"clean": 82.94, "pgd10": 58.66, "cw": 54.11, "aa": 52.17, "robust_gap": 7.92},
    "sglr": {"clean": 85.76, "pgd10": 57.53, "cw": 54.28, "aa": 52.07, "robust_gap": 9.38},
    "dhat": {"clean": 83.95, "pgd10": 60.49, "cw": 55.27, "aa": 53.10, "robust_gap": 3.51},
    "dhat-cfa": {"clean": 84.49, "pgd10": 62.67, "cw": 55.95, "aa": 54.05, "robust_gap": 6.33},
}
PAPER_LABELS = {"awp": "AWP"}

#: The PART paper's Table 1 (ResNet-18 on CIFAR-10, L-inf eps 8/255, masks refreshed every
#: epoch, s = 1): Natural, PGD-20 and AA accuracy (%), means of three runs. Source: Zhang
#: et al., "Improving Accuracy-robustness Trade-off via Pixel Reweighted Adversarial
#: Training", ICML 2024 (REFERENCE section 2). Keys: compare's row names. Printed beside the
#: rows of ``--preset part-paper`` (the PART paper's schedule), with a PGD-20 column.
PAPER_PART_RESULTS: dict[str, dict[str, float]] = {
    "at": {"clean": 82.58, "pgd20": 43.69, "aa": 41.63},
    "part": {"clean": 83.42, "pgd20": 43.65, "aa": 41.74},
    "trades": {"clean": 78.16, "pgd20": 48.28, "aa": 45.05},
    "part-t": {"clean": 79.36, "pgd20": 48.90, "aa": 45.97},
    "mart": {"clean": 76.82, "pgd20": 49.86, "aa": 45.10},
    "part-m": {"clean": 78.67, "pgd20": 50.26, "aa": 45.19},
}

#: The comparison's columns: the ablation's without the attention IoU (in the CSV/JSON).
COMPARE_COLUMNS = tuple((k, h) for k, h in COLUMNS if k != "iou")
COMPARE_EXTRA_COLUMNS = EXTRA_COLUMNS + (("iou", "IoU"),)
#: Under ``--preset part-paper``: PGD-20 after PGD-10 (the PART paper reports PGD-20).
PART_COLUMNS = COMPARE_COLUMNS[:2] + (("pgd20", "PGD-20"),) + COMPARE_COLUMNS[2:]
#: What the comparison shows under ``--preset part-paper``: the PART paper's Table 1.
PART_PAPER_STUDY = {"columns": PART_COLUMNS, "paper": PAPER_PART_RESULTS, "paper_labels": {},
                    "paper_caption": "the PART paper's Table 1 (ResNet-18, CIFAR-10, eps 8/255, masks refreshed every "
                                     "epoch; Natural, PGD-20, AA; means of 3 runs)",
                    "paper_heading": "PART paper Table 1", "paper_key": "paper_part_results"}

#: The presets are the ablation's (same training and evaluation); their descriptions here.
COMPARE_DESCRIPTIONS = {
    "quick": "built-in data (32x32; synthetic unless --set data=digits), small CNN, the `quick` training preset unchanged (batches of 32, "
             "3-step attacks, 15 epochs decayed at 10; DHAT rows with FLOE in the bounded 'relative' form), AWP warm-ups scaled to "
             "the 15 epochs; evaluation on the first 500 test samples, AutoAttack on the first 100, Robust Gap on 500 "
             "training samples, gradient-masking sanity checks on the first 1000 test samples (the whole quick test "
             "split: power 0.8 to detect noise breaking 5% of the PGD-robust samples)",
    "paper": "the paper's setting (REFERENCE section 1): CIFAR-10, WRN-28-10, 100 epochs, lr 0.1 decayed at 80/90, "
             "10-step attacks in training; DHAT rows with Grad-CAM from a normally trained ResNet-18. Evaluation on "
             "the full test set (AutoAttack standard on all 10000), Robust Gap on the first 10000 training samples, "
             "gradient-masking sanity checks on the first 1000 test samples. Needs a GPU and CIFAR-10 "
             "(--set download=true or --set data_root=...)",
}

#: Settings a row defines, refused in ``--set`` (the option to use instead).
ROW_SETTINGS = {"method": "--methods", "base": "--methods (e.g. dhat-trades)", "awp": "--methods (e.g. awp, dhat-awp)",
                "awp_gamma": "--methods", "awp_warmup": "--methods", "attention": "--attention",
                "again.form": "--methods (again: the paper's form; again-code: as released)"}


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Refuse ``--set`` of a setting that the rows define."""
    from dhat_seg.method_options import explicit_keys, migrate

    given = explicit_keys(migrate(dict(overrides)))
    for key, option in ROW_SETTINGS.items():
        if key in given:
            raise UserError(f"--set {key}=... is not allowed: every row sets its own {key}; use {option}")


def method_rows() -> dict[str, MethodRow]:
    """:data:`METHOD_ROWS`, then a row of its own name for every registered training method that no row
    trains (a method added with :func:`~dhat_seg.training_methods.register_training_method`)."""
    from dhat_seg.training_methods import TRAINING_METHODS

    rows = dict(METHOD_ROWS)
    covered = {row.method for row in rows.values()}
    for name in TRAINING_METHODS:
        if name not in covered and name not in rows:
            rows[name] = MethodRow(name, name, name)
    return rows


def parse_methods(value: str, attention: str, installed: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """``--methods`` -> (row names, {name: skip reason}).

    A comma list of :data:`METHOD_ROWS` names (case-insensitive, ``_`` as ``-``), or
    ``all`` (every known row) or ``paper`` (the paper's main-results rows). Rows dhat-seg
    does not implement are skipped as such; DHAT rows are skipped when ``attention`` is a
    built-in attention method whose optional dependency is missing."""
    from dhat_seg.attention.plugin_manager import BUILTIN_PLUGINS

    value = (value or "").strip()
    rows = method_rows()
    names = list(rows) if value.lower() == "all" else list(PAPER_ROWS) if value.lower() == "paper" else []
    for part in ([] if names else split_rows(value)):
        row_name, own = parse_variant(part.strip())
        row_name = row_name.lower().replace("_", "-")
        row_name = ALIASES.get(row_name, row_name)
        if row_name not in rows:
            raise UserError(f"--methods {part!r} is unknown; expected 'all', 'paper' or a comma list of "
                            f"{', '.join(rows)} (a row may carry options of its own: dhat[attention=u2net])")
        unknown = sorted(set(own) - set(ROW_OPTIONS))
        if unknown:
            raise UserError(f"--methods {part!r} sets {', '.join(unknown)}; a method row takes only "
                            f"{', '.join(ROW_OPTIONS)} in brackets, e.g. dhat[attention=u2net]")
        if own and not needs_attention(rows[row_name].method or ""):
            raise UserError(f"--methods {part!r}: {row_name} reads no attention method; [attention=...] is for "
                            "rows that do (dhat, dhat-trades, part, ...)")
        name = variant_name(row_name, own)
        if name not in names:
            names.append(name)
    if not names:
        raise UserError(f"--methods is empty; expected 'all', 'paper' or a comma list such as {DEFAULT_METHODS}")
    unavailable = {}
    for name in names:
        row_name, own = parse_variant(name)
        row, used = rows[row_name], own.get("attention", attention)
        if row.method is None:
            unavailable[name] = NOT_IMPLEMENTED
        elif needs_attention(row.method) and used not in installed:
            if used not in BUILTIN_PLUGINS:
                flag = "--methods ... [attention=...]" if "attention" in own else "--attention"
                raise UserError(f"{flag} {used!r} is unknown; expected one of {', '.join(installed)}")
            unavailable[name] = (f"the built-in attention method {used!r} is unavailable (an optional dependency "
                                 "is missing; see `dhat-seg plugins`)")
    return names, unavailable


#: Options a comparison row may carry in brackets (``dhat[attention=u2net]``).
ROW_OPTIONS = ("attention",)


def row_attention(name: str, attention: str) -> tuple[str, str]:
    """(the :data:`METHOD_ROWS` name, the attention method) of a row name that may carry
    ``[attention=...]``; ``attention``: the study's."""
    row_name, own = parse_variant(name)
    return row_name, own.get("attention", attention)


def compare_label(name: str) -> str:
    """A row's label: "DHAT", or "DHAT [U^2-Net-p]" for ``dhat[attention=u2net]``."""
    from dhat_seg.studies.rows import DISPLAY

    row_name, own = parse_variant(name)
    label = method_rows()[row_name].label
    return label + (f" [{DISPLAY.get(own['attention'], own['attention'])}]" if "attention" in own else "")


def compare_key(name: str) -> str:
    """A row's run-directory name: the row's, or "dhat-u2net" for ``dhat[attention=u2net]``."""
    row_name, own = parse_variant(name)
    return row_name + (f"-{own['attention']}" if "attention" in own else "")


#: CFA's defaults (config.py), epochs of the paper's 100
CFA_BEGIN, FAWA_BEGIN = 10, 50


def method_config(base: TrainConfig, name: str, attention: str,
                  options: Mapping[str, Mapping[str, Any]] | None = None) -> TrainConfig:
    """The training config of a row: the shared base with the row's method, base and AWP
    settings (``awp: false`` for the others), for FSR rows the base's model with the FSR
    module (``<model>_fsr``), for ``again-code`` the one with AGAIN's heads (``<model>_again``), and for DHAT rows the attention method
    ``attention`` with its preset options (``options``) under the base's."""
    from dhat_seg.training_methods import TRAINING_METHODS, reads_base

    name, attention = row_attention(name, attention)
    row = method_rows().get(name)
    if row is None or row.method is None:
        raise UserError(f"method row {name!r} is {'unknown' if row is None else NOT_IMPLEMENTED}")
    method_options = {owner: dict(dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s)
                      for owner, s in base.method_options.items()}
    for owner, settings in row.options.items():
        method_options.setdefault(owner, {}).update(settings)
    values: dict[str, Any] = {"method": row.method, "base": row.base, "awp": row.awp, "method_options": method_options}
    if row.awp:
        values.update(awp_gamma=row.awp_gamma, awp_warmup=scaled_warmup(row.awp_warmup, base.epochs, row.awp_epochs))
    if "cfa" in (row.method, row.base if reads_base(row.method) else None):
        # CFA's start epochs are for the paper's schedule (calibration from epoch 10, the
        # weight average from 50, of 100 epochs): scaled like AWP's warm-up unless set with --set
        cfa = base.options("cfa")
        for key, paper in (("begin", CFA_BEGIN), ("fawa_begin", FAWA_BEGIN)):
            if getattr(cfa, key) == paper:
                method_options.setdefault("cfa", {})[key] = scaled_warmup(paper, base.epochs)
    entry = TRAINING_METHODS[row.method]
    variant = entry.model_variant(dataclasses.replace(base, **values)) if entry.model_variant else None
    if variant:  # FSR's module, AGAIN's heads: the method picks its variant of the shared model (the registry's)
        values["model"] = variant
    if needs_attention(row.method):
        values.update(attention=attention, attention_options={**(options or {}).get(attention, {}),
                                                              **(base.attention_options or {})})
    if row.method == "part":
        values.update(part_settings(base, attention, values["attention_options"]))
    return dataclasses.replace(base, **values).validate()


def part_settings(base: TrainConfig, attention: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """A PART row's mask settings (:func:`dhat_seg.method_defaults.part_settings`): set only
    where ``base`` holds the default (``--set`` wins)."""
    from dhat_seg.config import FIELDS

    return method_defaults.part_settings(base.epochs, attention, options,
                                         lambda key: getattr(base, key) != FIELDS[key].default)


def _describe(name: str, attention: str) -> dict[str, Any]:
    from dhat_seg.training_methods import reads_base

    name, attention = row_attention(name, attention)
    row = method_rows()[name]
    if row.method is None:
        return {"method": None, "base": None, "awp": None, "attention": None}
    return {"method": row.method, "base": row.base if reads_base(row.method) else None, "awp": row.awp,
            "attention": attention if needs_attention(row.method) else None}


def method_study(attention: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> Study:
    """The comparison's rows, DHAT rows with the attention method ``attention``."""

    def parse(value: str) -> tuple[list[str], dict[str, str]]:
        from dhat_seg.attention.plugin_manager import attention_methods

        return parse_methods(value, attention, attention_methods())

    def ready(name: str, cfg: TrainConfig) -> str | None:
        from dhat_seg.attention.plugin_manager import attention_methods

        if not needs_attention(cfg.method):
            return None
        methods = attention_methods()
        if cfg.attention not in methods:
            return f"the attention method {cfg.attention!r} is not installed"
        return readiness(cfg.attention, cfg, methods[cfg.attention], methods,
                         fix="dhat-seg compare: --set attention_checkpoint=PATH")

    return Study(
        command="compare", stem="comparison", title="training methods", reference="DHAT main results",
        row_header="method", parse=parse, config=lambda base, name: method_config(base, name, attention, options),
        label=compare_label, key=compare_key,
        describe=lambda name: _describe(name, attention), describe_keys=("method", "base", "awp", "attention"),
        readiness=ready, columns=COMPARE_COLUMNS, extra_columns=COMPARE_EXTRA_COLUMNS, paper=PAPER_MAIN_RESULTS,
        paper_labels=PAPER_LABELS, paper_caption="the DHAT paper's main results (WRN-28-10, CIFAR-10, eps 8/255)",
        paper_heading="Paper main results", paper_key="paper_main_results", per_preset={"part-paper": PART_PAPER_STUDY},
        reference_row="dhat", pairwise_keys=PAIRWISE_KEYS)


#: The metrics on which the comparison says which methods differ (docs/results.md, fixed
#: before the runs): clean, PGD-10 and AutoAttack accuracy, random backgrounds, and the
#: background's class with the object removed.
PAIRWISE_KEYS = ("clean", "pgd10", "aa", "mixed_rand", "no_fg_bg_class")


def run_comparison(methods: list[str], base: TrainConfig, eval_options, out: Path, *, attention: str | None = None,
                   preset: AblatePreset | None = None, unavailable: Mapping[str, str] | None = None,
                   **kwargs: Any) -> dict[str, Any]:
    """Train and evaluate every method row (``run_study``'s keywords: seeds, cache_dir,
    overrides, log, progress, trainer_factory); returns comparison.json's content.
    ``attention``: the DHAT rows' attention method (default: the base config's)."""
    from dhat_seg.studies.run import run_study

    attention = attention or base.attention
    study = method_study(attention, preset.attention_options if preset else None)
    if preset is not None:
        preset = dataclasses.replace(preset, description=COMPARE_DESCRIPTIONS.get(preset.name, preset.description))
    if unavailable is None:
        methods, unavailable = study.parse(",".join(methods))
    return run_study(study, methods, base, eval_options, out, preset=preset, unavailable=unavailable, **kwargs)
