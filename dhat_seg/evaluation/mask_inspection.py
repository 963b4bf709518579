"""Looking into mask caches: status and description of a cache, opening one from a
run's settings or its directory, a PNG grid of images and masks, and scoring an
attention method's foreground against ground truth. Library code behind ``dhat-seg
masks info|show|score`` (the CLI only parses and prints)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from dhat_seg.attention import foreground_iou, foreground_mask
from dhat_seg.attention.model import build_attention
from dhat_seg.cache import MaskCache, batch_foreground, cache_dir_for, frozen_key, read_meta
from dhat_seg.cache.build import _Unaugmented
from dhat_seg.cache.store import _chunk_name
from dhat_seg.data import build_dataset, split_for
from dhat_seg.errors import UserError
from dhat_seg.run.experiment import classifier_path

BUILD_HINT = "pass --rebuild to rebuild it"


def train_fingerprint(cfg, dataset) -> str:
    """Fingerprint of the training split (it keys the attention model)."""
    return dataset.fingerprint() if dataset.split == "train" else split_for(cfg, "train").fingerprint()


def settings_key(cfg, dataset, root: Path, log: Callable[[str], None], *, train: bool = False):
    """(key, spec) of the frozen-attention cache of ``dataset`` under ``cfg``; the key is
    None when its attention model does not exist and ``train`` is False."""
    path = classifier_path(cfg, train_fingerprint(cfg, dataset), root, log, train=train)
    key, spec, _ = frozen_key(cfg, dataset, classifier_path=path, root=root)
    return key, spec, path


def cache_status(directory: Path) -> tuple[dict[str, Any] | None, str]:
    """(meta or None, "missing" | "complete, verified" | "NOT USABLE: why")."""
    meta = read_meta(directory)
    if meta is None:
        return None, "missing"
    try:
        MaskCache.open(directory)
    except UserError as exc:
        return meta, f"NOT USABLE: {exc}"
    return meta, "complete, verified"


def describe(directory: Path, meta: dict[str, Any], status: str = "complete, verified") -> list[tuple[str, str]]:
    """(field, value) lines describing a cache, ending with its key as JSON."""
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
    return [
        ("cache", str(directory)),
        ("status", status),
        ("samples", f"{n} ({done} of {total} chunks of {chunk})"),
        ("mask size", f"{meta['height']} x {meta['width']}"),
        ("storage", storage.get(meta.get("storage"), str(meta.get("storage")))),
        ("bytes/sample", str(meta.get("bytes_per_sample", "-"))),
        ("coverage", cov),
        ("build time", f"{meta.get('build_seconds', 0):.1f} s" + (f", finished {meta['built_at']}" if meta.get("built_at") else "")),
        ("key hash", str(meta.get("key_hash"))),
        ("key", json.dumps(meta["key"], indent=2, sort_keys=True)),
    ]


def open_for_settings(cfg, split: str, root: Path, log: Callable[[str], None]):
    """(cache, dataset) of a run's settings; the cache must exist."""
    dataset = split_for(cfg, split)
    key, _, _ = settings_key(cfg, dataset, root, log)
    directory = cache_dir_for(root, key) if key is not None else None
    if directory is None or not (directory / "meta.json").is_file():
        raise UserError(f"no mask cache of {cfg.attention!r} for these settings; build it first with "
                        f"`dhat-seg masks build --attention {cfg.attention} ...` (same settings)")
    return MaskCache.open(directory, key, hint=BUILD_HINT), dataset


def open_path(path: Path):
    """(cache, dataset) of a cache directory; the dataset is rebuilt from its metadata."""
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


def grid_contents(cache: MaskCache, dataset, cfg, indices: list[int]):
    """(images, soft maps or None, foreground, ground truth or None, titles) of samples."""
    images = torch.stack([dataset.load_image(i) for i in indices])
    stored = cache.get_many(indices)
    soft = stored.float() / 255.0 if cache.soft else None
    foreground = batch_foreground(stored, cfg.threshold_policy, cfg.omega, cfg.quantile)
    truth = dataset.gt_masks[indices].unsqueeze(1) if dataset.gt_masks is not None else None
    names = getattr(dataset, "class_names", None)
    titles = []
    for j, i in enumerate(indices):
        label = int(dataset.labels[i])
        title = f"#{i} {names[label] if names else label}"
        if truth is not None:
            title += f"\nIoU {float(foreground_iou(foreground[j:j + 1], truth[j:j + 1])[0]):.2f}"
        titles.append(title)
    return images, soft, foreground, truth, titles


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


def score_method(cfg, split: str, n: int, root: Path, device, log: Callable[[str], None], batch_size: int | None = None) -> dict[str, Any]:
    """IoU of ``cfg.attention``'s foreground with the ground truth on the first ``n``
    samples of ``split``: read from its complete cache when there is one, else computed
    (nothing is written; the attention model is trained first when missing)."""
    dataset = split_for(cfg, split)
    if dataset.gt_masks is None:
        raise UserError(f"dataset {cfg.data!r} has no ground-truth masks to score against; use --data synthetic or --data digits, or give the image folder ROOT/masks/<split>/")
    n = min(n, len(dataset))
    key, spec, weights = settings_key(cfg, dataset, root, log, train=True)
    directory = cache_dir_for(root, key)
    meta = read_meta(directory)
    if meta is not None and meta.get("complete"):
        cache = MaskCache.open(directory, key, hint=BUILD_HINT)
        foreground = batch_foreground(cache.get_many(range(n)), cfg.threshold_policy, cfg.omega, cfg.quantile)
        source = "cache"
    else:
        fn = build_attention(cfg, num_classes=dataset.num_classes, device=device, classifier_path=weights)
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
