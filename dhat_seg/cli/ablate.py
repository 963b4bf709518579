"""``dhat-seg ablate``: one run per attention method, the paper's Table 10.

:func:`study_settings` and :func:`print_study` are shared with ``dhat-seg compare``
(:mod:`.compare`): the same presets, seeds, evaluation options and printed result."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional

import typer

# Options that ``ablate`` and ``compare`` share (typer accepts one Option object in several commands).
EPOCHS = typer.Option(None, help="training epochs of every row")
SEED = typer.Option(None, help="random seed (data, training and attacks)")
SEEDS = typer.Option(None, metavar="S1,S2,...", help="run every row once per seed, e.g. 0,1,2 "
                     "(seed s in OUT/seed-<s>/<row>/), and report mean ± std (ddof=1) with n "
                     "(default: one run per row with --seed, or the preset's seed, in OUT/<row>/)")
DEVICE = typer.Option(None, help="auto | cpu | cuda | cuda:N")
N_EXAMPLES = typer.Option(None, metavar="N", help="test examples evaluated (default: the preset's)")
AA_EXAMPLES = typer.Option(None, metavar="N", help="AutoAttack examples (default: the preset's)")
GAP_EXAMPLES = typer.Option(None, metavar="N", help="training examples of the Robust Gap (default: the preset's)")
SANITY_EXAMPLES = typer.Option(None, metavar="N", help="test examples of each row's gradient-masking "
                               "sanity checks (default: the preset's)")
CONVERGENCE = typer.Option(2.0, "--convergence-threshold", min=0.0, help="points: a row whose validation clean or PGD "
                           "accuracy moved by more over its last 2 epochs is marked 'still climbing' in the status column")
REPORT_ONLY = typer.Option(False, "--report-only", help="train and evaluate nothing: write the table of the "
                           "rows finished so far (the others pending)")
JOBS = typer.Option(None, "--jobs", metavar="N", help="rows x seeds run at once: 1 (the default) = one after another "
                   "in this process; N = N local worker processes (the CPU cores' torch threads divided among them); with "
                   "--launcher submitit at most N jobs at once (default there: all; one per core on its local executor)")
REUSE = typer.Option(None, "--reuse", metavar="DIR", help="the output folder of another ablate or compare study "
                    "(repeatable): a row x seed finished there with the same config and evaluation settings is copied "
                    "in instead of trained again (e.g. compare's UIAT and DHAT rows from an ablation)")
LAUNCHER = typer.Option("local", "--launcher", help="local (this machine) | submitit (one job per row x seed: Slurm, or "
                        "submitit's local executor with --launcher-opt cluster=local); finished rows are reused either way")
LAUNCHER_CONFIG = typer.Option(None, "--launcher-config", metavar="YAML", help="submitit executor options, a YAML "
                               "mapping (e.g. slurm_partition, gpus_per_node, timeout_min, cpus_per_task, mem_gb, cluster)")
LAUNCHER_OPT = typer.Option(None, "--launcher-opt", metavar="KEY=VALUE", help="one submitit executor option, over "
                            "--launcher-config's (repeatable), e.g. slurm_partition=gpu or cluster=local")


def study_launcher(launcher: str, jobs: int | None, config: Path | None, opts: list[str] | None):
    """The :class:`~dhat_seg.studies.launch.Launcher` of the launcher options, checked
    (a UserError names a bad value; more jobs than cores only warns)."""
    from dhat_seg.studies.ablate import make_launcher
    from dhat_seg.cli.common import log

    return make_launcher(launcher, jobs, config, opts, log=log)


def study_settings(command: str, preset: str, *, epochs: int | None, seed: int | None, seeds: str | None,
                   device: str | None, set_: list[str] | None, counts: Mapping[str, str | None],
                   check_overrides: Callable[[dict[str, Any]], None] | None = None) -> types.SimpleNamespace:
    """The settings of a study from its options: ``preset`` (the ``ABLATE_PRESETS`` entry),
    ``base`` (the shared training config), ``seeds`` (the list run), ``eval_options``,
    ``overrides`` (what the command line changed, for the table) and ``out`` default.
    ``counts``: the evaluation counts given (n_examples, aa_examples, gap_examples,
    sanity_examples: their strings or None); ``check_overrides`` may refuse ``--set`` keys."""
    from dhat_seg.studies import ablate as ab
    from dhat_seg.cli.common import parse_overrides
    from dhat_seg.errors import UserError
    from dhat_seg.evaluation.report import EvalOptions, parse_count

    if preset not in ab.ABLATE_PRESETS:
        raise UserError(f"--preset {preset!r} is unknown; expected one of {', '.join(ab.ABLATE_PRESETS)}")
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs {epochs} is invalid; expected a positive integer")
    p = ab.ABLATE_PRESETS[preset]
    seed_list = ab.parse_seeds(seeds)
    overrides = parse_overrides(set_)
    if check_overrides is not None:
        check_overrides(overrides)
    if seed_list is not None and (seed is not None or "seed" in overrides):
        raise UserError(f"--seeds {seeds} and {'--seed' if seed is not None else '--set seed=...'} are exclusive: "
                        "give every seed with --seeds")
    overrides.update(epochs=epochs, seed=seed, device=device)
    base = ab.base_config(p, overrides)
    eval_kwargs = dict(p.eval)
    for key, zero in (("n_examples", False), ("aa_examples", False), ("gap_examples", True), ("sanity_examples", False)):
        if counts.get(key) is not None:
            eval_kwargs[key] = parse_count(counts[key], "--" + key.replace("_", "-"), allow_zero=zero)
    eval_options = dataclasses.replace(EvalOptions(), **eval_kwargs, seed=base.seed,
                                       device=device or base.device).validate()
    given = {k: v for k, v in overrides.items() if v is not None}
    if seed_list is not None:
        given["seeds"] = ",".join(map(str, seed_list))
    given.update({k: v for k, v in eval_kwargs.items() if k in counts and v != p.eval.get(k)})
    return types.SimpleNamespace(preset=p, base=base, seeds=seed_list or [base.seed], eval_options=eval_options,
                                 overrides=given, out=Path("runs") / f"{command}-{preset}")


def print_study(result: Mapping[str, Any], study, settings: types.SimpleNamespace, rows: list[str], out: Path) -> None:
    """The table (and the paper's, with the paper preset) and where the files are."""
    from dhat_seg.studies.ablate import paper_table

    typer.echo(result["table_markdown"])
    if settings.preset.show_paper and study.paper:
        typer.echo(f"\n(parentheses: {study.paper_caption})\n\n{study.paper_heading}:")
        typer.echo(paper_table(study))
    n = len(settings.seeds)
    runs = f"{len(rows)} rows x {n} seeds" if n > 1 else f"{len(rows)} rows"
    took = "regenerated from the run folders" if result["seconds"] is None else f"in {result['seconds']} s"
    typer.echo(f"\n{runs} {took}; written to {out}/{study.stem}.md, .csv, .json, .png")


def register(root: typer.Typer) -> None:
    """Adds the ``ablate`` command to the root app."""
    from dhat_seg.cli.common import log, parse_key_values, show_progress, user_errors

    @root.command()
    @user_errors
    def ablate(
        attention: str = typer.Option("all", help="'all' (= '-' + every installed method) or a comma list, e.g. -,gradcam,sam; "
                                                  "'-' or 'none' is the UIAT row; METHOD[KEY=VALUE,...] is a row with options "
                                                  "of its own, e.g. oracle[dilate=2]"),
        preset: str = typer.Option("quick", help="quick (built-in data, CPU) | paper (CIFAR-10, WRN-28-10, the paper's settings)"),
        out: Optional[Path] = typer.Option(None, help="output folder, one run directory per row (default runs/ablate-<preset>)"),
        attention_checkpoint: Optional[List[str]] = typer.Option(None, help="NAME=PATH weights of a method, e.g. sam=sam_vit_b.pth (repeatable)"),
        attention_opt: Optional[List[str]] = typer.Option(None, help="NAME:KEY=VALUE option of one method, e.g. ig:n_steps=16 (repeatable)"),
        epochs: Optional[int] = EPOCHS,
        seed: Optional[int] = SEED,
        seeds: Optional[str] = SEEDS,
        device: Optional[str] = DEVICE,
        cache_dir: Optional[Path] = typer.Option(None, help="cache for the shared attention model and masks (default ~/.cache/dhat-seg)"),
        n_examples: Optional[str] = N_EXAMPLES,
        aa_examples: Optional[str] = AA_EXAMPLES,
        gap_examples: Optional[str] = GAP_EXAMPLES,
        sanity_examples: Optional[str] = SANITY_EXAMPLES,
        report_only: bool = REPORT_ONLY,
        convergence_threshold: float = CONVERGENCE,
        jobs: Optional[int] = JOBS,
        launcher: str = LAUNCHER,
        launcher_config: Optional[Path] = LAUNCHER_CONFIG,
        launcher_opt: Optional[List[str]] = LAUNCHER_OPT,
        reuse: Optional[List[Path]] = REUSE,
        set_: Optional[List[str]] = typer.Option(None, "--set", help="any training config option KEY=VALUE (repeatable)"),
    ):
        """Train and evaluate one run per attention method with identical settings: the paper's Table 10
        (Clean, PGD-10, C&W, AA, Robust Gap; plus BG-gap and attention IoU on the built-in data, or on an
        image folder with test-mixed-rand/ and masks/).
        Every row runs the gradient-masking sanity checks of `eval --sanity`; a row failing one is marked suspect.
        With --seeds, every row runs once per seed and the table shows mean ± std over the seeds.
        Writes ablation.md/.csv/.json/.png; finished rows are reused, interrupted ones resume.
        --jobs N runs N rows at once; --launcher submitit runs each row x seed as a submitit (Slurm) job."""
        from dhat_seg.studies import ablate as ab
        from dhat_seg.errors import UserError

        fan = study_launcher(launcher, jobs, launcher_config, launcher_opt)
        s = study_settings("ablate", preset, epochs=epochs, seed=seed, seeds=seeds, device=device, set_=set_,
                           counts={"n_examples": n_examples, "aa_examples": aa_examples, "gap_examples": gap_examples,
                                   "sanity_examples": sanity_examples})
        study = ab.attention_study()
        rows, unavailable = study.parse(attention)
        checkpoints = parse_key_values(attention_checkpoint, "--attention-checkpoint")
        options: dict[str, dict] = {name: dict(opts) for name, opts in s.preset.attention_options.items()}
        for item in attention_opt or []:
            name, sep, rest = item.partition(":")
            if not sep or "=" not in rest:
                raise UserError(f"--attention-opt {item!r} is invalid; expected NAME:KEY=VALUE, e.g. ig:n_steps=16")
            options.setdefault(name.strip(), {}).update(parse_key_values([rest], "--attention-opt"))
        out = out or s.out
        base = s.base
        typer.echo(f"dhat-seg ablate: preset={preset} rows={', '.join(rows)} data={base.data} model={base.model} "
                   f"epochs={base.epochs} seed{'s' if len(s.seeds) > 1 else ''}={','.join(map(str, s.seeds))} -> {out}",
                   err=True)
        result = ab.run_ablation(rows, base, s.eval_options, out, seeds=s.seeds, cache_dir=cache_dir, checkpoints=checkpoints,
                                 attention_options=options, unavailable=unavailable, preset=s.preset, overrides=s.overrides,
                                 log=log, progress=show_progress(), report_only=report_only,
                                 convergence_threshold=convergence_threshold, launcher=fan,
                                 reuse=tuple(reuse or ()))
        print_study(result, study, s, rows, out)
