"""``dhat-seg train``: one training run from a preset, a config file and options."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import List, Optional

import typer

from dhat_seg.cli.common import config_base, describe_base, log, parse_key_values, parse_overrides, print_table, show_progress, user_errors
from dhat_seg.errors import Interrupted, UserError


def resume_command(out: Path, cache_dir: Path | None) -> str:
    """The command that continues the run in ``out`` (its settings are in out/config.yaml)."""
    import shlex

    cache = f" --cache-dir {shlex.quote(str(cache_dir))}" if cache_dir is not None else ""
    return f"dhat-seg train --resume --out {shlex.quote(str(out))}{cache}"


def register(root: typer.Typer) -> None:
    """Adds the ``train`` command to the root app."""

    @root.command()
    @user_errors
    def train(
        # every name of training_methods.TRAINING_METHODS (a test keeps them equal; written out so
        # that --help does not import torch)
        method: Optional[str] = typer.Option(None, help="standard | at | uiat | dhat | trades | mart | cfa | sglr | fsr | part | again; uiat and dhat "
                                                        "add their terms to --set base=at|trades|mart|cfa|sglr; any method takes "
                                                        "--set awp=true; fsr trains the model <name>_fsr (picked by itself) and takes "
                                                        "--set base=at|trades|mart, as does part (PART, PART-T, PART-M); again "
                                                        "--set again.form=code (as released) trains <name>_again; a method's settings: "
                                                        "--set METHOD.KEY=VALUE (`dhat-seg methods`); a setting the "
                                                        "method does not read is refused"),
        attention: Optional[str] = typer.Option(None, help="attention method (see `dhat-seg plugins`)"),
        attention_checkpoint: Optional[str] = typer.Option(None, help="weights file of the attention method (SAM, SOLO)"),
        attention_opt: Optional[List[str]] = typer.Option(None, help="attention option KEY=VALUE (repeatable)"),
        attention_model: Optional[str] = typer.Option(None, help="normally trained classifier for Grad-CAM/IG (run dir or weights)"),
        data: Optional[str] = typer.Option(None, help="synthetic | digits | cifar10 | cifar100 | folder"),
        data_root: Optional[str] = typer.Option(None, help="where real datasets live"),
        download: Optional[bool] = typer.Option(None, "--download", help="allow downloading CIFAR"),
        model: Optional[str] = typer.Option(None, help="small_cnn | resnet18 | preact_resnet18 | wrn28_10 | wrn34_10; "
                                                       "each + _fsr: with the FSR module (method fsr); + _again: with "
                                                       "AGAIN's auxiliary heads (again.form=code)"),
        epochs: Optional[int] = typer.Option(None, help="number of epochs"),
        batch_size: Optional[int] = typer.Option(None, help="mini-batch size"),
        lr: Optional[float] = typer.Option(None, help="initial learning rate"),
        config: Optional[str] = typer.Option(None, help="preset (quick, paper) or YAML file; default: the data's recipe (quick on built-in data, paper otherwise)"),
        out: Optional[Path] = typer.Option(None, help="run directory (default runs/<method>-<attention>-<time>)"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out where it stopped"),
        seed: Optional[int] = typer.Option(None, help="random seed"),
        device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
        amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="mixed precision on CUDA"),
        channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                     help="channels-last (NHWC) model and inputs: faster convolutions on GPUs"),
        compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                                help="torch.compile the model's forward (the first batches compile)"),
        data_on_device: Optional[bool] = typer.Option(None, "--data-on-device/--no-data-on-device",
                                                      help="hold in-memory training data and masks on the device, crop and "
                                                           "flip there (default: on for CUDA where the data allow it)"),
        cache_dir: Optional[Path] = typer.Option(None, help="cache for attention models and masks (default $DHAT_SEG_CACHE, else $XDG_CACHE_HOME/dhat-seg, else ~/.cache/dhat-seg)"),
        rebuild_masks: bool = typer.Option(False, "--rebuild-masks", help="recompute the cached attention masks of the training data"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="any config option KEY=VALUE (repeatable)"),
        convergence_threshold: float = typer.Option(2.0, min=0.0, help="points: the run is called converged when "
                                                    "validation clean and PGD accuracy moved by no more over the last 2 epochs"),
        json_lines: bool = typer.Option(False, "--json", help="print each epoch's full metrics as a JSON line (as in metrics.jsonl) "
                                                              "instead of the table"),
    ):
        """Train a model. With no options: the quick demo (DHAT with Grad-CAM on the built-in dataset, a few
        minutes on CPU). Settings start from the data's recipe: the quick one on the built-in data (synthetic,
        digits), the paper's on CIFAR and folders (or --config's preset); milestones follow --epochs."""
        from dhat_seg.config import load_config, needs_attention
        from dhat_seg.paper_settings import paper_differences

        overrides = parse_overrides(set_)
        settings = dict(method=method, attention=attention, attention_checkpoint=attention_checkpoint,
                        attention_model=attention_model, data=data, data_root=data_root, download=download, model=model,
                        epochs=epochs, batch_size=batch_size, lr=lr, amp=amp)
        # a flag given explicitly wins over --set only if they agree; a flag not given changes nothing
        # like --seed and --device, the speed flags alone keep the quick demo (they change how, not what, it trains)
        for key, value in {**settings, "seed": seed, "device": device, "channels_last": channels_last,
                           "compile": compile_, "data_on_device": data_on_device}.items():
            if value is None:
                continue
            if key in overrides and overrides[key] != value:
                raise UserError(f"{key} is set twice, to {value!r} (--{key.replace('_', '-')}) and {overrides[key]!r} (--set); "
                                "expected one value")
            overrides[key] = value
        if attention_opt:
            overrides["attention_options"] = parse_key_values(attention_opt, "--attention-opt")
        if epochs is not None and epochs < 1:
            raise UserError(f"--epochs {epochs} is invalid; expected a positive integer")
        if resume and out is None:
            raise UserError("--resume needs --out RUN_DIR (the run to continue)")
        if resume and not (out / "config.yaml").is_file():
            raise UserError(f"--resume: {str(out)!r} holds no run to resume (no config.yaml); expected the --out folder "
                            "of an earlier `dhat-seg train`, or drop --resume to start a new run there")
        if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") and out is None:
            raise UserError("under torchrun, --out is required: every process must name the same run directory")
        rank0 = os.environ.get("RANK", "0") in ("", "0")  # torchrun: rank 0 alone prints
        base = config_base(config, resume=resume, out=out, data=overrides.get("data"))
        notes: list[str] = []
        cfg = load_config(base, overrides, resumed=bool(resume and base == out / "config.yaml" if out else False),
                          check_unread=True, notes=notes)
        if rank0:
            given = [f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if v is not None]
            given += [f"--set {item}" for item in (set_ or [])] + [f"--attention-opt {item}" for item in (attention_opt or [])]
            typer.echo(describe_base(base, given), err=True)
        for note in notes if rank0 else ():
            typer.echo(note, err=True)
        differences = paper_differences(cfg)
        if differences and rank0:
            typer.echo("settings that differ from the DHAT paper's (REFERENCE section 1):", err=True)
            for key, value, paper in differences:
                typer.echo(f"  {key} = {value!r}  (paper: {paper!r})", err=True)
        if cfg.method == "part" and rank0:
            from dhat_seg.method_defaults import describe_part_masks

            typer.echo(describe_part_masks(cfg), err=True)
        if cfg.method == "again" and rank0:
            again = cfg.options("again")
            hff = "on" if again.hff_on else "off"
            typer.echo(f"AGAIN, {'as released (InsLin/AGAIN)' if again.form == 'code' else 'as the supplementary specifies'}: "
                       f"HFF {hff}; AWP {'on, gamma %g, after %d warm-up epoch(s)' % (cfg.awp_gamma, cfg.awp_warmup) if cfg.awp else 'off'}",
                       err=True)
        from dhat_seg.training_methods import reads_base

        base_loss = cfg.base if reads_base(cfg.method) and cfg.base != "at" else None  # the paper's "at": not named
        if out is None:
            label = cfg.method + (f"-{base_loss}" if base_loss else "") + ("-awp" if cfg.awp else "") \
                + (f"-{cfg.attention}" if needs_attention(cfg.method) else "")
            out = Path("runs") / f"{label}-{cfg.data}-{time.strftime('%Y%m%d-%H%M%S')}"
        extra = (f" base={base_loss}" if base_loss else "") + (f" awp_gamma={cfg.awp_gamma:g}" if cfg.awp else "")
        if rank0:
            typer.echo(f"dhat-seg train: method={cfg.method}{extra} attention={cfg.attention if needs_attention(cfg.method) else '-'} "
                       f"data={cfg.data} model={cfg.model} epochs={cfg.epochs} seed={cfg.seed} -> {out}", err=True)
        from dhat_seg.epoch_table import EpochPrinter

        on_epoch = (lambda record: typer.echo(json.dumps(record))) if json_lines else EpochPrinter(typer.echo)
        from dhat_seg.run.distributed import init_from_env, shutdown
        from dhat_seg.run.experiment import Experiment  # torch and the rest: only once the settings are valid

        dist, device = init_from_env(cfg.device)  # torchrun: join the process group (else a single process)
        if dist.enabled:
            cfg = dataclasses.replace(cfg, device=device)
            typer.echo(f"torchrun: rank {dist.rank} of {dist.world} on {device}", err=True)
        quiet = lambda *_: None  # noqa: E731  (ranks other than 0 print nothing but errors)
        try:
            summary = Experiment(cfg, out, cache_dir=cache_dir, rebuild_masks=rebuild_masks,
                                 progress=show_progress() and dist.main, log=log if dist.main else quiet,
                                 on_epoch=on_epoch if dist.main else quiet, dist=dist).run(resume=resume)
        except Interrupted as exc:  # SIGINT/SIGTERM: stopped at a safe point; say how to go on
            exc.resume = resume_command(out, cache_dir)
            raise
        finally:
            shutdown()
        if not dist.main:
            return
        typer.echo("")
        print_table([summary | {"run": str(out)}], [("method", "method"), ("attention", "attention"), ("data", "data"),
                    ("model", "model"), ("epochs", "epochs"), ("best_epoch", "best epoch"), ("clean_acc", "clean %"),
                    ("pgd10_acc", "PGD-10 %"), ("n_test", "test n"), ("run", "run dir")])
        from dhat_seg.evaluation.convergence import run_verdict

        typer.echo(f"validation accuracy: {run_verdict(out, threshold=convergence_threshold).describe()}")


