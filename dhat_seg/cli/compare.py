"""``dhat-seg compare``: one run per training method with identical settings, beside the
paper's main results; the ablation's machinery with method rows (:mod:`dhat_seg.studies.compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(root: typer.Typer) -> None:
    """Adds the ``compare`` command to the root app."""
    from dhat_seg.cli.ablate import (AA_EXAMPLES, CONVERGENCE, DEVICE, EPOCHS, GAP_EXAMPLES, JOBS, LAUNCHER, LAUNCHER_CONFIG,
                                     LAUNCHER_OPT, N_EXAMPLES, REPORT_ONLY, REUSE, SANITY_EXAMPLES, SEED, SEEDS, print_study,
                                     study_launcher, study_settings)
    from dhat_seg.cli.common import log, show_progress, user_errors

    @root.command()
    @user_errors
    def compare(
        methods: str = typer.Option("at,trades,mart,awp,uiat,dhat", help="a comma list of standard, at, trades, mart, "
                                    "awp (AT-AWP), trades-awp, uiat, dhat, dhat-awp, dhat-trades, dhat-mart, cfa, dhat-cfa, "
                                    "sglr, fsr (AT+FSR), fsr-trades, fsr-mart (on the model + _fsr), part, part-t, "
                                    "part-m (PART on AT, TRADES, MART), again (AT+AGAIN, the paper's), again-code "
                                    "(AGAIN as released, on the model + _again, with AWP); 'paper' = the paper's rows, "
                                    "'all' = every one"),
        preset: str = typer.Option("quick", help="quick (built-in data, CPU) | paper (CIFAR-10, WRN-28-10, the paper's settings) | "
                                    "part-paper (CIFAR-10, ResNet-18, the PART paper's schedule)"),
        out: Optional[Path] = typer.Option(None, help="output folder, one run directory per row (default runs/compare-<preset>)"),
        attention: Optional[str] = typer.Option(None, help="attention method of the DHAT and PART rows (default: the "
                                                "preset's, gradcam; PART rows take Grad-CAM from the model being trained)"),
        epochs: Optional[int] = EPOCHS,
        seed: Optional[int] = SEED,
        seeds: Optional[str] = SEEDS,
        device: Optional[str] = DEVICE,
        cache_dir: Optional[Path] = typer.Option(None, help="cache for the DHAT rows' attention model and masks (default ~/.cache/dhat-seg)"),
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
        set_: Optional[List[str]] = typer.Option(None, "--set", help="a training config option KEY=VALUE shared by every row "
                                                 "(repeatable; not method, base, awp*, attention: the rows set those)"),
    ):
        """Train and evaluate one run per training method with identical data, model, schedule and evaluation
        (Clean, PGD-10, C&W, AA, Robust Gap; plus BG-gap on the built-in data, or on an image folder with
        test-mixed-rand/); the paper preset prints the DHAT paper's main results beside them.
        Every row runs the gradient-masking sanity checks of `eval --sanity`.
        With --seeds, every row runs once per seed and the table shows mean ± std over the seeds.
        Writes comparison.md/.csv/.json/.png; finished rows are reused, interrupted ones resume.
        --jobs N runs N rows at once; --launcher submitit runs each row x seed as a submitit (Slurm) job."""
        from dhat_seg.studies import compare as cmp

        fan = study_launcher(launcher, jobs, launcher_config, launcher_opt)
        s = study_settings("compare", preset, epochs=epochs, seed=seed, seeds=seeds, device=device, set_=set_,
                           counts={"n_examples": n_examples, "aa_examples": aa_examples, "gap_examples": gap_examples,
                                   "sanity_examples": sanity_examples}, check_overrides=cmp.check_overrides)
        base = s.base
        attention = (attention or base.attention).strip()
        study = cmp.method_study(attention, s.preset.attention_options)
        rows, unavailable = study.parse(methods)
        out = out or s.out
        if attention != base.attention:
            s.overrides["attention"] = attention
        typer.echo(f"dhat-seg compare: preset={preset} rows={', '.join(rows)} data={base.data} model={base.model} "
                   f"epochs={base.epochs} attention={attention} seed{'s' if len(s.seeds) > 1 else ''}="
                   f"{','.join(map(str, s.seeds))} -> {out}", err=True)
        result = cmp.run_comparison(rows, base, s.eval_options, out, attention=attention, seeds=s.seeds,
                                    cache_dir=cache_dir, unavailable=unavailable, preset=s.preset, overrides=s.overrides,
                                    log=log, progress=show_progress(), report_only=report_only,
                                    convergence_threshold=convergence_threshold, launcher=fan,
                                    reuse=tuple(reuse or ()))
        print_study(result, study, s, rows, out)
