"""The ``dhat-seg`` command line (typer). Each command is a thin shell over the library.

User mistakes surface as one ``error: ...`` line on stderr and exit code 2; no
tracebacks. Progress bars go to stderr, results and JSON lines to stdout.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, List, Optional

import typer

from dhat_seg.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DHAT adversarial training with pluggable attention (foreground) methods.")


def user_errors(fn):
    """Turn UserError (and Ctrl-C) into one line and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished epochs are checkpointed; continue with --resume --out RUN_DIR", err=True)
            raise typer.Exit(130) from None

    return wrapper


def parse_key_values(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"{flag} {pair!r} is invalid; expected KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` with YAML-typed values (``--set milestones=[6,7]``)."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in parse_key_values(pairs, "--set").items()}


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    cells = [[h for _, h in columns]] + [[("-" if r.get(k) is None else str(r.get(k))) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            typer.echo("  ".join("-" * w for w in widths))


def config_base(config: str | None, *, resume: bool, out: Path | None, has_settings: bool) -> str | Path | None:
    """Where a run's settings start, before the options given on the command line.

    ``--config`` if given; for ``--resume``, the run's own saved config; ``dhat-seg
    train`` with no settings at all (only --out, --seed, --device, --cache-dir), the
    ``quick`` demo preset; otherwise the paper's recipe (the config defaults), so that
    settings given on the command line never mix silently with a preset made for
    something else.
    """
    if config is not None:
        return config
    if resume and out is not None and (out / "config.yaml").is_file():
        return out / "config.yaml"
    return None if has_settings else "quick"


@app.command()
@user_errors
def train(
    method: Optional[str] = typer.Option(None, help="standard | at | uiat | dhat"),
    attention: Optional[str] = typer.Option(None, help="attention method (see `dhat-seg plugins`)"),
    attention_checkpoint: Optional[str] = typer.Option(None, help="weights file of the attention method (SAM, SOLO)"),
    attention_opt: Optional[List[str]] = typer.Option(None, help="attention option KEY=VALUE (repeatable)"),
    attention_model: Optional[str] = typer.Option(None, help="normally trained classifier for Grad-CAM/IG (run dir or weights)"),
    data: Optional[str] = typer.Option(None, help="synthetic | cifar10 | cifar100 | folder"),
    data_root: Optional[str] = typer.Option(None, help="where real datasets live"),
    download: Optional[bool] = typer.Option(None, "--download", help="allow downloading CIFAR"),
    model: Optional[str] = typer.Option(None, help="small_cnn | resnet18 | preact_resnet18 | wrn28_10 | wrn34_10"),
    epochs: Optional[int] = typer.Option(None, help="number of epochs"),
    batch_size: Optional[int] = typer.Option(None, help="mini-batch size"),
    lr: Optional[float] = typer.Option(None, help="initial learning rate"),
    config: Optional[str] = typer.Option(None, help="preset (quick, paper) or YAML file; default: see 'Settings' in the README"),
    out: Optional[Path] = typer.Option(None, help="run directory (default runs/<method>-<attention>-<time>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out where it stopped"),
    seed: Optional[int] = typer.Option(None, help="random seed"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="mixed precision on CUDA"),
    cache_dir: Optional[Path] = typer.Option(None, help="cache for attention models and masks (default ~/.cache/dhat-seg)"),
    rebuild_masks: bool = typer.Option(False, "--rebuild-masks", help="recompute the cached attention masks of the training data"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="any config option KEY=VALUE (repeatable)"),
):
    """Train a model. With no options: the quick demo (DHAT with Grad-CAM on the built-in dataset, about
    5 minutes on CPU); with settings: the paper's recipe with those settings (or --config's preset)."""
    from dhat_seg.config import load_config, paper_differences
    from dhat_seg.trainer import Trainer

    overrides = parse_overrides(set_)
    settings = dict(method=method, attention=attention, attention_checkpoint=attention_checkpoint,
                    attention_model=attention_model, data=data, data_root=data_root, download=download, model=model,
                    epochs=epochs, batch_size=batch_size, lr=lr, amp=amp)
    # a flag given explicitly wins over --set only if they agree; a flag not given changes nothing
    for key, value in {**settings, "seed": seed, "device": device}.items():
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
    base = config_base(config, resume=resume, out=out,
                       has_settings=bool(set_ or attention_opt or any(v is not None for v in settings.values())))
    cfg = load_config(base, overrides)
    differences = paper_differences(cfg)
    if differences:
        typer.echo("settings that differ from the DHAT paper's (REFERENCE section 1):", err=True)
        for key, value, paper in differences:
            typer.echo(f"  {key} = {value!r}  (paper: {paper!r})", err=True)
    if out is None:
        label = cfg.method + (f"-{cfg.attention}" if cfg.method == "dhat" else "")
        out = Path("runs") / f"{label}-{cfg.data}-{time.strftime('%Y%m%d-%H%M%S')}"
    typer.echo(f"dhat-seg train: method={cfg.method} attention={cfg.attention if cfg.method == 'dhat' else '-'} "
               f"data={cfg.data} model={cfg.model} epochs={cfg.epochs} seed={cfg.seed} -> {out}", err=True)
    summary = Trainer(cfg, out, cache_dir=cache_dir, rebuild_masks=rebuild_masks).run(resume=resume)
    typer.echo("")
    print_table([summary | {"run": str(out)}], [("method", "method"), ("attention", "attention"), ("data", "data"),
                ("model", "model"), ("epochs", "epochs"), ("best_epoch", "best epoch"), ("clean_acc", "clean %"),
                ("pgd10_acc", "PGD-10 %"), ("n_test", "test n"), ("run", "run dir")])


@app.command("eval")
@user_errors
def eval_(
    target: Path = typer.Argument(..., help="run directory, checkpoint directory or model.safetensors"),
    attacks: str = typer.Option("clean,pgd10,pgd20,cw,aa", help="comma list: clean,fgsm,pgd10,pgd20,pgd50,cw,aa"),
    n_examples: Optional[str] = typer.Option(None, metavar="N", help="evaluate the first N examples of the split (default all)"),
    aa_examples: Optional[str] = typer.Option(None, metavar="N", help="AutoAttack on the first N of those only (default all)"),
    gap_attack: str = typer.Option("pgd10", help="attack of the Robust Gap (train minus test), or 'none'"),
    gap_examples: Optional[str] = typer.Option(None, metavar="N",
                                               help="first N un-augmented training samples for the Robust Gap (default: as many as test; 0 = off)"),
    bg_gap: bool = typer.Option(True, "--bg-gap/--no-bg-gap", help="BG-gap: test minus test-mixed-rand (built-in data)"),
    iou_examples: Optional[str] = typer.Option("500", metavar="N", help="attention IoU with ground truth on N test images (0 = off)"),
    sanity: bool = typer.Option(False, "--sanity", help="also run the gradient-masking sanity checks (PART H.3, FSR sec. 3)"),
    sanity_examples: Optional[str] = typer.Option("500", metavar="N", help="samples for the sanity checks"),
    data: Optional[str] = typer.Option(None, help="dataset (default: the run's)"),
    split: str = typer.Option("test", help="split to evaluate"),
    eps: float = typer.Option(8.0, help="L_inf budget in 1/255 units"),
    batch_size: int = typer.Option(256, help="evaluation batch size"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    seed: int = typer.Option(0, help="seed of the random starts"),
    cache_dir: Optional[Path] = typer.Option(None, help="cache with the run's attention model (default ~/.cache/dhat-seg)"),
    output: Optional[Path] = typer.Option(None, help="where to write the report (default RUN/eval.json)"),
):
    """Evaluate a trained model: Clean, FGSM, PGD-10/20/50, C&W-inf, AutoAttack (standard), worst case,
    Robust Gap, BG-gap, attention IoU; --sanity adds the gradient-masking checks. Writes eval.json."""
    from dhat_seg.evaluation_report import parse_count, run_eval

    report = run_eval(target, attacks=attacks, n_examples=parse_count(n_examples, "--n-examples"),
                      aa_examples=parse_count(aa_examples, "--aa-examples"), gap_attack=gap_attack,
                      gap_examples=parse_count(gap_examples, "--gap-examples", allow_zero=True), bg_gap=bg_gap,
                      iou_examples=parse_count(iou_examples, "--iou-examples", allow_zero=True), sanity=sanity,
                      sanity_examples=parse_count(sanity_examples, "--sanity-examples"), data=data, split=split, eps=eps,
                      batch_size=batch_size, device=device, seed=seed, cache_dir=str(cache_dir) if cache_dir else None,
                      output=str(output) if output else None)
    acc, n = report["accuracy"], report["examples"]
    print_table([{k: f"{v:.2f}" for k, v in acc.items()}, {k: str(n[k]) for k in acc}], [(a, a) for a in acc])
    typer.echo(f"(accuracy %, then examples; {report['data']}/{report['split']})")
    gap, bg, iou = report["robust_gap"], report["bg_gap"], report["attention_iou"]
    if gap:
        typer.echo(f"Robust Gap ({gap['attack']}): train {gap['train_accuracy']:.2f}% (n={gap['n_train']}) - "
                   f"test {gap['test_accuracy']:.2f}% (n={gap['n_test']}) = {gap['gap']:.2f} points")
    if bg:
        typer.echo(f"BG-gap (test - test-mixed-rand, n={bg['n']}): clean {bg['clean']['gap']:.2f}, PGD-10 {bg['pgd10']['gap']:.2f} points")
    if iou:
        value = f"{iou['mean_iou']:.4f} (n={iou['n']})" if iou.get("mean_iou") is not None else f"n/a: {iou['note']}"
        typer.echo(f"attention IoU ({iou['method']}, {iou['threshold_policy']}): {value}")
    if "sanity" in report:
        s = report["sanity"]
        typer.echo(f"gradient-masking checks (n={s['n']}, transfer surrogate: {s['surrogate']}):")
        for check in s["checks"]:
            typer.echo(f"  [{'PASS' if check['passed'] else 'FAIL'}] {check['name']}: {check['detail']}")
    typer.echo(f"written to {report['path']}")


@app.command()
@user_errors
def plugins():
    """List the attention methods: name, plugin, kind and whether each is ready to run."""
    from dhat_seg.plugin_manager import attention_methods

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        methods = attention_methods()
    for w in caught:
        typer.echo(f"warning: {w.message}", err=True)
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


from dhat_seg import cli_ablate, cli_masks  # noqa: E402  (sub-commands register themselves)

cli_masks.register(app)
cli_ablate.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
