"""``dhat-seg masks ...``: build, inspect and score per-sample foreground mask caches.

* ``build``: compute the masks of a split once (``dhat-seg train`` does it by itself);
* ``info``: what a cache holds (key, size, coverage, build time, bytes per sample);
* ``show``: a PNG grid of images, attention maps, foreground masks and ground truth;
* ``score``: IoU of a method's foreground with the ground-truth masks (synthetic data),
  to compare methods before training.

The settings (``--config``, ``--set``, ``--attention ...``) are those of ``dhat-seg
train``, so the cache these commands find is the one a training run with the same
settings uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from dhat_seg.cli.common import log as _log
from dhat_seg.cli.common import parse_key_values, parse_overrides, print_table, show_progress, user_errors
from dhat_seg.errors import Interrupted, UserError

app = typer.Typer(no_args_is_help=True, help="Per-sample foreground mask caches: build, info, show, score.")

BUILD_HINT = "pass --rebuild to rebuild it"


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="masks")


def _config(config: str, set_: list[str] | None, **options: Any):
    """A TrainConfig from a preset / YAML file, ``--set`` pairs and the named options."""
    from dhat_seg.config import load_config

    overrides = parse_overrides(set_)
    attention_opt = options.pop("attention_opt", None)
    overrides.update({k: v for k, v in options.items() if v is not None})
    if attention_opt:
        overrides["attention_options"] = parse_key_values(attention_opt, "--attention-opt")
    return load_config(config, overrides)


def _device(cfg):
    from dhat_seg.run.devices import select_device

    return select_device(cfg.device)


def _root(cache_dir: Path | None) -> Path:
    from dhat_seg.attention.model import cache_root

    return cache_root(cache_dir)


# Options shared by every command (typer has no option groups: listed per command).
_CONFIG = typer.Option("quick", help="preset (quick, paper) or YAML file, as for `dhat-seg train`")
_SET = typer.Option(None, "--set", help="any config option KEY=VALUE (repeatable)")
_ATTENTION_CKPT = typer.Option(None, help="weights file of the attention method (SAM, SOLO)")
_ATTENTION_OPT = typer.Option(None, help="attention option KEY=VALUE (repeatable)")
_ATTENTION_MODEL = typer.Option(None, help="normally trained classifier for Grad-CAM/IG (run dir or weights)")
_DATA = typer.Option(None, help="synthetic | digits | cifar10 | cifar100 | folder")
_DATA_ROOT = typer.Option(None, help="where real datasets live")
_SPLIT = typer.Option("train", help="split whose masks are meant (train is the one training uses)")
_CACHE_DIR = typer.Option(None, help="cache root (default $DHAT_SEG_CACHE, else $XDG_CACHE_HOME/dhat-seg, else ~/.cache/dhat-seg)")
_SEED = typer.Option(None, help="data seed")
_DEVICE = typer.Option(None, help="auto | cpu | cuda | cuda:N")


@app.command()
@user_errors
def build(
    attention: Optional[str] = typer.Option(None, help="attention method (see `dhat-seg plugins`)"),
    data: Optional[str] = _DATA,
    split: str = _SPLIT,
    attention_checkpoint: Optional[str] = _ATTENTION_CKPT,
    attention_opt: Optional[List[str]] = _ATTENTION_OPT,
    attention_model: Optional[str] = _ATTENTION_MODEL,
    data_root: Optional[str] = _DATA_ROOT,
    config: str = _CONFIG,
    set_: Optional[List[str]] = _SET,
    rebuild: bool = typer.Option(False, "--rebuild", help="discard the existing cache and compute every mask again"),
    cache_dir: Optional[Path] = _CACHE_DIR,
    batch_size: Optional[int] = typer.Option(None, help="images per attention call (default: the config's batch_size)"),
    chunk_size: int = typer.Option(1024, help="samples per cache file (the unit of atomic writes and of resuming)"),
    seed: Optional[int] = _SEED,
    device: Optional[str] = _DEVICE,
):
    """Compute the masks of every sample of a split once (resumes an interrupted build)."""
    from dhat_seg.data import split_for
    from dhat_seg.run.experiment import frozen_masks
    from dhat_seg.evaluation.mask_inspection import train_fingerprint

    cfg = _config(config, set_, attention=attention, data=data, attention_checkpoint=attention_checkpoint,
                  attention_opt=attention_opt, attention_model=attention_model, data_root=data_root, seed=seed, device=device)
    if cfg.attention_source != "frozen":
        raise UserError("attention_source='self' masks come from the model being trained: `dhat-seg train` builds them; "
                        "`masks build` builds frozen-attention caches only")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size} is invalid; expected a positive integer")
    if chunk_size < 1:
        raise UserError(f"--chunk-size {chunk_size} is invalid; expected a positive integer")
    dataset = split_for(cfg, split)
    try:
        cache = frozen_masks(cfg, dataset, device=_device(cfg), root=_root(cache_dir), log=_log,
                             train_fingerprint=train_fingerprint(cfg, dataset), rebuild=rebuild, progress=show_progress(),
                             batch_size=batch_size, hint=BUILD_HINT, chunk_size=chunk_size)
    except Interrupted:  # SIGINT/SIGTERM at a safe point: user_errors prints what was kept (exit 130/143)
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted: finished chunks are kept; run the same command again to resume the build", err=True)
        raise typer.Exit(130) from None
    _print_info(cache.directory, cache.meta)


# ---------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------


def _print_info(directory: Path, meta: dict[str, Any], status: str = "complete, verified") -> None:
    from dhat_seg.evaluation.mask_inspection import describe

    rows = describe(directory, meta, status)
    width = max(len(k) for k, _ in rows)
    for k, v in rows[:-1]:
        typer.echo(f"{k.ljust(width)}  {v}")
    typer.echo("key:")
    typer.echo("  " + rows[-1][1].replace("\n", "\n  "))


@app.command()
@user_errors
def info(
    path: Optional[Path] = typer.Argument(None, help="a cache directory (default: the one of the settings below, or a list)"),
    attention: Optional[str] = typer.Option(None, help="attention method: show the cache of these settings"),
    data: Optional[str] = _DATA,
    split: str = _SPLIT,
    attention_checkpoint: Optional[str] = _ATTENTION_CKPT,
    attention_opt: Optional[List[str]] = _ATTENTION_OPT,
    attention_model: Optional[str] = _ATTENTION_MODEL,
    data_root: Optional[str] = _DATA_ROOT,
    config: str = _CONFIG,
    set_: Optional[List[str]] = _SET,
    cache_dir: Optional[Path] = _CACHE_DIR,
    seed: Optional[int] = _SEED,
):
    """Show a cache: key, size, coverage (mean foreground fraction), build time, bytes per sample.

    Without PATH or --attention: list the caches under the cache root."""
    from dhat_seg.cache import cache_dir_for, list_caches
    from dhat_seg.data import split_for
    from dhat_seg.evaluation.mask_inspection import cache_status as _status
    from dhat_seg.evaluation.mask_inspection import settings_key

    root = _root(cache_dir)
    if path is not None:
        meta, status = _status(path)
        if meta is None:
            raise UserError(f"{str(path)!r} holds no mask cache (no meta.json)")
        _print_info(path, meta, status)
        return
    if attention is None:
        caches = list_caches(root)
        if not caches:
            typer.echo(f"no mask caches under {root / 'masks'}")
            return
        rows = []
        for directory in caches:
            meta, status = _status(directory)
            rows.append({"cache": directory.name, "n": meta["n"], "storage": meta.get("storage"),
                         "bytes": meta.get("bytes_per_sample"), "coverage": (meta.get("coverage") or {}).get("value"),
                         "status": "ok" if status.startswith("complete") else status.split(":")[0].lower()})
        print_table(rows, [("cache", "cache"), ("n", "samples"), ("storage", "storage"), ("bytes", "bytes/sample"),
                           ("coverage", "coverage"), ("status", "status")])
        typer.echo(f"({len(rows)} caches under {root / 'masks'}; `dhat-seg masks info PATH` for details)")
        return
    cfg = _config(config, set_, attention=attention, data=data, attention_checkpoint=attention_checkpoint,
                  attention_opt=attention_opt, attention_model=attention_model, data_root=data_root, seed=seed)
    dataset = split_for(cfg, split)
    key, *_ = settings_key(cfg, dataset, root, _log)
    if key is None:
        typer.echo(f"no mask cache for these settings: {attention!r} needs an attention model and none is trained yet "
                   "(`dhat-seg masks build` or `dhat-seg train` trains one)")
        return
    directory = cache_dir_for(root, key)
    meta, status = _status(directory)
    if meta is None:
        typer.echo(f"no mask cache for these settings yet (it would be {directory}); build it with `dhat-seg masks build`")
        return
    _print_info(directory, meta, status)


# ---------------------------------------------------------------------------------
# show
# ---------------------------------------------------------------------------------


@app.command()
@user_errors
def show(
    path: Optional[Path] = typer.Argument(None, help="a cache directory (default: the cache of the settings below)"),
    out: Path = typer.Option(Path("masks.png"), help="PNG file to write"),
    n: int = typer.Option(16, help="number of samples"),
    start: int = typer.Option(0, help="first sample index"),
    attention: Optional[str] = typer.Option(None, help="attention method (without PATH)"),
    data: Optional[str] = _DATA,
    split: str = _SPLIT,
    attention_checkpoint: Optional[str] = _ATTENTION_CKPT,
    attention_opt: Optional[List[str]] = _ATTENTION_OPT,
    attention_model: Optional[str] = _ATTENTION_MODEL,
    data_root: Optional[str] = _DATA_ROOT,
    config: str = _CONFIG,
    set_: Optional[List[str]] = _SET,
    cache_dir: Optional[Path] = _CACHE_DIR,
    seed: Optional[int] = _SEED,
):
    """Write a PNG grid: image, attention (soft map when the cache holds one), foreground, ground truth."""
    from dhat_seg.evaluation.mask_inspection import grid_contents, open_for_settings, open_path, render_grid

    if n < 1:
        raise UserError(f"--n {n} is invalid; expected a positive number of samples")
    if path is None and attention is None:
        raise UserError("say which cache to show: a cache directory PATH, or --attention NAME with the run's settings")
    cfg = _config(config, set_, attention=attention, data=data, attention_checkpoint=attention_checkpoint,
                  attention_opt=attention_opt, attention_model=attention_model, data_root=data_root, seed=seed)
    cache, dataset = open_path(path) if path is not None else open_for_settings(cfg, split, _root(cache_dir), _log)
    if not 0 <= start < len(cache):
        raise UserError(f"--start {start} is invalid; the cache holds samples 0 to {len(cache) - 1}")
    idx = list(range(start, min(len(cache), start + n)))
    images, soft, foreground, truth, titles = grid_contents(cache, dataset, cfg, idx)
    render_grid(images, soft, foreground, truth, titles, out)
    typer.echo(f"wrote {out} ({len(idx)} samples of {cache.directory.name})")


# ---------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------


@app.command()
@user_errors
def score(
    attention: str = typer.Option(..., help="attention method, a comma list, or 'all' (the ready ones)"),
    data: Optional[str] = typer.Option("synthetic", help="a dataset with ground-truth masks (synthetic, digits)"),
    n: int = typer.Option(500, help="score the first N samples of the split"),
    split: str = _SPLIT,
    attention_checkpoint: Optional[str] = _ATTENTION_CKPT,
    attention_opt: Optional[List[str]] = _ATTENTION_OPT,
    attention_model: Optional[str] = _ATTENTION_MODEL,
    config: str = _CONFIG,
    set_: Optional[List[str]] = _SET,
    cache_dir: Optional[Path] = _CACHE_DIR,
    batch_size: Optional[int] = typer.Option(None, help="images per attention call"),
    seed: Optional[int] = _SEED,
    device: Optional[str] = _DEVICE,
):
    """IoU of each method's foreground (after the threshold policy) with the ground-truth masks."""
    from dhat_seg.evaluation.mask_inspection import score_method
    from dhat_seg.attention.plugin_manager import attention_methods, get_attention_spec

    if n < 1:
        raise UserError(f"--n {n} is invalid; expected a positive number of samples")
    user_options = parse_key_values(attention_opt, "--attention-opt")
    if attention_checkpoint:
        user_options["checkpoint"] = attention_checkpoint
    names = list(attention_methods()) if attention == "all" else [a.strip() for a in attention.split(",") if a.strip()]
    several = len(names) > 1
    jobs = []
    for name in names:
        spec = get_attention_spec(name)
        # with several methods, each takes the options it knows (e.g. only SAM a checkpoint)
        options = {k: v for k, v in user_options.items() if k in spec.default_options} if several else user_options
        if attention == "all":
            problem = spec.readiness(options)
            if problem:
                _log(f"skipping {name}: {problem}")
                continue
        jobs.append((name, options))
    if not jobs:
        raise UserError(f"--attention {attention!r} names no runnable attention method (see `dhat-seg plugins`)")
    rows = []
    for name, options in jobs:
        checkpoint = options.pop("checkpoint", None)
        cfg = _config(config, set_, attention=name, data=data, attention_checkpoint=checkpoint,
                      attention_model=attention_model, seed=seed, device=device)
        if options:
            cfg.attention_options = {**cfg.attention_options, **options}
        rows.append(score_method(cfg, split, n, _root(cache_dir), _device(cfg), _log, batch_size))
    print_table(rows, [("attention", "attention"), ("n", "n"), ("mean_iou", "mean IoU"), ("median_iou", "median IoU"),
                       ("coverage", "foreground"), ("gt_coverage", "gt foreground"), ("masks", "masks")])
    typer.echo(f"(foreground: {cfg.threshold_policy} threshold"
               + (f" omega={cfg.omega}" if cfg.threshold_policy == "fixed" else "")
               + (f" quantile={cfg.quantile}" if cfg.threshold_policy == "quantile" else "") + f"; {split} split)")
