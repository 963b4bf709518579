"""The training loop: fit, validate, checkpoint, resume and select, nothing else.

The :class:`Trainer` receives plain, built objects (:class:`RunParts`: datasets, model,
training method, attention function or mask cache) from the orchestration layer
(:mod:`dhat_seg.run.experiment`), which resolves a config into them. Periodic work with its
own state, such as rebuilding self-attention masks, is a :class:`Callback`.

Per batch: (image, label, index[, cached mask]) -> foreground mask of the clean image
-> the training method's loss (with ``awp``: at perturbed weights, restored after the
backward pass) -> statistics queued on the device (read in one transfer every
``sync_every`` batches: :mod:`dhat_seg.run.train_loop`) -> step. With
``mask_source: cache`` each sample's mask travels with its image through the same
random crop and flip; with ``mask_source: online`` the attention function runs on
every augmented batch.

Reproducibility: every epoch reseeds the RNGs from (seed, epoch), so an epoch depends
only on the state saved at the end of the previous one. A run killed at any point and
restarted with ``resume=True`` redoes the interrupted epoch and ends with the same
``summary.json`` as an uninterrupted run, and the same run repeated gives the same bits
(on CPU; on CUDA some kernels stay nondeterministic, see
:func:`dhat_seg.run.determinism.deterministic_kernels`).

Faults: the orchestration layer holds the run directory's lock and the SIGINT/SIGTERM
handling around :meth:`Trainer.fit` (entered once per run, :func:`dhat_seg.run.stopping.run_scope`)
and hands the trainer its :class:`~dhat_seg.run.stopping.GracefulStop`: a stop request ends the
fit at the end of the current batch (:class:`~dhat_seg.errors.Interrupted`; the last
finished epoch's checkpoint is the resume point and the interrupted epoch is redone
exactly). A write that fails (full disk, read-only file system) is a
:class:`~dhat_seg.errors.WriteError` that leaves the previous checkpoint and every
complete metrics line in place.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from dhat_seg import __version__, attacks
from dhat_seg.evaluation import evaluate
from dhat_seg.attention import foreground_mask
from dhat_seg.cache.dataset import MaskedDataset
from dhat_seg.cache.store import batch_foreground
from dhat_seg.run.checkpoint import (STATE, TRAIN_WEIGHTS, WEIGHTS, atomic_write_text, load_state, load_weights,
                                     read_pointers, replaced_atomically, save_checkpoint)
from dhat_seg.config import TrainConfig, save_config
from dhat_seg.method_options import flat_settings, migrate
from dhat_seg.run.distributed import SINGLE, Dist, convert_sync_batchnorm
from dhat_seg.epoch_table import EpochPrinter
from dhat_seg.errors import DivergenceError, Interrupted, UserError, write_error
from dhat_seg.run.determinism import seed_everything
from dhat_seg.run.devices import worker_count
from dhat_seg.run.stopping import GracefulStop, signal_name
from dhat_seg.run.speed import prepare_model
from dhat_seg.run.speed import describe as describe_speed
from dhat_seg.run.train_loop import DeviceStats, EpochLoader, sync_interval
from dhat_seg.training_methods import reads_base

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.yaml", "metrics.jsonl", "summary.json"


@dataclass
class RunParts:
    """What a run trains on, built from its config by :mod:`dhat_seg.run.experiment`.

    ``attention``: a per-batch attention function (``mask_source: online``) or None;
    ``masks``: the per-sample mask cache of ``train`` (``mask_source: cache``) or None;
    a callback may replace ``masks`` at the start of an epoch."""

    train: Any
    val: Any
    test: Any
    model: torch.nn.Module
    training_method: Any
    attention: Callable | None = None
    masks: Any = None
    callbacks: list["Callback"] = field(default_factory=list)


class Callback:
    """Periodic work with its own state, called by the :class:`Trainer` (Lightning-style).

    ``state_key``: where :meth:`state_dict` is kept in each checkpoint's state (None:
    nothing kept)."""

    state_key: str | None = None

    def on_fit_start(self, trainer: "Trainer", parts: RunParts, start_epoch: int, state: dict | None) -> None:
        """Before the first epoch (``state``: the resumed checkpoint's state, else None)."""

    def on_epoch_start(self, trainer: "Trainer", parts: RunParts, epoch: int) -> None:
        """Before ``epoch`` (0-based) is trained, before the epoch's RNGs are seeded."""

    def state_dict(self) -> dict | None:
        return None


class Trainer:
    """Fits one run into ``out_dir`` (config.yaml, metrics.jsonl, checkpoints/, summary.json).

    It receives what the orchestration layer resolved once (:class:`dhat_seg.run.experiment.Experiment`):
    ``cfg`` validated, ``parts`` built, ``device`` and ``amp_dtype`` (the training passes'
    autocast dtype, None: fp32) checked, and ``stop``, the entered
    :class:`~dhat_seg.run.stopping.GracefulStop` polled after each batch (None: nothing asks it to
    stop). It validates nothing again and enters no lock, signal handling or kernel setting.
    ``on_epoch``: called with every epoch's metrics record (default: a line of an epoch
    table on stdout, :class:`dhat_seg.epoch_table.EpochPrinter`)."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, parts: RunParts, *, device: torch.device,
                 amp_dtype: torch.dtype | None, stop: GracefulStop | None = None, log: Callable[[str], None] | None = None,
                 progress: bool = True, on_epoch: Callable[[dict], None] | None = None, dist: Dist = SINGLE):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.parts = parts
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.progress = progress
        self.on_epoch = on_epoch or EpochPrinter(lambda line: print(line, flush=True))
        self.device, self.amp_dtype, self.stop = device, amp_dtype, stop
        # loss scaling only for float16; bfloat16 has fp32's range
        self.amp = self.amp_dtype == torch.float16
        self.dist = dist  # torchrun: this process's rank; rank 0 alone writes the run directory
        self._loaders = EpochLoader(batch_size=self.cfg.batch_size, num_workers=worker_count(self.cfg.num_workers, self.device),
                                    seed=self.cfg.seed, pin_memory=self.device.type == "cuda", rank=dist.rank,
                                    world=dist.world, on_device=self.cfg.data_on_device, device=self.device)

    @staticmethod
    def prepare_out_dir(cfg: TrainConfig, out: Path, resume: bool) -> None:
        """Write ``config.yaml`` (refusing a different run's directory)."""
        config_path = out / CONFIG_FILE
        if config_path.exists() and not resume:
            raise UserError(f"run directory {str(out)!r} already holds a run; pass --resume to continue it or choose another --out")
        if resume and config_path.exists():
            import yaml

            saved = flat_settings(migrate(yaml.safe_load(config_path.read_text()) or {}))  # a 0.1 run's config too
            current = flat_settings(cfg.to_dict())
            diff = [k for k in current if k in saved and saved[k] != current[k]
                    and k not in ("device", "num_workers", "sync_every", "amp", "amp_dtype", "channels_last", "compile")]
            if diff:
                k = diff[0]
                raise UserError(f"cannot resume {str(out)!r}: option {k}={current[k]!r} differs from the run's {saved[k]!r}")
        try:
            out.mkdir(parents=True, exist_ok=True)
            with replaced_atomically(config_path) as tmp:  # a resumed run's config.yaml is never left half-written
                save_config(cfg, tmp)
        except OSError as exc:
            raise UserError(f"run directory {str(out)!r} cannot be written ({exc.strerror or exc}); expected a writable "
                            "folder for --out") from None

    # ------------------------------------------------------------------ main
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train (or, with ``resume``, continue) the run; returns the summary. Stops at a
        safe point when ``stop`` is requested; the caller holds the run directory's lock."""
        c, parts = self.cfg, self.parts
        model, method = parts.model, parts.training_method
        if c.sync_bn and self.dist.enabled:  # BN statistics over the global batch (the model object stays the same)
            convert_sync_batchnorm(model)
        prepare_model(model, c)  # channels_last, compile (in place: same module, same state_dict keys)
        if (speed := describe_speed(c, self.amp_dtype)) is not None:
            self.log(speed)
        if method.needs_attention and c.attention_burn_in:
            span = "epoch 1 trains" if c.attention_burn_in == 1 else f"epochs 1-{c.attention_burn_in} train"
            self.log(f"attention burn-in: {span} without the attention terms")
        optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        # MultiStepLR multiplies by gamma once per milestone (the authors' code compounds every epoch)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(c.milestones), gamma=c.gamma)
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        start_epoch, best, state = 0, -math.inf, None
        ckpt_dir = self.out / "checkpoints"
        pointers = read_pointers(ckpt_dir) if resume else {}
        if pointers.get("last"):
            last = ckpt_dir / pointers["last"]
            state = load_state(last / STATE)
            # a method that evaluates other weights (CFA's average) keeps the trained ones apart
            load_weights(last / TRAIN_WEIGHTS if (last / TRAIN_WEIGHTS).is_file() else last / WEIGHTS, model)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if "scaler" in state and self.amp:
                scaler.load_state_dict(state["scaler"])
            start_epoch, best = int(state["epoch"]), float(state["best"])
            self.log(f"resuming {self.out} after epoch {start_epoch}/{c.epochs}")
        elif resume:
            self.log(f"nothing to resume in {self.out}: starting from scratch")
        if self.dist.main:
            self._truncate_metrics(start_epoch)
        self.dist.broadcast_state(model)  # every rank starts from rank 0's weights
        for cb in parts.callbacks:
            cb.on_fit_start(self, parts, start_epoch, state)
        method.on_fit_start(model, state.get("method") if state else None)

        val_x, val_y = evaluate.collect(parts.val, c.val_examples)
        for epoch in range(start_epoch, c.epochs):
            self._stop_if_asked(epoch, None, ckpt_dir)
            t0 = time.time()
            for cb in parts.callbacks:
                cb.on_epoch_start(self, parts, epoch)
            seed_everything(c.seed * 100_003 + epoch + 1_000_003 * self.dist.rank)  # rank 0: as one process
            method.on_epoch_start(model, epoch)
            data = MaskedDataset(parts.train, parts.masks) if parts.masks is not None else parts.train
            try:
                train_stats = self._train_epoch(model, method, parts.attention, data, optimizer, scaler, epoch)
            except DivergenceError as exc:
                last = read_pointers(ckpt_dir).get("last")
                kept = f"the last good checkpoint is {ckpt_dir / last}" if last else "no epoch had finished, no checkpoint"
                raise DivergenceError(f"{exc}; {kept}; lower --lr, or change the loss form (floe_form='relative' is "
                                      f"bounded), or raise max_abs_logit if such logits are expected") from None
            lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained at (the step sets the next one's)
            scheduler.step()
            self.dist.broadcast_state(model, buffers_only=True)  # rank 0's BN statistics for validation and checkpoints
            train_stats.update(method.on_epoch_end(model, epoch, val_x, val_y, self.device))
            evaluated = method.evaluation_model(model)
            val = self._validate(evaluated, val_x, val_y, epoch)
            score = val["val_robust_acc"] if val["val_robust_acc"] is not None else val["val_clean_acc"]
            is_best = score > best
            best = max(best, score)
            record = {"epoch": epoch + 1, "lr": lr, **train_stats, **val,
                      "best": is_best, "seconds": round(time.time() - t0, 2)}
            if not self.dist.main:
                continue  # the others keep the same state; rank 0 writes it
            self._append_metrics(record, ckpt_dir)
            self.on_epoch(record)
            state = {"epoch": epoch + 1, "best": best, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            if self.amp:
                state["scaler"] = scaler.state_dict()
            for cb in parts.callbacks:
                kept = cb.state_dict()
                if cb.state_key and kept is not None:
                    state[cb.state_key] = kept
            if (method_state := method.state_dict()) is not None:
                state["method"] = method_state
            save_checkpoint(ckpt_dir, epoch + 1, evaluated, c.model, state, is_best,
                            train_model=model if evaluated is not model else None)

        self._stop_if_asked(c.epochs, None, ckpt_dir)
        self.dist.barrier()
        if not self.dist.main:
            return {}  # rank 0 evaluates and writes the summary
        return self._finish(method.evaluation_model(model), parts.test, ckpt_dir, method.needs_attention)

    # ------------------------------------------------------------------ faults
    def _stop_if_asked(self, epoch: int, batches: int | None, ckpt_dir: Path) -> None:
        """Interrupted when SIGINT/SIGTERM asked to stop: ``batches`` done in 0-based
        ``epoch`` (whose work is discarded and redone on resume), or None between epochs."""
        requested = self.stop.requested() if self.stop is not None else None
        signum = self.dist.agreed_signal(requested)  # every rank stops at the same batch
        if signum is None:
            return
        last = read_pointers(ckpt_dir).get("last")
        total = self.cfg.epochs
        if batches is None:
            where = f"stopped after epoch {epoch}/{total}" if epoch else "stopped before epoch 1"
        else:
            where = f"stopped in epoch {epoch + 1}/{total} after batch {batches} (a safe point)"
        kept = (f"the checkpoint of epoch {int(last[6:])} is kept ({ckpt_dir / last})" if last
                else "no epoch had finished, so nothing is kept")
        redo = f"; a resumed run redoes epoch {epoch + 1} exactly" if batches is not None and last else ""
        raise Interrupted(signum, f"{signal_name(signum)} received; {where}; {kept}{redo}")

    def _append_metrics(self, record: dict, ckpt_dir: Path) -> None:
        """One line appended to metrics.jsonl; a write that fails is rolled back to the
        previous complete lines (a truncation needs no free space)."""
        path = self.out / METRICS_FILE
        size = path.stat().st_size if path.exists() else 0
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            try:
                os.truncate(path, size)
            except OSError:
                pass  # a torn last line is skipped when the run is resumed
            last = read_pointers(ckpt_dir).get("last")
            kept = (f"it keeps the lines of the finished epochs, and the checkpoint {str(ckpt_dir / last)!r} is intact; "
                    f"--resume continues from it (redoing epoch {record['epoch']})" if last
                    else "no epoch had finished; --resume starts the run again")
            raise write_error(path, exc, f"{kept}; free space or choose a writable --out") from None

    def _truncate_metrics(self, epochs_done: int) -> None:
        """Keep the lines of the ``epochs_done`` checkpointed epochs (a resumed run rewrites
        the rest); a torn last line of a write cut short is dropped."""
        path = self.out / METRICS_FILE
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("epoch", 0) <= epochs_done:
                    kept.append(line)
            except (json.JSONDecodeError, AttributeError):
                continue
        try:
            atomic_write_text(path, "".join(l + "\n" for l in kept))
        except OSError as exc:
            raise write_error(path, exc, "nothing was changed; free space or choose a writable --out") from None

    # ------------------------------------------------------------------ pieces
    def _train_epoch(self, model, method, attention, dataset, optimizer, scaler, epoch) -> dict[str, float]:
        c = self.cfg
        loader = self._loaders.epoch(dataset, epoch)
        model.train()
        warmup = method.needs_attention and epoch < c.attention_burn_in
        autocast = lambda: torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        stats_buffer = DeviceStats(sync_interval(c.sync_every, self.device),
                                   lambda values, batch: self._check_divergence(values, epoch, batch),
                                   reduce=self.dist.mean if self.dist.enabled else None)
        n_batches = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{c.epochs} [{c.method}]", leave=False,
                   disable=not (self.progress and self.dist.main) or None,
                   file=sys.stderr, dynamic_ncols=True)
        for batch in bar:
            x, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
            method.on_batch_start(batch[2])  # the samples' dataset indices (SGLR's per-sample soft labels)
            foreground = None
            if warmup:  # attention burn-in: no masks yet
                pass
            elif len(batch) == 4:  # (image, label, index, cached mask augmented with the image)
                foreground = batch_foreground(batch[3].to(self.device, non_blocking=True), c.threshold_policy,
                                              c.omega, c.quantile)
            elif attention is not None:
                foreground = foreground_mask(attention(x, y), c.threshold_policy, c.omega, c.quantile)
            # AWP (awp: true): weights perturbed for the loss and backward, restored before the step
            with method.weight_perturbation(model, x, y, foreground, epoch, warmup=warmup, autocast=autocast) as prepared:
                with autocast():
                    loss, stats = (method.warmup_loss(model, x, y, prepared) if warmup
                                   else method.loss(model, x, y, foreground, prepared))
                stats["loss"] = loss.detach().float()
                # statistics stay on the device; read (and checked) every sync_every batches in one
                # transfer: on CPU every batch, before its step
                if stats_buffer.add(stats):
                    bar.set_postfix(loss=f"{stats_buffer.last['loss']:.3f}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            self.dist.average_gradients(model)  # torchrun: the global batch's gradient on every rank
            scaler.step(optimizer)
            scaler.update()
            method.after_step(model)
            n_batches += 1
            self._stop_if_asked(epoch, n_batches, self.out / "checkpoints")  # the safe point
        return stats_buffer.summary()

    def _check_divergence(self, values: dict[str, float], epoch: int, batch: int) -> None:
        """DivergenceError when the loss is not finite or a recorded logit (clean, x_B; x_adv for
        AT) exceeds ``max_abs_logit`` in absolute value."""
        where = f"training diverged in epoch {epoch + 1}, batch {batch + 1}"
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise DivergenceError(f"{where}: {bad[0]} is {values[bad[0]]}")
        limit = self.cfg.max_abs_logit
        for key in (k for k in values if k.startswith("max_logit_")):
            if limit and values[key] > limit:
                raise DivergenceError(f"{where}: |logit| reached {values[key]:.3g} on the {key[10:]} inputs "
                                      f"(max_abs_logit={limit:g})")

    def _validate(self, model, x, y, epoch) -> dict[str, float | None]:
        c = self.cfg
        torch.manual_seed(c.seed + epoch)
        clean = evaluate.correct_under_attack(model, x, y, "clean", device=self.device)
        robust = None
        if c.method != "standard":
            model.eval()
            flags = []
            for s in range(0, len(x), 256):
                xb, yb = x[s : s + 256].to(self.device), y[s : s + 256].to(self.device)
                x_adv = attacks.pgd(model, xb, yb, c.eps / 255, 2 / 255, c.val_attack_steps, mode="eval")
                with torch.no_grad():
                    flags.append((model(x_adv).argmax(1) == yb).cpu())
            robust = evaluate.percent(torch.cat(flags))
        return {"val_clean_acc": evaluate.percent(clean), "val_robust_acc": robust}

    def _finish(self, model, test_ds, ckpt_dir, uses_attention: bool) -> dict[str, Any]:
        c = self.cfg
        pointers = read_pointers(ckpt_dir)
        load_weights(ckpt_dir / pointers["best"] / "model.safetensors", model)
        model.eval()
        x, y = evaluate.collect(test_ds, c.test_examples)
        clean = evaluate.correct_under_attack(model, x, y, "clean", device=self.device, seed=c.seed)
        pgd10 = evaluate.correct_under_attack(model, x, y, "pgd10", eps=c.eps / 255, device=self.device, seed=c.seed,
                                              counted="last-iterate")  # summary.json as before; eval.json: any-iterate
        best_state = load_state(ckpt_dir / pointers["best"] / "state.pt")
        summary = {
            "method": c.method,
            "base": c.base if reads_base(c.method) else None,  # the loss UIAT/DHAT/PART/FSR add their terms to
            "awp": c.awp,
            "attention": c.attention if uses_attention else None,
            "model": c.model,
            "data": c.data,
            "epochs": c.epochs,
            "seed": c.seed,
            "best_epoch": int(best_state["epoch"]),
            "best_val_score": round(float(best_state["best"]), 2),
            "clean_acc": evaluate.percent(clean),
            "pgd10_acc": evaluate.percent(pgd10),
            "n_test": len(y),
            "eps": c.eps,
            "config_digest": c.digest(),
            "dhat_seg_version": __version__,
        }
        try:
            atomic_write_text(self.out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        except OSError as exc:
            raise write_error(self.out / SUMMARY_FILE, exc, "every checkpoint is intact and --resume finishes the run "
                              "(only the test evaluation is redone); free space or choose a writable --out") from None
        return summary


