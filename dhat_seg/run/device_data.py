"""The training set held on the device, augmented a whole batch at a time (``data_on_device``).

For in-memory data (the built-in dataset, CIFAR: :class:`~dhat_seg.data.base.TensorImageDataset`
at its stored size) the uint8 images, the labels and the cached masks are copied to the device
once per fit (CIFAR-10's 50k images: 150 MB, their soft masks 50 MB). Each batch is gathered
there and cropped and flipped by :func:`crop_flip` in one indexing operation, image and mask
with the same offsets: no worker processes, no host-to-device copy per batch and no per-sample
Python on the host. ``data_on_device: null`` (the default) turns it on for CUDA when the data
allow it; ``true`` asks for it on any device (an error names why the data cannot), ``false``
keeps the DataLoader.

Randomness. The epoch's order is the permutation the worker DataLoader uses (seeded by
(seed, epoch), cut into this rank's share under torchrun); each sample's crop offsets and flip
are drawn for the whole epoch from a CPU generator seeded by (seed, epoch) and indexed by the
sample. So a run repeats, resumes exactly, and does not depend on the device or the number of
ranks; its draws are not torchvision's, so it is not bit-identical to a DataLoader run (the
distribution is the same: :func:`crop_flip` equals torchvision's crop and flip for given
parameters, tested).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from dhat_seg.errors import UserError


def crop_flip(batch: Tensor, offsets: Tensor, flips: Tensor, padding: int, padding_mode: str = "constant") -> Tensor:
    """Random crop (padding ``padding``) + horizontal flip of every sample of a batch, with given
    parameters: ``batch`` B x C x H x W (float, uint8 or bool), ``offsets`` B x 2 (top, left in
    the padded image, each in [0, 2 * padding]), ``flips`` B bool. Equal, sample by sample, to
    torchvision's ``RandomCrop(padding=padding, padding_mode=..., fill=0)`` then
    ``RandomHorizontalFlip`` with those parameters; the output has the input's dtype."""
    b, _, h, w = batch.shape
    dtype = batch.dtype
    work = batch
    if padding:
        if padding_mode == "reflect":  # reflect padding is defined for floating point only; uint8/bool are exact in float32
            work = F.pad(batch.float() if not batch.is_floating_point() else batch, (padding,) * 4, mode="reflect")
        else:
            work = F.pad(batch.to(torch.uint8) if dtype == torch.bool else batch, (padding,) * 4)
    device, (hp, wp) = batch.device, work.shape[-2:]
    offsets, flips = offsets.to(device), flips.to(device)
    rows = offsets[:, :1] + torch.arange(h, device=device)  # B x H
    cols = offsets[:, 1:] + torch.arange(w, device=device)  # B x W
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    # one gather over each padded image's flattened pixels (some 40x faster than advanced indexing on CPU)
    at = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, work.shape[1], h * w)
    return work.reshape(b, work.shape[1], hp * wp).gather(2, at).view(b, -1, h, w).to(dtype)


def draw_augmentation(n: int, padding: int, flip: bool, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-sample crop offsets (n x 2, in [0, 2 * padding]) and flips (n, bool, probability 0.5)."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return offsets, flips


def epoch_permutation(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> Tensor:
    """This rank's samples of the epoch, in order: the worker DataLoader's permutation
    (:class:`dhat_seg.run.train_loop._SeededSampler`), elements ``rank, rank + world, ...``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[: n // world * world][rank::world]


def why_not_resident(dataset) -> str | None:
    """Why ``dataset`` (an IndexedDataset, or a MaskedDataset around one) cannot live on the
    device, or None when it can."""
    from dhat_seg.data.base import TensorImageDataset
    from dhat_seg.data.transforms import JointAugment

    inner = getattr(dataset, "dataset", dataset) if hasattr(dataset, "masks") else dataset
    if not isinstance(inner, TensorImageDataset):
        return f"its images are not held in memory as one tensor ({type(inner).__name__}: read from files, or another kind)"
    if tuple(inner.images.shape[-2:]) != tuple(inner.image_size):
        return (f"its images are resized on access ({tuple(inner.images.shape[-2:])} -> {tuple(inner.image_size)}); "
                "use the stored size")
    transform = getattr(inner, "transform", None)
    if transform is not None and not isinstance(transform, JointAugment):
        return f"its augmentation is {type(transform).__name__}, not the built-in crop and flip"
    return None


class DeviceResident:
    """A training set on ``device``, yielding ``(image, label, index[, mask])`` batches like the
    DataLoader's (``index`` on the CPU, the rest on the device)."""

    def __init__(self, dataset, device: torch.device, *, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        reason = why_not_resident(dataset)
        if reason is not None:
            raise UserError(f"data_on_device=true cannot hold this training set on the device: {reason}; expected "
                            "in-memory data (synthetic, cifar10, cifar100) at its stored size, or data_on_device=false")
        masks = getattr(dataset, "masks", None)
        inner = dataset.dataset if masks is not None else dataset
        self.images = inner.images.to(device)
        self.labels = inner.labels.to(device)
        self.masks = None
        if masks is not None:  # every chunk of the cache, in index order
            self.masks = torch.cat([chunk for _, chunk in masks.iter_chunks()]).to(device)
        transform = inner.transform
        self.padding = transform.padding if transform is not None else 0
        self.flip = bool(transform.flip) if transform is not None else False
        self.padding_mode = transform.padding_mode if transform is not None else "constant"
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)

    def epoch(self, epoch: int) -> "_EpochBatches":
        return _EpochBatches(self, epoch)

    def batch(self, index: Tensor, offsets: Tensor, flips: Tensor) -> tuple[Tensor, ...]:
        """The augmented batch of samples ``index`` (CPU int64)."""
        at = index.to(self.device, non_blocking=True)
        images = self.images[at]
        masks = self.masks[at] if self.masks is not None else None
        if self.padding or self.flip:
            images = crop_flip(images, offsets, flips, self.padding, self.padding_mode)
            if masks is not None:
                masks = crop_flip(masks, offsets, flips, self.padding, self.padding_mode)
        x = images.float().div_(255.0)
        return (x, self.labels[at], index) if masks is None else (x, self.labels[at], index, masks)


class _EpochBatches:
    """One epoch's batches (a last incomplete batch dropped when there is more than one)."""

    def __init__(self, data: DeviceResident, epoch: int):
        self.data, self.epoch = data, epoch
        self.order = epoch_permutation(len(data), data.seed, epoch, data.rank, data.world)
        n, size = len(self.order), data.batch_size
        self.batches = n // size if n > size else 1

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        d = self.data
        generator = torch.Generator().manual_seed((d.seed * 1_000_003 + self.epoch) * 31 + 17)
        offsets, flips = draw_augmentation(len(d), d.padding, d.flip, generator)  # by sample index
        for b in range(self.batches):
            index = self.order[b * d.batch_size:(b + 1) * d.batch_size]
            yield d.batch(index, offsets[index], flips[index])
