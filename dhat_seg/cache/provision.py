"""Mask caches from a run configuration: the frozen attention model's cache and the self-attention caches.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dhat_seg.attention import AttentionSpec
from dhat_seg.data import split_args, split_for
from dhat_seg.errors import UserError
from dhat_seg.models import module_mode
from dhat_seg.run.devices import worker_count
from dhat_seg.run.locks import directory_lock
from dhat_seg.run.stopping import GracefulStop
from dhat_seg.cache.build import Threshold, build_masks
from dhat_seg.cache.sharded import Shard, build_sharded
from dhat_seg.cache.key import CHUNK_SIZE, REBUILD_HINT, cache_dir_for, cache_name, check_key, mask_key, sha256_file, sha256_state
from dhat_seg.cache.store import MaskCache, read_meta
# ---------------------------------------------------------------------------------
# From a run configuration
# ---------------------------------------------------------------------------------


def dataset_for(cfg, split: str = "train"):
    """The un-augmented dataset of ``split`` that masks are built on."""
    return split_for(cfg, split)


def resolve_method(cfg) -> tuple[AttentionSpec, dict[str, Any]]:
    """The attention spec of ``cfg`` and its resolved options (as ``build_attention``)."""
    from dhat_seg.attention.model import resolve_attention_method

    return resolve_attention_method(cfg)


def frozen_key(cfg, dataset, *, classifier_path: Path | None, root: Path) -> tuple[dict[str, Any] | None, AttentionSpec, dict[str, Any]]:
    """(key, spec, options) of ``cfg``'s frozen-attention cache of ``dataset``, for the
    attention model at ``classifier_path``. The key is None when the method reads a
    classifier and ``classifier_path`` is None (no attention model yet)."""
    spec, options = resolve_method(cfg)
    needs = spec.needs_classifier(options)
    if needs and classifier_path is None:
        return None, spec, options
    sha = sha256_file(classifier_path) if needs else None
    memo = Path(root) / "masks"
    return mask_key(dataset, spec, options, classifier_sha256=sha, memo_dir=memo), spec, options


def ensure_mask_cache(
    cfg,
    dataset,
    *,
    classifier_path: Path | None,
    device: torch.device,
    root: Path,
    log: Callable[[str], None],
    rebuild: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
    hint: str = REBUILD_HINT,
    chunk_size: int = CHUNK_SIZE,
    shard: Shard | None = None,
    stop: GracefulStop | None = None,
) -> MaskCache:
    """Reuse, finish or build the frozen-attention mask cache of ``dataset`` for the
    attention settings of ``cfg`` and the attention model at ``classifier_path`` (None
    for methods that read no classifier); says which in ``log``. The attention model
    is provisioned by the caller (:func:`dhat_seg.run.experiment.frozen_masks`). ``shard``: this
    process's part of a build shared by the ranks of a torchrun job (every rank calls this).
    ``stop``: the GracefulStop of the enclosing run (None: the build installs its own)."""
    from dhat_seg.attention.model import build_attention

    root = Path(root)
    key, spec, options = frozen_key(cfg, dataset, classifier_path=classifier_path, root=root)
    if key is None:
        raise UserError(f"attention method {spec.name!r} reads a classifier and none was given")
    directory = cache_dir_for(root, key)
    path = classifier_path if spec.needs_classifier(options) else None
    threshold = Threshold(cfg.threshold_policy, cfg.omega, cfg.quantile)
    extra = {"dataset_args": split_args(cfg, dataset.split), "attention_model": str(path) if path else None}
    workers = worker_count(cfg.num_workers, torch.device(device))
    if shard is not None and shard.world > 1:
        # every rank enters the build (its barriers decide together whether anything is left to
        # do); rank 0 holds the cache's lock against other jobs; the attention is built lazily
        built: list = []

        def attention(images, labels):
            if not built:
                built.append(build_attention(cfg, num_classes=dataset.num_classes, device=device, classifier_path=path))
            return built[0](images, labels)

        lock = directory_lock(directory, wait=True, busy="mask cache directory") if shard.rank == 0 else nullcontext()
        with lock:
            return build_sharded(attention, dataset, directory, key, shard, device=device,
                                 batch_size=batch_size or cfg.batch_size, chunk_size=chunk_size, num_workers=workers,
                                 threshold=threshold, rebuild=rebuild, log=log, progress=progress, method_name=spec.name,
                                 extra_meta=extra, locked=shard.rank == 0, stop=stop)
    meta = None if rebuild else read_meta(directory)
    if meta is not None and meta.get("complete"):  # no lock needed (nor a writable cache) to reuse a complete cache
        cache = MaskCache.open(directory, key, hint=hint)
        log(f"mask cache: reusing {directory} ({len(cache)} masks)")
        return cache

    def waiting(pid: str) -> None:
        log(f"mask cache: another process (pid {pid}) is building {directory}; waiting for it")

    # one builder at a time: a process that had to wait finds the cache the other one built
    with directory_lock(directory, wait=True, busy="mask cache directory", on_wait=waiting) as waited:
        rebuild = rebuild and not waited
        meta = None if rebuild else read_meta(directory)
        if meta is not None and meta.get("complete"):
            cache = MaskCache.open(directory, key, hint=hint)
            log(f"mask cache: reusing {directory} ({len(cache)} masks), built by the process waited for")
            return cache
        if meta is not None:
            check_key(directory, meta["key"], key, hint)
            done = sum(1 for r in meta.get("chunks", {}).values() if r)
            log(f"mask cache: resuming the interrupted build of {directory} ({done} chunks done)")
        else:
            log(f"mask cache: building {directory} ({len(dataset)} masks with {spec.name}; runs once, later runs reuse it)")
        attention = build_attention(cfg, num_classes=dataset.num_classes, device=device, classifier_path=path)
        return build_masks(attention, dataset, directory, key, device=device, batch_size=batch_size or cfg.batch_size,
                           chunk_size=chunk_size, num_workers=workers, threshold=threshold, rebuild=rebuild, log=log,
                           progress=progress, method_name=spec.name, extra_meta=extra, locked=True, stop=stop)


def self_mask_cache(
    cfg,
    dataset,
    model: nn.Module,
    epoch: int,
    directory_root: Path,
    *,
    device: torch.device,
    log: Callable[[str], None],
    progress: bool = True,
    stop: GracefulStop | None = None,
) -> MaskCache:
    """Masks of ``dataset`` from the model being trained (``attention_source: self``),
    taken in eval mode at the start of ``epoch``; keyed by the SHA-256 of its state and
    the epoch, kept under ``directory_root`` (the run's ``masks/``). Reused when a
    complete cache of the same weights exists (a resumed run), else built (``stop``: the
    run's GracefulStop, polled after each batch)."""
    from dhat_seg.attention.model import build_attention

    spec, options = resolve_method(cfg)
    if not spec.needs_classifier(options):
        raise UserError(f"attention_source='self' needs an attention method that reads a classifier (gradcam, ig, sam with "
                        f"prompt=peak); {spec.name!r} with these options does not: use attention_source='frozen'")
    key = mask_key(dataset, spec, options, classifier_sha256=sha256_state(model), source="self", weights_epoch=epoch)
    directory = Path(directory_root) / cache_name(key)
    meta = read_meta(directory)
    if meta is not None and meta.get("complete"):
        cache = MaskCache.open(directory, key)
        log(f"mask cache: reusing self-attention masks of epoch {epoch} from {directory} ({len(cache)} masks)")
        return cache
    log(f"mask cache: building self-attention masks of epoch {epoch} ({len(dataset)} masks with {spec.name} on the "
        f"model being trained) in {directory}")
    attention = build_attention(cfg, num_classes=dataset.num_classes, device=device, classifier=model)

    def fn(images, labels):
        with module_mode(model, training=False):
            return attention(images, labels)

    threshold = Threshold(cfg.threshold_policy, cfg.omega, cfg.quantile)
    workers = worker_count(cfg.num_workers, torch.device(device))
    return build_masks(fn, dataset, directory, key, device=device, batch_size=cfg.batch_size, num_workers=workers,
                       threshold=threshold, log=log, progress=progress, method_name=spec.name,
                       extra_meta={"dataset_args": split_args(cfg, dataset.split)}, stop=stop)


def open_self_cache(directory_root: Path, dataset, cfg, weights_sha256: str, epoch: int) -> MaskCache | None:
    """The complete self-attention cache of given weights and epoch, or None when it is
    missing or damaged (a resumed run whose masks were deleted)."""
    spec, options = resolve_method(cfg)
    key = mask_key(dataset, spec, options, classifier_sha256=weights_sha256, source="self", weights_epoch=epoch)
    directory = Path(directory_root) / cache_name(key)
    try:
        return MaskCache.open(directory, key)
    except UserError:
        return None


