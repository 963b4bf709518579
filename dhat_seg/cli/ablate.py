"""``dhat-seg ablate``: one run per attention method, the paper's Table 10."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

import typer


def register(root: typer.Typer) -> None:
    """Adds the ``ablate`` command to the root app."""
    from dhat_seg.cli.common import log, parse_key_values, parse_overrides, show_progress, user_errors
    from dhat_seg.evaluation_report import parse_count

    @root.command()
    @user_errors
    def ablate(
        attention: str = typer.Option("all", help="'all' (= '-' + every installed method) or a comma list, e.g. -,gradcam,sam; "
                                                  "'-' or 'none' is the UIAT row"),
        preset: str = typer.Option("quick", help="quick (built-in data, CPU) | paper (CIFAR-10, WRN-28-10, the paper's settings)"),
        out: Optional[Path] = typer.Option(None, help="output folder, one run directory per row (default runs/ablate-<preset>)"),
        attention_checkpoint: Optional[List[str]] = typer.Option(None, help="NAME=PATH weights of a method, e.g. sam=sam_vit_b.pth (repeatable)"),
        attention_opt: Optional[List[str]] = typer.Option(None, help="NAME:KEY=VALUE option of one method, e.g. ig:n_steps=16 (repeatable)"),
        epochs: Optional[int] = typer.Option(None, help="training epochs of every row"),
        seed: Optional[int] = typer.Option(None, help="random seed (data, training and attacks)"),
        seeds: Optional[str] = typer.Option(None, metavar="S1,S2,...", help="run every row once per seed, e.g. 0,1,2 "
                                            "(seed s in OUT/seed-<s>/<row>/), and report mean ± std (ddof=1) with n "
                                            "(default: one run per row with --seed, or the preset's seed, in OUT/<row>/)"),
        device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
        cache_dir: Optional[Path] = typer.Option(None, help="cache for the shared attention model and masks (default ~/.cache/dhat-seg)"),
        n_examples: Optional[str] = typer.Option(None, metavar="N", help="test examples evaluated (default: the preset's)"),
        aa_examples: Optional[str] = typer.Option(None, metavar="N", help="AutoAttack examples (default: the preset's)"),
        gap_examples: Optional[str] = typer.Option(None, metavar="N", help="training examples of the Robust Gap (default: the preset's)"),
        sanity_examples: Optional[str] = typer.Option(None, metavar="N", help="test examples of each row's gradient-masking "
                                                                                "sanity checks (default: the preset's)"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="any training config option KEY=VALUE (repeatable)"),
    ):
        """Train and evaluate one run per attention method with identical settings: the paper's Table 10
        (Clean, PGD-10, C&W, AA, Robust Gap; plus BG-gap and attention IoU on the built-in data).
        Every row runs the gradient-masking sanity checks of `eval --sanity`; a row failing one is marked suspect.
        With --seeds, every row runs once per seed and the table shows mean ± std over the seeds.
        Writes ablation.md/.csv/.json/.png; finished rows are reused, interrupted ones resume."""
        from dhat_seg import ablate as ab
        from dhat_seg.errors import UserError
        from dhat_seg.evaluation_report import EvalOptions
        from dhat_seg.plugin_manager import attention_methods

        if preset not in ab.ABLATE_PRESETS:
            raise UserError(f"--preset {preset!r} is unknown; expected one of {', '.join(ab.ABLATE_PRESETS)}")
        if epochs is not None and epochs < 1:
            raise UserError(f"--epochs {epochs} is invalid; expected a positive integer")
        p = ab.ABLATE_PRESETS[preset]
        seed_list = ab.parse_seeds(seeds)
        overrides = parse_overrides(set_)
        if seed_list is not None and (seed is not None or "seed" in overrides):
            raise UserError(f"--seeds {seeds} and {'--seed' if seed is not None else '--set seed=...'} are exclusive: "
                            "give every seed with --seeds")
        overrides.update(epochs=epochs, seed=seed, device=device)
        base = ab.base_config(p, overrides)
        rows, unavailable = ab.parse_rows(attention, attention_methods())
        checkpoints = parse_key_values(attention_checkpoint, "--attention-checkpoint")
        options: dict[str, dict] = {name: dict(opts) for name, opts in p.attention_options.items()}
        for item in attention_opt or []:
            name, sep, rest = item.partition(":")
            if not sep or "=" not in rest:
                raise UserError(f"--attention-opt {item!r} is invalid; expected NAME:KEY=VALUE, e.g. ig:n_steps=16")
            options.setdefault(name.strip(), {}).update(parse_key_values([rest], "--attention-opt"))
        eval_kwargs = dict(p.eval)
        for key, value, flag, zero in (("n_examples", n_examples, "--n-examples", False),
                                       ("aa_examples", aa_examples, "--aa-examples", False),
                                       ("gap_examples", gap_examples, "--gap-examples", True),
                                       ("sanity_examples", sanity_examples, "--sanity-examples", False)):
            if value is not None:
                eval_kwargs[key] = parse_count(value, flag, allow_zero=zero)
        eval_options = dataclasses.replace(EvalOptions(), **eval_kwargs, seed=base.seed,
                                           device=device or base.device).validate()
        out = out or Path("runs") / f"ablate-{preset}"
        given = {k: v for k, v in overrides.items() if v is not None}
        if seed_list is not None:
            given["seeds"] = ",".join(map(str, seed_list))
        seed_list = seed_list or [base.seed]
        typer.echo(f"dhat-seg ablate: preset={preset} rows={', '.join(rows)} data={base.data} model={base.model} "
                   f"epochs={base.epochs} seed{'s' if len(seed_list) > 1 else ''}={','.join(map(str, seed_list))} -> {out}",
                   err=True)
        given.update({k: v for k, v in eval_kwargs.items() if k in ("n_examples", "aa_examples", "gap_examples", "sanity_examples")
                      and v != p.eval.get(k)})
        result = ab.run_ablation(rows, base, eval_options, out, seeds=seed_list, cache_dir=cache_dir, checkpoints=checkpoints,
                                 attention_options=options, unavailable=unavailable, preset=p, overrides=given,
                                 log=log, progress=show_progress())
        typer.echo(result["table_markdown"])
        if p.show_paper:
            typer.echo("\n(parentheses: the paper's Table 10)\n\nPaper Table 10 (WRN-28-10, CIFAR-10):")
            typer.echo(ab.paper_table())
        runs = f"{len(rows)} rows x {len(seed_list)} seeds" if len(seed_list) > 1 else f"{len(rows)} rows"
        typer.echo(f"\n{runs} in {result['seconds']} s; written to {out}/ablation.md, .csv, .json, .png")
