"""The attention ablation (DHAT Table 10): one run per attention method, same settings.

Rows: "-" is UIAT (the same pipeline without background extraction, method ``uiat``);
every other row is DHAT with one attention method (gradcam, ig, solo, sam, then the
built-ins beyond the paper, u2net and oracle, then any installed third-party method).
Each row is a run directory under the output folder:

    OUT/uiat/, OUT/gradcam/, ...     config.yaml, metrics.jsonl, checkpoints/, summary.json, eval.json
    OUT/ablation.{md,csv,json,png}   the table, rewritten after every row

With several seeds (``--seeds 0,1,2``) every row runs once per seed, seed ``s`` in
``OUT/seed-<s>/<row>/``, and the table shows the mean +- the sample standard deviation
(ddof=1) over the seeds with results, with their number n; ablation.json keeps every
seed's values. The seed is the run's ``seed``: it seeds training, attacks and
evaluation. The data is the same for every seed: its ``data_seed`` (default: the first
seed; ``--set data_seed=N``) generates the synthetic data, draws every dataset's
validation carve-out and seeds the frozen attention model, so the attention model and
the mask caches are built once per method and shared by all seeds. The spread over
seeds is thus the spread of training on one dataset with fixed masks.

Every row is evaluated with the gradient-masking sanity checks of ``dhat-seg eval
--sanity`` (:mod:`dhat_seg.evaluation.sanity`, binomial tests at alpha 0.01); a row that fails one is
``suspect: <check> failed (<count> of <n>, p = <p-value>)``, in the table and the plot,
never a plain result. A row whose ``summary.json`` and
``eval.json`` (with its sanity results) match its config and the evaluation settings is
reused, an interrupted row resumes from its last checkpoint, a row that raises is
reported as ``failed: <error>`` (traceback in OUT/<row>/error.log), and a method that
cannot run (``spec.readiness`` says why, e.g. no SAM checkpoint) is ``skipped: <reason>``.
All of this holds per seed. The table is produced in every case.

All DHAT rows whose method reads a classifier (Grad-CAM, IG, SAM prompted at
CAM peaks) share one frozen, normally trained attention model, trained once into the cache.

The machinery is shared with ``dhat-seg compare`` (:mod:`dhat_seg.studies.compare`, one row per
training method): a :class:`~dhat_seg.studies.study.Study` says what a study's rows are
(parsing, label, run directory, config, readiness, paper numbers), and
:func:`~dhat_seg.studies.run.run_study` runs any study; :func:`run_ablation` is the
attention study.

Modules: :mod:`~dhat_seg.studies.study` (the row specification), :mod:`~dhat_seg.studies.rows`
(attention rows, seeds), :mod:`~dhat_seg.studies.presets` (quick, paper, part-paper),
:mod:`~dhat_seg.studies.variants` (rows with options of their own), :mod:`~dhat_seg.studies.trend`
(the Table 10 hypotheses' tests), :mod:`~dhat_seg.studies.cost` (what the runs cost), :mod:`~dhat_seg.studies.run` (training and evaluating the
rows), :mod:`~dhat_seg.studies.launch` (rows fanned out: ``--jobs N`` worker processes or
submitit jobs), :mod:`~dhat_seg.studies.output` (tables and plot).
"""

from dhat_seg.studies.output import markdown_table, paper_table, plot, write_outputs
from dhat_seg.studies.rows import (
    ABLATE_PRESETS,
    ATTENTION_STUDY,
    attention_study,
    ordered_methods,
    parse_rows,
    row_config,
    row_key,
    row_label,
    NEEDS_DOWNLOAD,
    NO_DOWNLOAD_HINT,
    PAPER_ORDER,
    ROW_ORDER,
    UIAT,
    AblatePreset,
    Row,
    SeedRows,
    base_config,
    combined_status,
    mean_std,
    parse_seeds,
    readiness,
    run_dir_for,
    sanity_status,
)
from dhat_seg.studies.launch import LAUNCHERS, Launcher, make_launcher
from dhat_seg.studies.run import RowJob, describe_config, metrics_from_report, run_ablation, run_row, run_study
from dhat_seg.studies.study import Study

__all__ = [
    "ABLATE_PRESETS", "ATTENTION_STUDY", "LAUNCHERS", "NEEDS_DOWNLOAD", "NO_DOWNLOAD_HINT", "PAPER_ORDER", "ROW_ORDER",
    "UIAT", "AblatePreset", "Launcher", "RowJob", "make_launcher", "run_row", "Row", "SeedRows", "Study", "attention_study", "base_config", "combined_status", "describe_config",
    "markdown_table", "mean_std", "metrics_from_report", "ordered_methods", "paper_table", "parse_rows", "parse_seeds",
    "plot", "readiness", "row_config", "row_key", "row_label", "run_ablation", "run_dir_for", "run_study", "sanity_status", "write_outputs",
]
