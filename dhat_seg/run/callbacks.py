"""Trainer callbacks: periodic work with its own state (see :class:`dhat_seg.run.trainer.Callback`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dhat_seg.cache import provision
from dhat_seg.cache.store import remove_other_caches
from dhat_seg.run.trainer import Callback, RunParts, Trainer


class SelfAttentionMasks(Callback):
    """Masks from the model being trained (``attention_source: self``, PART-style), taken
    in eval mode at the start of the first epoch after the burn-in and rebuilt every
    ``mask_refresh_every`` epochs (0: never). Kept in RUN/masks/ (older refreshes are
    deleted); the checkpoint records which masks are in use, so a resumed run reuses
    them instead of recomputing them from later weights."""

    state_key = "masks"

    def __init__(self, cfg, out_dir: Path, *, device, log: Callable[[str], None], progress: bool = True):
        self.cfg, self.root, self.device, self.log, self.progress = cfg, Path(out_dir) / "masks", device, log, progress
        self.current = None

    def refresh_epoch(self, epoch: int) -> int:
        """The epoch whose starting weights give the masks of ``epoch``."""
        burn_in, every = self.cfg.attention_burn_in, self.cfg.mask_refresh_every
        return burn_in if every == 0 else burn_in + ((epoch - burn_in) // every) * every

    def on_fit_start(self, trainer: Trainer, parts: RunParts, start_epoch: int, state: dict | None) -> None:
        saved = (state or {}).get(self.state_key)
        if not isinstance(saved, dict) or start_epoch >= self.cfg.epochs:
            return
        refresh = self.refresh_epoch(start_epoch)
        if int(saved["epoch"]) != refresh or refresh == start_epoch:
            return  # rebuilt at the next epoch start
        found = provision.open_self_cache(self.root, parts.train, self.cfg, str(saved["sha256"]), int(saved["epoch"]))
        if found is not None:
            self.log(f"mask cache: reusing self-attention masks of epoch {saved['epoch']} from {found.directory}")
            self.current = parts.masks = found

    def on_epoch_start(self, trainer: Trainer, parts: RunParts, epoch: int) -> None:
        if epoch < self.cfg.attention_burn_in:
            return
        refresh = self.refresh_epoch(epoch)
        if self.current is not None and self.current.key["classifier"]["epoch"] == refresh:
            parts.masks = self.current
            return
        if refresh != epoch:
            # resumed without the masks of the last refresh: the nearest we can do
            self.log(f"mask cache: the self-attention masks of epoch {refresh} are missing; recomputing them from the "
                     f"weights of epoch {epoch} (this run now differs from an uninterrupted one)")
        # before the epoch's reseeding: the build forks its own RNG, the epoch's draws stay the same
        built = provision.self_mask_cache(self.cfg, parts.train, parts.model, refresh, self.root, device=self.device,
                                          log=self.log, progress=self.progress, stop=trainer.stop)
        remove_other_caches(self.root, built.directory)
        self.current = parts.masks = built

    def state_dict(self) -> dict | None:
        if self.current is None:
            return None
        return {"epoch": self.current.key["classifier"]["epoch"], "sha256": self.current.key["classifier"]["sha256"]}
