"""The orchestration layer: resolve a config into the objects a run trains on, then fit.

Data flows one way::

    TrainConfig --build_parts--> RunParts (datasets, model, training method,
        |                                  attention function or mask cache, callbacks)
        |                                         |
        +--> Trainer(cfg, out, parts, device=, amp_dtype=, stop=).fit()  <----+
                                              (fits, validates, checkpoints, resumes)

A run is resolved once, here: :class:`Experiment` validates the config, picks the device
and the autocast dtype, checks the speed options, takes the run directory's lock, enters
the run scope (SIGINT/SIGTERM as a stop request, deterministic kernels:
:func:`dhat_seg.run.stopping.run_scope`) and builds the training method, each once; the
trainer, the mask builds and a nested attention-model run receive the results (the
device, the dtype, the entered :class:`~dhat_seg.run.stopping.GracefulStop`) and enter
nothing again.

Attention provisioning lives here and only here: the frozen attention model (a
normally trained classifier, itself trained through this module as a plain run and
cached), the mask cache built from it, the online attention function, and the
self-attention refresh callback. Lower layers (trainer, cache, attention.model) never
call back up.

Concurrency: a run holds its directory's lock (``RUN/.lock``) from before its
``config.yaml`` is written to the end: a second process given the same ``--out`` fails at
once. Processes sharing a cache directory wait for each other instead: the attention
model is trained by one (the others wait on its run directory's lock and then reuse it),
and a mask cache is built by one (the others wait on the cache's lock).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable

from dhat_seg.attention.model import (
    attention_model_config,
    attention_model_dir,
    build_attention,
    cache_root,
    find_attention_model,
    resolve_attention_method,
)
from dhat_seg.cache import provision
from dhat_seg.cache.key import REBUILD_HINT
from dhat_seg.run.checkpoint import resolve_weights
from dhat_seg.cache.sharded import Shard
from dhat_seg.config import TrainConfig, needs_attention
from dhat_seg.run.distributed import SINGLE, Dist, check_distributable
from dhat_seg.epoch_table import EpochPrinter
from dhat_seg.data import channel_stats, split_for
from dhat_seg.errors import Interrupted, UserError
from dhat_seg.models import CIFAR_MEAN, CIFAR_STD, create_model, module_mode
from dhat_seg.run.determinism import seed_everything
from dhat_seg.run.devices import resolve_amp_dtype, select_device
from dhat_seg.run.locks import directory_lock
from dhat_seg.run.stopping import GracefulStop, run_scope, signal_name
from dhat_seg.run.train_loop import batches_per_epoch
from dhat_seg.run.speed import check_speed_options
from dhat_seg.run.trainer import RunParts, Trainer
from dhat_seg.training_methods import create_training_method

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------
# The frozen attention model and its masks
# ---------------------------------------------------------------------------------


def ensure_attention_model(cfg: TrainConfig, train_fingerprint: str, root: Path, log: Log = _stderr,
                           progress: bool = True, stop: GracefulStop | None = None) -> Path:
    """The attention model's weights: ``cfg.attention_model``, or the cached one, or one
    trained now as a plain run (said in the output) and cached for later runs. ``stop``:
    the GracefulStop of the enclosing run scope, handed to that run (None: it enters its own)."""
    found = find_attention_model(cfg, train_fingerprint, root)
    run_dir = attention_model_dir(cfg, train_fingerprint, root)
    if found is not None:
        if not cfg.attention_model:
            log(f"attention model: reusing normally trained {cfg.attention_model_arch} from {run_dir}")
        return found

    def waiting(pid: str) -> None:
        log(f"attention model: another process (pid {pid}) is training it in {run_dir}; waiting for it")

    with directory_lock(run_dir, wait=True, on_wait=waiting):
        found = find_attention_model(cfg, train_fingerprint, root)
        if found is not None:  # trained by the process we waited for
            log(f"attention model: reusing normally trained {cfg.attention_model_arch} from {run_dir}")
            return found
        log(f"attention model: none given (--attention-model), so training a {cfg.attention_model_arch} normally for "
            f"{cfg.attention_model_epochs} epochs first, as the paper does; it is saved in {run_dir} and reused by later runs")
        try:
            Experiment(attention_model_config(cfg), run_dir, log=log, cache_dir=root, progress=progress,
                       on_epoch=EpochPrinter(log, prefix="attention model: "), stop=stop).run(
                resume=(run_dir / "config.yaml").is_file(), locked=True)  # its lock is held here
        except Interrupted as exc:
            exc.message = f"while training the attention model in {run_dir}: {exc.message}"
            raise
    return resolve_weights(run_dir)


def classifier_path(cfg: TrainConfig, train_fingerprint: str, root: Path, log: Log = _stderr, *, train: bool = True,
                    progress: bool = True, stop: GracefulStop | None = None) -> Path | None:
    """The frozen classifier that ``cfg``'s attention method reads: None when it reads
    none, or (``train`` False) when it does not exist yet."""
    spec, options = resolve_attention_method(cfg)
    if not spec.needs_classifier(options):
        return None
    if train:
        return ensure_attention_model(cfg, train_fingerprint, root, log, progress, stop)
    return find_attention_model(cfg, train_fingerprint, root)


def frozen_masks(cfg: TrainConfig, dataset, *, device, root: Path, log: Log = _stderr, train_fingerprint: str | None = None,
                 rebuild: bool = False, progress: bool = True, batch_size: int | None = None, hint: str = REBUILD_HINT,
                 stop: GracefulStop | None = None, **kwargs: Any):
    """The frozen-attention mask cache of ``dataset`` (reused, resumed or built), with its
    attention model provisioned first. ``train_fingerprint``: the training split's
    fingerprint, which keys the attention model (default: ``dataset``'s own). ``stop``:
    the GracefulStop of the enclosing run scope (None: each piece enters its own)."""
    root = Path(root)
    path = classifier_path(cfg, train_fingerprint or dataset.fingerprint(), root, log, progress=progress, stop=stop)
    return provision.ensure_mask_cache(cfg, dataset, classifier_path=path, device=device, root=root, log=log,
                                       rebuild=rebuild, progress=progress, batch_size=batch_size, hint=hint, stop=stop,
                                       **kwargs)


def provision_attention(cfg: TrainConfig, *, root: Path, log: Log = _stderr, progress: bool = True) -> None:
    """Provision, once, what a run of ``cfg`` reads from the cache directory ``root``
    before it trains: the frozen attention model and (``mask_source: cache``) the training
    split's mask cache, each reused when present, else built (as :func:`build_parts` would).
    Nothing for a method without attention nor for ``attention_source: self`` (its masks
    come from the model being trained, in the run directory). A study fanned out over
    processes calls it in the parent, row by row, before its workers start, so that no
    two workers build the same cache. Within one run scope (a stop asked by SIGINT/SIGTERM
    ends it at the next safe point, or after the provisioning when none came)."""
    if not needs_attention(cfg.method) or cfg.attention_source == "self":
        return
    device = select_device(cfg.device)
    with run_scope(device) as stop:
        seed_everything(cfg.seed)
        train_ds = split_for(cfg, "train", augment=cfg.augment)
        if cfg.mask_source == "online":
            classifier_path(cfg, train_ds.fingerprint(), Path(root), log, progress=progress, stop=stop)
        else:
            frozen_masks(cfg, train_ds, device=device, root=Path(root), log=log, progress=progress, stop=stop)
        if (signum := stop.requested()) is not None:  # asked where nothing polled it: not swallowed
            raise Interrupted(signum, f"{signal_name(signum)} received; stopped after provisioning the attention of "
                                      f"{cfg.attention} (what it wrote is complete)")


def _in_eval_mode(attention, model):
    """``attention`` called with ``model`` (the model being trained) in eval mode."""

    def fn(images, labels):
        with module_mode(model, training=False):
            return attention(images, labels)

    return fn


# ---------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------


def build_parts(cfg: TrainConfig, out: Path, *, device, root: Path, log: Log = _stderr, progress: bool = True,
                rebuild_masks: bool = False, dist: Dist = SINGLE, stop: GracefulStop | None = None) -> RunParts:
    """Resolve ``cfg`` into the datasets, model, training method (built here, once) and
    attention of a run (``dist``: the ranks of a torchrun job build the mask cache
    together; ``stop``: the run scope's GracefulStop, handed to the mask build and the
    attention model's run)."""
    from dhat_seg.run.callbacks import SelfAttentionMasks

    c = cfg
    seed_everything(c.seed)
    train_ds, val_ds, test_ds = split_for(c, "train", augment=c.augment), split_for(c, "val"), split_for(c, "test")
    mean, std = (CIFAR_MEAN, CIFAR_STD) if c.data.startswith("cifar") else channel_stats(train_ds)
    model = create_model(c.model, train_ds.num_classes, mean, std).to(device)
    method = create_training_method(c)
    method.on_train_data(len(train_ds), batches_per_epoch(len(train_ds), c.batch_size))
    parts = RunParts(train_ds, val_ds, test_ds, model, method)
    if not method.needs_attention:
        return parts
    if c.attention_source == "self":
        spec, options = resolve_attention_method(c)
        if not spec.needs_classifier(options):
            raise UserError(f"attention_source='self' needs an attention method that reads a classifier (gradcam, ig, "
                            f"sam with prompt=peak); {c.attention!r} does not: use attention_source='frozen'")
        if c.mask_source == "online":
            parts.attention = _in_eval_mode(build_attention(c, num_classes=train_ds.num_classes, device=device,
                                                            classifier=model), model)
        else:
            parts.callbacks.append(SelfAttentionMasks(c, out, device=device, log=log, progress=progress))
        return parts
    if c.mask_refresh_every:
        log("mask_refresh_every is ignored with attention_source='frozen': the frozen model's masks never change")
    if c.mask_source == "online":
        path = classifier_path(c, train_ds.fingerprint(), root, log, progress=progress, stop=stop)
        parts.attention = build_attention(c, num_classes=train_ds.num_classes, device=device, classifier_path=path)
    else:
        shard = Shard(dist.rank, dist.world, dist.barrier) if dist.enabled else None
        parts.masks = frozen_masks(c, train_ds, device=device, root=root, log=log, rebuild=rebuild_masks, progress=progress,
                                   shard=shard, stop=stop)
    return parts


def resolve_runtime(cfg: TrainConfig, dist: Dist = SINGLE) -> tuple[Any, Any]:
    """The device and the training passes' autocast dtype (None: fp32) of the validated
    ``cfg``, refusing before any work an impossible precision, a compile that cannot work
    on that device, or a setting that cannot be distributed."""
    check_distributable(cfg, dist)
    device = select_device(cfg.device)
    amp_dtype = resolve_amp_dtype(cfg, device)
    check_speed_options(cfg, device)
    return device, amp_dtype


class Experiment:
    """One training run from a config: ``Experiment(cfg, out).run(resume=False)`` builds
    its parts (:func:`build_parts`) and fits them with a :class:`Trainer`; returns the
    summary (also in ``out/summary.json``).

    The run is resolved here, once: the config validated, the device, the autocast dtype
    and the speed options checked on construction; the lock, the run scope and the
    training method in :meth:`run`. ``on_epoch``: called with each epoch's metrics record
    (default: a JSON line on stdout). ``stop``: the GracefulStop of an enclosing run scope
    (a run nested in another, e.g. the attention model's); None: :meth:`run` enters its own."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, *, log: Log | None = None, cache_dir: str | Path | None = None,
                 progress: bool = True, rebuild_masks: bool = False, on_epoch: Callable[[dict], None] | None = None,
                 dist: Dist = SINGLE, stop: GracefulStop | None = None):
        self.cfg = cfg if cfg.validated else cfg.validate()  # load_config's validation counts: once per run
        self.out = Path(out_dir)
        self.log = log or _stderr
        self.cache_root = cache_root(cache_dir)
        self.progress, self.rebuild_masks, self.on_epoch = progress, rebuild_masks, on_epoch
        self.dist, self.stop = dist, stop
        self.device, self.amp_dtype = resolve_runtime(self.cfg, dist)
        self.parts: RunParts | None = None  # what the last run trained on

    def run(self, resume: bool = False, *, locked: bool = False) -> dict[str, Any]:
        """Build the parts and fit them, holding the run directory's lock (``locked``: the
        caller holds it already), within the run scope (deterministic kernels, stopping at
        a safe point on SIGINT/SIGTERM: :class:`~dhat_seg.errors.Interrupted`)."""
        if needs_attention(self.cfg.method):
            resolve_attention_method(self.cfg)  # options and checkpoint refused before the run directory is made
        main = self.dist.main  # torchrun: rank 0 alone holds and writes the run directory
        lock = (directory_lock(self.out, wait=False, busy="run directory", hint="choose another --out")
                if main and not locked else contextlib.nullcontext())
        with lock, run_scope(self.device, self.stop) as stop:
            if main:
                Trainer.prepare_out_dir(self.cfg, self.out, resume)  # under the lock: no other process writes here now
            self.dist.barrier()
            self.parts = build_parts(self.cfg, self.out, device=self.device, root=self.cache_root, log=self.log,
                                     progress=self.progress, rebuild_masks=self.rebuild_masks, dist=self.dist, stop=stop)
            trainer = Trainer(self.cfg, self.out, self.parts, device=self.device, amp_dtype=self.amp_dtype, stop=stop,
                              log=self.log, progress=self.progress, on_epoch=self.on_epoch, dist=self.dist)
            return trainer.fit(resume=resume)
