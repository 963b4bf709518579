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

import functools
import json
import math
from pathlib import Path
from typing import Any, List, Optional

import typer

from dhat_seg.errors import UserError

app = typer.Typer(no_args_is_help=True, help="Per-sample foreground mask caches: build, info, show, score.")

BUILD_HINT = "pass --rebuild to rebuild it"


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="masks")


def _user_errors(fn):
    """``dhat_seg.cli.user_errors``, imported when called (cli imports this module)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dhat_seg.cli import user_errors

        return user_errors(fn)(*args, **kwargs)

    return wrapper


def _config(config: str, set_: list[str] | None, **options: Any):
    """A TrainConfig from a preset / YAML file, ``--set`` pairs and the named options."""
    from dhat_seg.cli import parse_key_values, parse_overrides
    from dhat_seg.config import load_config

    overrides = parse_overrides(set_)
    attention_opt = options.pop("attention_opt", None)
    overrides.update({k: v for k, v in options.items() if v is not None})
    if attention_opt:
        overrides["attention_options"] = parse_key_values(attention_opt, "--attention-opt")
    return load_config(config, overrides)


def _device(cfg):
    from dhat_seg.trainer import select_device

    return select_device(cfg.device)


def _root(cache_dir: Path | None) -> Path:
    from dhat_seg.attention_model import cache_root

    return cache_root(cache_dir)


def _log(message: str) -> None:
    typer.echo(message, err=True)


def _train_fingerprint(cfg, dataset) -> str:
    """Fingerprint of the training split (it keys the attention model)."""
    from dhat_seg.cache import dataset_for

    return dataset.fingerprint() if dataset.split == "train" else dataset_for(cfg, "train").fingerprint()


# Options shared by every command (typer has no option groups: listed per command).
_CONFIG = typer.Option("quick", help="preset (quick, paper) or YAML file, as for `dhat-seg train`")
_SET = typer.Option(None, "--set", help="any config option KEY=VALUE (repeatable)")
_ATTENTION_CKPT = typer.Option(None, help="weights file of the attention method (SAM, SOLO)")
_ATTENTION_OPT = typer.Option(None, help="attention option KEY=VALUE (repeatable)")
_ATTENTION_MODEL = typer.Option(None, help="normally trained classifier for Grad-CAM/IG (run dir or weights)")
_DATA = typer.Option(None, help="synthetic | cifar10 | cifar100 | folder")
_DATA_ROOT = typer.Option(None, help="where real datasets live")
_SPLIT = typer.Option("train", help="split whose masks are meant (train is the one training uses)")
_CACHE_DIR = typer.Option(None, help="cache root (default $DHAT_SEG_CACHE or ~/.cache/dhat-seg)")
_SEED = typer.Option(None, help="data seed")
_DEVICE = typer.Option(None, help="auto | cpu | cuda | cuda:N")


@app.command()
@_user_errors
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
    from dhat_seg.cache import dataset_for, ensure_mask_cache

    cfg = _config(config, set_, attention=attention, data=data, attention_checkpoint=attention_checkpoint,
                  attention_opt=attention_opt, attention_model=attention_model, data_root=data_root, seed=seed, device=device)
    if cfg.attention_source != "frozen":
        raise UserError("attention_source='self' masks come from the model being trained: `dhat-seg train` builds them; "
                        "`masks build` builds frozen-attention caches only")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size} is invalid; expected a positive integer")
    if chunk_size < 1:
        raise UserError(f"--chunk-size {chunk_size} is invalid; expected a positive integer")
    dataset = dataset_for(cfg, split)
    try:
        cache = ensure_mask_cache(cfg, dataset, device=_device(cfg), root=_root(cache_dir), log=_log,
                                  train_fingerprint=_train_fingerprint(cfg, dataset), rebuild=rebuild,
                                  batch_size=batch_size, hint=BUILD_HINT, chunk_size=chunk_size)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished chunks are kept; run the same command again to resume the build", err=True)
        raise typer.Exit(130) from None
    _print_info(cache.directory, cache.meta)


# ---------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------


def _print_info(directory: Path, meta: dict[str, Any], status: str = "complete, verified") -> None:
    from dhat_seg.cache import _chunk_name

    n, chunk = int(meta["n"]), int(meta["chunk_size"])
    total = math.ceil(n / chunk)
    done = sum(1 for k in range(total) if meta.get("chunks", {}).get(_chunk_name(k)))
    coverage = meta.get("coverage") or {}
    if coverage:
        rule = {"fixed": f"omega={coverage.get('omega')}", "quantile": f"quantile={coverage.get('quantile')}"}
        cov = f"{coverage['value']:.4f} (mean foreground fraction; {coverage['policy']} {rule.get(coverage['policy'], '')})".replace(" )", ")")
    else:
        cov = "-"
    storage = {"bits": "bits (bool masks, 1 bit per pixel)", "uint8": "uint8 (soft maps, thresholded when read)"}
    rows = [
        ("cache", str(directory)),
        ("status", status),
        ("samples", f"{n} ({done} of {total} chunks of {chunk})"),
        ("mask size", f"{meta['height']} x {meta['width']}"),
        ("storage", storage.get(meta.get("storage"), str(meta.get("storage")))),
        ("bytes/sample", str(meta.get("bytes_per_sample", "-"))),
        ("coverage", cov),
        ("build time", f"{meta.get('build_seconds', 0):.1f} s" + (f", finished {meta['built_at']}" if meta.get("built_at") else "")),
        ("key hash", str(meta.get("key_hash"))),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k.ljust(width)}  {v}")
    typer.echo("key:")
    typer.echo("  " + json.dumps(meta["key"], indent=2, sort_keys=True).replace("\n", "\n  "))


def _status(directory: Path) -> tuple[dict[str, Any] | None, str]:
    from dhat_seg.cache import MaskCache, read_meta

    meta = read_meta(directory)
    if meta is None:
        return None, "missing"
    try:
        MaskCache.open(directory)
    except UserError as exc:
        return meta, f"NOT USABLE: {exc}"
    return meta, "complete, verified"


@app.command()
@_user_errors
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
    from dhat_seg.cache import cache_dir_for, dataset_for, frozen_key, list_caches

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
        from dhat_seg.cli import print_table

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
    dataset = dataset_for(cfg, split)
    key, *_ = frozen_key(cfg, dataset, train_fingerprint=_train_fingerprint(cfg, dataset), root=root, log=_log,
                         train_classifier=False)
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


def _open_for_settings(cfg, split: str, root: Path):
    """(cache, dataset) of the settings; the cache must exist."""
    from dhat_seg.cache import MaskCache, cache_dir_for, dataset_for, frozen_key

    dataset = dataset_for(cfg, split)
    key, *_ = frozen_key(cfg, dataset, train_fingerprint=_train_fingerprint(cfg, dataset), root=root, log=_log,
                         train_classifier=False)
    directory = cache_dir_for(root, key) if key is not None else None
    if directory is None or not (directory / "meta.json").is_file():
        raise UserError(f"no mask cache of {cfg.attention!r} for these settings; build it first with "
                        f"`dhat-seg masks build --attention {cfg.attention} ...` (same settings)")
    return MaskCache.open(directory, key, hint=BUILD_HINT), dataset


def _open_path(path: Path):
    """(cache, dataset) of a cache directory; the dataset is rebuilt from its metadata."""
    from dhat_seg.cache import MaskCache, read_meta
    from dhat_seg.data import build_dataset

    meta = read_meta(path)
    if meta is None:
        raise UserError(f"{str(path)!r} holds no mask cache (no meta.json)")
    args = meta.get("dataset_args")
    if not args:
        raise UserError(f"mask cache {str(path)!r} does not record how to rebuild its dataset; pass the settings "
                        "(--attention, --data, ...) instead of PATH")
    args = dict(args)
    dataset = build_dataset(args.pop("name"), args.pop("split"), **args)
    cache = MaskCache.open(path, hint=BUILD_HINT)
    if dataset.fingerprint() != cache.key["dataset"]["fingerprint"]:
        raise UserError(f"the data of mask cache {str(path)!r} is no longer what it was (fingerprint "
                        f"{dataset.fingerprint()} != {cache.key['dataset']['fingerprint']}); rebuild the cache")
    return cache, dataset


def render_grid(images, attention, foreground, truth, titles: list[str], out: Path, columns: int = 8) -> None:
    """A PNG: one column per sample, rows image / attention / foreground / ground truth
    (rows whose tensor is None are left out), blocks of ``columns`` samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [("image", images, None), ("attention", attention, "magma"), ("foreground", foreground, "gray"),
             ("ground truth", truth, "gray")]
    kinds = [k for k in kinds if k[1] is not None]
    n = images.shape[0]
    cols = min(columns, n)
    blocks = math.ceil(n / cols)
    rows = blocks * len(kinds)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 0.9, 1.35 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    for i in range(n):
        block, col = divmod(i, cols)
        for j, (name, tensor, cmap) in enumerate(kinds):
            ax = axes[block * len(kinds) + j, col]
            if name == "image":
                ax.imshow(tensor[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
                ax.set_title(titles[i], fontsize=7)
            else:
                ax.imshow(tensor[i, 0].float().numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout(pad=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


@app.command()
@_user_errors
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
    import torch

    from dhat_seg.attention import foreground_iou
    from dhat_seg.cache import batch_foreground

    if n < 1:
        raise UserError(f"--n {n} is invalid; expected a positive number of samples")
    if path is None and attention is None:
        raise UserError("say which cache to show: a cache directory PATH, or --attention NAME with the run's settings")
    cfg = _config(config, set_, attention=attention, data=data, attention_checkpoint=attention_checkpoint,
                  attention_opt=attention_opt, attention_model=attention_model, data_root=data_root, seed=seed)
    cache, dataset = _open_path(path) if path is not None else _open_for_settings(cfg, split, _root(cache_dir))
    if not 0 <= start < len(cache):
        raise UserError(f"--start {start} is invalid; the cache holds samples 0 to {len(cache) - 1}")
    idx = list(range(start, min(len(cache), start + n)))
    images = torch.stack([dataset.load_image(i) for i in idx])
    stored = cache.get_many(idx)
    soft = stored.float() / 255.0 if cache.soft else None
    foreground = batch_foreground(stored, cfg.threshold_policy, cfg.omega, cfg.quantile)
    truth = dataset.gt_masks[idx].unsqueeze(1) if dataset.gt_masks is not None else None
    names = getattr(dataset, "class_names", None)
    titles = []
    for j, i in enumerate(idx):
        label = int(dataset.labels[i])
        title = f"#{i} {names[label] if names else label}"
        if truth is not None:
            title += f"\nIoU {float(foreground_iou(foreground[j:j + 1], truth[j:j + 1])[0]):.2f}"
        titles.append(title)
    render_grid(images, soft, foreground, truth, titles, out)
    typer.echo(f"wrote {out} ({len(idx)} samples of {cache.directory.name})")


# ---------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------


def score_method(cfg, split: str, n: int, root: Path, device, batch_size: int | None = None) -> dict[str, Any]:
    """IoU of ``cfg.attention``'s foreground with the ground truth on the first ``n``
    samples of ``split``: read from its complete cache when there is one, else computed
    (nothing is written)."""
    import torch

    from dhat_seg.attention import foreground_iou, foreground_mask
    from dhat_seg.attention_model import build_attention, frozen
    from dhat_seg.cache import MaskCache, _Unaugmented, batch_foreground, cache_dir_for, dataset_for, frozen_key, read_meta
    from dhat_seg.checkpoint import load_weights

    dataset = dataset_for(cfg, split)
    if dataset.gt_masks is None:
        raise UserError(f"dataset {cfg.data!r} has no ground-truth masks to score against; use --data synthetic")
    n = min(n, len(dataset))
    train_fp = _train_fingerprint(cfg, dataset)
    key, spec, _, weights = frozen_key(cfg, dataset, train_fingerprint=train_fp, root=root, log=_log)
    directory = cache_dir_for(root, key)
    meta = read_meta(directory)
    if meta is not None and meta.get("complete"):
        cache = MaskCache.open(directory, key, hint=BUILD_HINT)
        foreground = batch_foreground(cache.get_many(range(n)), cfg.threshold_policy, cfg.omega, cfg.quantile)
        source = "cache"
    else:
        classifier = frozen(load_weights(weights), device) if weights is not None else None
        fn = build_attention(cfg, train_fingerprint=train_fp, num_classes=dataset.num_classes, device=device, log=_log,
                             root=root, classifier=classifier)
        loader = torch.utils.data.DataLoader(_Unaugmented(dataset, 0, n), batch_size=batch_size or cfg.batch_size)
        parts = []
        for images, labels in loader:
            result = fn(images.to(device), labels.to(device))
            parts.append(foreground_mask(result, cfg.threshold_policy, cfg.omega, cfg.quantile).cpu())
        foreground = torch.cat(parts)
        source = "computed"
    truth = dataset.gt_masks[:n]
    iou = foreground_iou(foreground, truth)
    return {"attention": spec.name, "n": n, "mean_iou": round(iou.mean().item(), 4), "median_iou": round(iou.median().item(), 4),
            "coverage": round(foreground.float().mean().item(), 4), "gt_coverage": round(truth.float().mean().item(), 4),
            "masks": source}


@app.command()
@_user_errors
def score(
    attention: str = typer.Option(..., help="attention method, a comma list, or 'all' (the ready ones)"),
    data: Optional[str] = typer.Option("synthetic", help="a dataset with ground-truth masks (synthetic)"),
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
    from dhat_seg.cli import print_table
    from dhat_seg.plugin_manager import attention_methods

    from dhat_seg.cli import parse_key_values
    from dhat_seg.plugin_manager import get_attention_spec

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
        rows.append(score_method(cfg, split, n, _root(cache_dir), _device(cfg), batch_size))
    print_table(rows, [("attention", "attention"), ("n", "n"), ("mean_iou", "mean IoU"), ("median_iou", "median IoU"),
                       ("coverage", "foreground"), ("gt_coverage", "gt foreground"), ("masks", "masks")])
    typer.echo(f"(foreground: {cfg.threshold_policy} threshold"
               + (f" omega={cfg.omega}" if cfg.threshold_policy == "fixed" else "")
               + (f" quantile={cfg.quantile}" if cfg.threshold_policy == "quantile" else "") + f"; {split} split)")
