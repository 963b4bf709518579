"""The training loop: optimiser, schedule, devices, checkpoints, resume, selection.

What is computed per batch lives in ``methods.py``; where foreground masks come from
in ``attention_model.py`` and ``cache.py``. Data flows one way: dataset -> (image,
label, index[, cached mask]) -> foreground mask of the clean image -> method loss ->
metrics. With ``mask_source: cache`` (the default) each sample's mask is computed once,
on the un-augmented image, and travels with its image through the same random crop and
flip; with ``mask_source: online`` the attention method runs on every augmented batch.

Reproducibility: every epoch reseeds the RNGs from (seed, epoch), so an epoch depends
only on the state saved at the end of the previous one. A run killed at any point and
restarted with ``resume=True`` redoes the interrupted epoch and ends with the same
``summary.json`` as an uninterrupted run (on CPU; CUDA kernels may be nondeterministic).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dhat_seg import __version__, attacks, evaluate
from dhat_seg import cache as mask_cache
from dhat_seg.attention import foreground_mask
from dhat_seg.attention_model import build_attention, cache_root
from dhat_seg.checkpoint import load_state, load_weights, read_pointers, save_checkpoint
from dhat_seg.config import TrainConfig, save_config
from dhat_seg.data import split_for
from dhat_seg.errors import DivergenceError, UserError
from dhat_seg.methods import create_method
from dhat_seg.models import CIFAR_MEAN, CIFAR_STD, create_model, module_mode

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.yaml", "metrics.jsonl", "summary.json"


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is invalid; expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for but CUDA is not available; use --device cpu or auto")
    return device


def resolve_amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the training passes, or None (fp32). Attacks never use it
    (they run in fp32 unless ``attack_precision: autocast``)."""
    if not cfg.amp:
        return None
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if cfg.amp_dtype == "float16":
        if device.type != "cuda":
            raise UserError(f"config option amp_dtype='float16' needs a CUDA device (this run uses {device}); "
                            "expected amp_dtype 'bfloat16' or 'auto' here")
        return torch.float16
    if cfg.amp_dtype == "bfloat16" and not bf16_ok:
        raise UserError(f"config option amp_dtype='bfloat16' is not supported by {device}; expected 'float16' or 'auto'")
    return torch.bfloat16 if bf16_ok else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def channel_stats(dataset, n: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to ``n`` images (normalisation inside the model)."""
    x = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


class Trainer:
    """Trains one run into ``out_dir`` (config.yaml, metrics.jsonl, checkpoints/, summary.json)."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, *, log: Callable[[str], None] | None = None,
                 cache_dir: str | Path | None = None, progress: bool = True, rebuild_masks: bool = False):
        self.cfg = cfg.validate()
        self.rebuild_masks = rebuild_masks
        self.out = Path(out_dir)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.cache_root = cache_root(cache_dir)
        self.progress = progress
        self.device = select_device(cfg.device)
        self.amp_dtype = resolve_amp_dtype(self.cfg, self.device)
        # loss scaling only for float16; bfloat16 has fp32's range
        self.amp = self.amp_dtype == torch.float16

    # ------------------------------------------------------------------ setup
    def _datasets(self):
        c = self.cfg
        return split_for(c, "train", augment=c.augment), split_for(c, "val"), split_for(c, "test")

    def _prepare_out_dir(self, resume: bool) -> None:
        config_path = self.out / CONFIG_FILE
        if config_path.exists() and not resume:
            raise UserError(f"run directory {str(self.out)!r} already holds a run; pass --resume to continue it or choose another --out")
        if resume and config_path.exists():
            import yaml

            saved = yaml.safe_load(config_path.read_text()) or {}
            current = self.cfg.to_dict()
            diff = [k for k in current if k in saved and saved[k] != current[k]
                    and k not in ("device", "num_workers", "amp", "amp_dtype")]
            if diff:
                k = diff[0]
                raise UserError(f"cannot resume {str(self.out)!r}: option {k}={current[k]!r} differs from the run's {saved[k]!r}")
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, config_path)

    # ------------------------------------------------------------------ main
    def run(self, resume: bool = False) -> dict[str, Any]:
        c = self.cfg
        self._prepare_out_dir(resume)
        if self.amp_dtype is not None:
            self.log(f"mixed precision: {str(self.amp_dtype).replace('torch.', '')} autocast for the training passes; "
                     f"attacks in {'the same' if c.attack_precision == 'autocast' else 'fp32'}")
        seed_everything(c.seed)
        train_ds, val_ds, test_ds = self._datasets()
        mean, std = (CIFAR_MEAN, CIFAR_STD) if c.data.startswith("cifar") else channel_stats(train_ds)
        model = create_model(c.model, train_ds.num_classes, mean, std).to(self.device)
        method = create_method(c)
        # per-batch attention function (mask_source "online") or per-sample masks (cache)
        attention, masks = None, None
        if method.needs_attention and c.attention_source == "self":
            spec, options = mask_cache.resolve_method(c)
            if not spec.needs_classifier(options):
                raise UserError(f"attention_source='self' needs an attention method that reads a classifier (gradcam, ig, "
                                f"sam with prompt=peak); {c.attention!r} does not: use attention_source='frozen'")
        if method.needs_attention and c.mask_source == "online":
            attention = build_attention(c, train_fingerprint=train_ds.fingerprint(), num_classes=train_ds.num_classes,
                                        device=self.device, log=self.log, root=self.cache_root,
                                        classifier=model if c.attention_source == "self" else None)
            if c.attention_source == "self":
                attention = _in_eval_mode(attention, model)
        elif method.needs_attention and c.attention_source == "frozen":
            if c.mask_refresh_every:
                self.log("mask_refresh_every is ignored with attention_source='frozen': the frozen model's masks never change")
            masks = mask_cache.ensure_mask_cache(c, train_ds, device=self.device, root=self.cache_root, log=self.log,
                                                 rebuild=self.rebuild_masks, progress=self.progress)
        self_masks = method.needs_attention and c.mask_source == "cache" and c.attention_source == "self"
        if method.needs_attention and c.attention_burn_in:
            self.log(f"attention burn-in: epochs 1-{c.attention_burn_in} train without the attention terms")
        optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        # MultiStepLR multiplies by gamma once per milestone (the authors' code compounds every epoch)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(c.milestones), gamma=c.gamma)
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        start_epoch, best = 0, -math.inf
        ckpt_dir = self.out / "checkpoints"
        pointers = read_pointers(ckpt_dir) if resume else {}
        if pointers.get("last"):
            state = load_state(ckpt_dir / pointers["last"] / "state.pt")
            load_weights(ckpt_dir / pointers["last"] / "model.safetensors", model)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if "scaler" in state and self.amp:
                scaler.load_state_dict(state["scaler"])
            start_epoch, best = int(state["epoch"]), float(state["best"])
            self.log(f"resuming {self.out} after epoch {start_epoch}/{c.epochs}")
            if self_masks and isinstance(state.get("masks"), dict) and start_epoch < c.epochs:
                masks = self._resume_self_masks(state["masks"], train_ds, start_epoch)
        elif resume:
            self.log(f"nothing to resume in {self.out}: starting from scratch")
        self._truncate_metrics(start_epoch)

        val_x, val_y = evaluate.collect(val_ds, c.val_examples)
        for epoch in range(start_epoch, c.epochs):
            t0 = time.time()
            if self_masks and epoch >= c.attention_burn_in:
                # before reseeding: the build forks its own RNG, the epoch's draws stay the same
                masks = self._self_masks(model, train_ds, epoch, masks)
            seed_everything(c.seed * 100_003 + epoch)
            data = mask_cache.MaskedDataset(train_ds, masks) if masks is not None else train_ds
            try:
                train_stats = self._train_epoch(model, method, attention, data, optimizer, scaler, epoch)
            except DivergenceError as exc:
                last = read_pointers(ckpt_dir).get("last")
                kept = f"the last good checkpoint is {ckpt_dir / last}" if last else "no epoch had finished, no checkpoint"
                raise DivergenceError(f"{exc}; {kept}; lower --lr, or change the loss form (floe_form='relative' is "
                                      f"bounded), or raise max_abs_logit if such logits are expected") from None
            scheduler.step()
            val = self._validate(model, val_x, val_y, epoch)
            score = val["val_robust_acc"] if val["val_robust_acc"] is not None else val["val_clean_acc"]
            is_best = score > best
            best = max(best, score)
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **train_stats, **val,
                      "best": is_best, "seconds": round(time.time() - t0, 2)}
            with open(self.out / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            state = {"epoch": epoch + 1, "best": best, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            if self.amp:
                state["scaler"] = scaler.state_dict()
            if self_masks and masks is not None:
                # which self-attention masks are in use, so that a resumed run finds them
                state["masks"] = {"epoch": masks.key["classifier"]["epoch"], "sha256": masks.key["classifier"]["sha256"]}
            save_checkpoint(ckpt_dir, epoch + 1, model, c.model, state, is_best)

        return self._finish(model, test_ds, ckpt_dir, method.needs_attention)

    # ------------------------------------------------------------------ pieces
    def _truncate_metrics(self, epochs_done: int) -> None:
        path = self.out / METRICS_FILE
        if not path.exists():
            return
        lines = [l for l in path.read_text().splitlines() if l.strip()]
        kept = [l for l in lines if json.loads(l).get("epoch", 0) <= epochs_done]
        path.write_text("".join(l + "\n" for l in kept))

    def _refresh_epoch(self, epoch: int) -> int:
        """The epoch whose starting weights give the self-attention masks of ``epoch``."""
        burn_in, every = self.cfg.attention_burn_in, self.cfg.mask_refresh_every
        return burn_in if every == 0 else burn_in + ((epoch - burn_in) // every) * every

    def _self_masks(self, model, train_ds, epoch, current):
        """Self-attention masks for ``epoch``: kept, or rebuilt from the current weights
        at a refresh epoch (kept in RUN/masks/; older refreshes are deleted)."""
        refresh = self._refresh_epoch(epoch)
        if current is not None and current.key["classifier"]["epoch"] == refresh:
            return current
        if refresh != epoch:
            # resumed without the masks of the last refresh: the nearest we can do
            self.log(f"mask cache: the self-attention masks of epoch {refresh} are missing; recomputing them from the "
                     f"weights of epoch {epoch} (this run now differs from an uninterrupted one)")
        built = mask_cache.self_mask_cache(self.cfg, train_ds, model, refresh, self.out / "masks", device=self.device,
                                           log=self.log, progress=self.progress)
        mask_cache.remove_other_caches(self.out / "masks", built.directory)
        return built

    def _resume_self_masks(self, saved: dict, train_ds, start_epoch: int):
        """The self-attention masks a checkpoint was using, if still on disk and still
        current at ``start_epoch`` (else None: they are rebuilt)."""
        if int(saved["epoch"]) != self._refresh_epoch(start_epoch) or self._refresh_epoch(start_epoch) == start_epoch:
            return None
        found = mask_cache.open_self_cache(self.out / "masks", train_ds, self.cfg, str(saved["sha256"]), int(saved["epoch"]))
        if found is not None:
            self.log(f"mask cache: reusing self-attention masks of epoch {saved['epoch']} from {found.directory}")
        return found

    def _train_epoch(self, model, method, attention, dataset, optimizer, scaler, epoch) -> dict[str, float]:
        c = self.cfg
        generator = torch.Generator().manual_seed(c.seed * 7919 + epoch)
        loader = DataLoader(dataset, batch_size=c.batch_size, shuffle=True, drop_last=len(dataset) > c.batch_size,
                            num_workers=c.num_workers, generator=generator, pin_memory=self.device.type == "cuda")
        model.train()
        warmup = method.needs_attention and epoch < c.attention_burn_in
        totals: dict[str, float] = {}
        n_batches = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{c.epochs} [{c.method}]", leave=False, disable=not self.progress or None,
                   file=sys.stderr, dynamic_ncols=True)
        for batch in bar:
            x, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
            foreground = None
            if warmup:  # attention burn-in: no masks yet
                pass
            elif len(batch) == 4:  # (image, label, index, cached mask augmented with the image)
                foreground = mask_cache.batch_foreground(batch[3].to(self.device, non_blocking=True), c.threshold_policy,
                                                         c.omega, c.quantile)
            elif attention is not None:
                foreground = foreground_mask(attention(x, y), c.threshold_policy, c.omega, c.quantile)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss, stats = method.warmup_loss(model, x, y) if warmup else method.loss(model, x, y, foreground)
            stats["loss"] = loss.detach().float()
            # one host sync per batch: every statistic in one transfer, checked before the step
            names = list(stats)
            values = dict(zip(names, torch.stack([stats[k].float() for k in names]).tolist()))
            self._check_divergence(values, epoch, n_batches)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            for k, v in values.items():
                # logit sizes: the epoch's maximum; everything else: the epoch's mean
                totals[k] = max(totals.get(k, v), v) if k.startswith("max_logit") else totals.get(k, 0.0) + v
            n_batches += 1
            bar.set_postfix(loss=f"{values['loss']:.3f}")
        return {f"train_{k}": round(v if k.startswith("max_logit") else v / max(n_batches, 1), 5) for k, v in totals.items()}

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
        pgd10 = evaluate.correct_under_attack(model, x, y, "pgd10", eps=c.eps / 255, device=self.device, seed=c.seed)
        best_state = load_state(ckpt_dir / pointers["best"] / "state.pt")
        summary = {
            "method": c.method,
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
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _in_eval_mode(attention, model):
    """``attention`` called with ``model`` (the model being trained) in eval mode."""

    def fn(images, labels):
        with module_mode(model, training=False):
            return attention(images, labels)

    return fn
