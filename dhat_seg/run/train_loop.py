"""Pieces of the training hot loop that keep the device busy: statistics read in one
transfer every few batches, and a DataLoader built once per fit.

- :class:`DeviceStats` keeps each batch's loss statistics on the device and reads them
  to the host every ``every`` batches (one transfer for all of them). On CPU a read costs
  nothing and ``every`` is 1, so a non-finite loss is caught before its step; on CUDA the
  default of 50 lets the host queue work ahead, and a divergence is reported at the next
  read (naming its batch) with the steps since then taken, the last epoch's checkpoint
  intact.
- :class:`EpochLoader` builds the DataLoader once (worker processes persist across
  epochs) and reseeds it per epoch. With ``num_workers == 0`` the order and the
  augmentation are exactly those of a fresh ``DataLoader(shuffle=True,
  generator=Generator().manual_seed(s))`` per epoch (the figures of 0.1.0). With workers,
  each sample's augmentation is seeded by (seed, epoch, sample index), so a run does not
  depend on the number of workers and a resumed epoch is redone exactly. With
  ``data_on_device`` it hands out :class:`dhat_seg.run.device_data.DeviceResident`'s batches
  instead (in-memory data on the device, cropped and flipped there a batch at a time).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from dhat_seg.run.stopping import ignore_stop_signals

#: Batches between statistics reads on CUDA when ``sync_every`` is 0 (automatic).
CUDA_SYNC_EVERY = 50


def sync_interval(sync_every: int, device: torch.device) -> int:
    """Batches between host reads of the statistics: ``sync_every``, or when 0, 1 on
    devices where a read costs nothing (CPU) and :data:`CUDA_SYNC_EVERY` elsewhere."""
    if sync_every:
        return sync_every
    return 1 if device.type == "cpu" else CUDA_SYNC_EVERY


def batches_per_epoch(num_samples: int, batch_size: int) -> int:
    """The batches :class:`EpochLoader` yields per epoch: a last incomplete batch is dropped
    unless the whole split fits in one batch."""
    return num_samples // batch_size if num_samples > batch_size else 1


class DeviceStats:
    """Per-batch statistics (0-d tensors) kept on the device, read every ``every`` batches.

    ``check(values, batch)`` sees each batch's values (``batch``: its 0-based index in
    the epoch) in order when they are read; it may raise. The epoch's figures: the mean
    of every statistic over the batches, except ``max_logit*`` (the epoch's maximum)."""

    def __init__(self, every: int, check: Callable[[dict[str, float], int], None],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.every = max(1, every)
        self.check = check
        self.reduce = reduce  # e.g. the mean over the ranks of a torchrun job (same statistics every batch)
        self.pending: list[tuple[tuple[str, ...], torch.Tensor]] = []
        self.totals: dict[str, float] = {}
        self.read = 0  # batches read so far
        self.last: dict[str, float] | None = None  # the last read batch's values

    def add(self, stats: dict[str, torch.Tensor]) -> bool:
        """Queue one batch's statistics; True when this call read them to the host."""
        names = tuple(stats)
        self.pending.append((names, torch.stack([stats[k].detach().float().reshape(()) for k in names])))
        if len(self.pending) >= self.every:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Read every queued batch in one transfer, check and accumulate them in order."""
        if not self.pending:
            return
        flat = torch.cat([v for _, v in self.pending])
        flat = (self.reduce(flat) if self.reduce is not None else flat).tolist()
        pending, self.pending, pos = self.pending, [], 0
        for names, _ in pending:
            values = dict(zip(names, flat[pos : pos + len(names)]))
            pos += len(names)
            self.check(values, self.read)
            for k, v in values.items():
                self.totals[k] = max(self.totals.get(k, v), v) if k.startswith("max_logit") else self.totals.get(k, 0.0) + v
            self.read += 1
            self.last = values

    def summary(self) -> dict[str, float]:
        """``train_<name>``: the epoch's means (maxima for ``max_logit*``), rounded to 5 digits."""
        self.flush()
        n = max(self.read, 1)
        return {f"train_{k}": round(v if k.startswith("max_logit") else v / n, 5) for k, v in self.totals.items()}


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch (workers only)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


class _SeededSampler(Sampler):
    """Yields ``(index, augmentation seed)`` in a permutation fixed by (seed, epoch); with
    ``world`` > 1, this rank's share: elements ``rank, rank + world, ...`` of the permutation
    (cut to a multiple of ``world``), so that the ranks' b-th batches of ``batch / world``
    samples together are the b-th global batch of one process."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.epoch, self.rank, self.world = n, seed, 0, rank, world

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        for i in perm[: len(self) * self.world][self.rank :: self.world].tolist():
            yield i, sample_seed(self.seed, self.epoch, i)


class _SeededItems(Dataset):
    """``dataset[index]`` drawn with torch's global generator seeded by the sample's seed
    (in a worker process, whose generator nothing else uses)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        if get_worker_info() is not None:
            torch.manual_seed(seed)
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):  # in the training process: its generator untouched
            torch.manual_seed(seed)
            return self.dataset[index]


class EpochLoader:
    """The training DataLoader of a fit, built once per dataset and reseeded per epoch. With
    ``world`` > 1 (torchrun), this rank's ``batch_size / world`` share of every global batch,
    each sample augmented under its own seed as with workers."""

    def __init__(self, *, batch_size: int, num_workers: int, seed: int, pin_memory: bool, rank: int = 0, world: int = 1,
                 on_device: bool | None = False, device: torch.device | None = None):
        self.batch_size, self.num_workers, self.seed, self.pin_memory = batch_size // world, num_workers, seed, pin_memory
        self.rank, self.world = rank, world
        # data_on_device: True = required, None = where the data allow it on CUDA, False = the DataLoader
        self.on_device, self.device = on_device, device or torch.device("cpu")
        self.resident = False  # whether the current dataset lives on the device
        self._dataset: Any = None
        self._loader: DataLoader | None = None
        self._generator = torch.Generator()
        self._sampler: _SeededSampler | None = None

    def epoch(self, dataset, epoch: int) -> Iterable:
        """The loader over ``dataset`` for 0-based ``epoch`` (rebuilt when the dataset changed)."""
        if dataset is not self._dataset:
            self._dataset, self._loader = dataset, self._build(dataset)
        if self.resident:
            return self._loader.epoch(epoch)
        if self._sampler is not None:
            self._sampler.epoch = epoch
        else:  # a fresh single-process iterator draws its base seed, then the permutation, from this
            self._generator.manual_seed(self.seed * 7919 + epoch)
        return self._loader

    def _build(self, dataset) -> Any:
        from dhat_seg.run.device_data import DeviceResident, why_not_resident

        self.resident = bool(self.on_device) or (self.on_device is None and self.device.type == "cuda"
                                                  and why_not_resident(dataset) is None)
        if self.resident:  # images, labels and masks on the device, augmented a batch at a time there
            return DeviceResident(dataset, self.device, batch_size=self.batch_size, seed=self.seed, rank=self.rank,
                                  world=self.world)
        if not self.num_workers and self.world == 1:
            self._sampler = None
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, drop_last=len(dataset) > self.batch_size,
                              generator=self._generator, pin_memory=self.pin_memory)
        self._sampler = _SeededSampler(len(dataset), self.seed, self.rank, self.world)
        drop_last = len(self._sampler) > self.batch_size
        return DataLoader(_SeededItems(dataset), batch_size=self.batch_size, sampler=self._sampler, drop_last=drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=self.pin_memory, worker_init_fn=ignore_stop_signals if self.num_workers else None)
