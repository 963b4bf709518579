"""The dataset protocol shared by every dhat-seg dataset, and split helpers.

Every dataset returns ``(image, label, index)`` from ``__getitem__``: ``index`` is the
sample's position in *this* dataset, so per-sample caches (attention masks, PART's
pixel weights) can be keyed by ``(dataset.fingerprint(), index)`` and stay matched to
their images whatever the loader's shuffling (the authors' PART code keyed masks by
batch position and mismatched them; REFERENCE.md section 2).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from dhat_seg.errors import UserError

#: A joint transform: (image 3 x H x W float, mask 1 x H x W bool or None) -> (image, mask).
JointTransform = Callable[[Tensor, "Tensor | None"], "tuple[Tensor, Tensor | None]"]

#: Length of fingerprints, in hex digits (64 bits).
FINGERPRINT_HEX = 16


def derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (stable across processes and
    platforms, unlike ``hash()``), so that e.g. train and test draw different samples."""
    digest = hashlib.sha256(json.dumps([int(seed), *map(str, keys)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def hash_tensor(h: "hashlib._Hash", tensor: Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes into a hashlib object."""
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(memoryview(t.numpy()).cast("B") if t.numel() else b"")


def validation_count(pool: int, val_size: int | float) -> int:
    """How many of ``pool`` training samples go to the validation split.

    ``val_size``: a float in [0, 1) is a fraction (rounded), an int is a count < pool.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise UserError(f"val_size {val_size!r} is invalid: expected a fraction in [0, 1) or a sample count")
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise UserError(f"val_size {val_size!r} is invalid: a fraction must be in [0, 1)")
        return int(round(val_size * pool))
    if not 0 <= val_size < pool:
        raise UserError(f"val_size {val_size!r} is invalid: expected a count from 0 to {pool - 1} (training samples: {pool})")
    return val_size


def carve_validation(pool: int, n_val: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split ``range(pool)`` into disjoint sorted (train, val) index tensors, val of size
    ``n_val``, drawn deterministically from ``seed``. Their union is ``range(pool)``."""
    g = torch.Generator().manual_seed(derive_seed(seed, "validation-split"))
    perm = torch.randperm(pool, generator=g)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def pool_split(split: str, pool: int, val_size: int | float, seed: int) -> Tensor:
    """Indices (into a training pool of size ``pool``) of the train or val split."""
    n_val = validation_count(pool, val_size)
    if split == "val" and n_val == 0:
        raise UserError(f"the validation split is empty with val_size={val_size!r}: use a positive fraction or count")
    train_idx, val_idx = carve_validation(pool, n_val, seed)
    return train_idx if split == "train" else val_idx


def subset_indices(total: int, size: int | None, seed: int, key: str) -> Tensor | None:
    """Sorted indices of a deterministic random subset of ``size`` of ``total`` samples,
    or None for all of them."""
    if size is None or size == total:
        return None
    if size > total:
        raise UserError(f"size {size} is too large: this split has {total} samples")
    g = torch.Generator().manual_seed(derive_seed(seed, "subset", key))
    return torch.randperm(total, generator=g)[:size].sort().values


class IndexedDataset(Dataset):
    """Base class: a classification dataset whose items are ``(image, label, index)``.

    Attributes:
        name: registry name ("synthetic", "cifar10", ...).
        split: "train", "val", "test", ...
        num_classes: number of classes.
        image_size: (H, W) of the returned images.
        class_names: one name per class.
        transform: None, or a joint transform ``(image, mask) -> (image, mask)`` (e.g.
            :class:`~dhat_seg.data.transforms.JointAugment`), applied in ``__getitem__``
            to the image only (mask None). It does not enter the fingerprint: caches
            keyed by the fingerprint describe the un-augmented images.
        source_indices: int64 N, each sample's position in the split it was taken from
            (the full training set for train/val, the full test set for test).

    Subclasses implement :meth:`load_image` and :meth:`_fingerprint_payload`.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        labels: Tensor,
        num_classes: int,
        image_size: tuple[int, int],
        class_names: Sequence[str],
        source_indices: Tensor | None = None,
        transform: JointTransform | None = None,
    ):
        self.name = name
        self.split = split
        self._labels = labels.to(torch.int64)
        self.num_classes = int(num_classes)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.class_names = list(class_names)
        self.source_indices = (
            torch.arange(len(labels), dtype=torch.int64) if source_indices is None else source_indices.to(torch.int64)
        )
        self.transform = transform
        self._fingerprint: str | None = None

    # -- protocol --------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {self.name}/{self.split} of {n} samples")
        image = self.load_image(index)
        if self.transform is not None:
            image, _ = self.transform(image, None)
        return image, int(self._labels[index]), index

    @property
    def labels(self) -> Tensor:
        """int64 N: all labels, without loading images."""
        return self._labels

    @property
    def gt_masks(self) -> Tensor | None:
        """bool N x H x W ground-truth foreground masks, or None when unknown."""
        return None

    def fingerprint(self) -> str:
        """Short hex content hash (stable across processes): keys per-sample caches."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps(self._fingerprint_params(), sort_keys=True).encode())
            self._fingerprint_payload(h)
            self._fingerprint = h.hexdigest()[:FINGERPRINT_HEX]
        return self._fingerprint

    # -- for subclasses --------------------------------------------------------------

    def load_image(self, index: int) -> Tensor:
        """Image ``index`` as float32 3 x H x W in [0, 1], before any transform."""
        raise NotImplementedError

    def _fingerprint_params(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split, "image_size": self.image_size, "num_classes": self.num_classes}

    def _fingerprint_payload(self, h: "hashlib._Hash") -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"num_classes={self.num_classes}, image_size={self.image_size})"
        )


class TensorImageDataset(IndexedDataset):
    """Images held in memory as uint8 N x 3 x h x w; resized to ``image_size`` on access
    when that differs from (h, w) (bilinear, antialiased).

    Args:
        images: uint8 N x 3 x h x w.
        labels: int64 N.
        params: generation/source parameters, hashed into the fingerprint with the
            bytes of images and labels.
        gt_masks: optional bool N x h x w.
        other keyword arguments: see :class:`IndexedDataset`.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        params: dict[str, Any] | None = None,
        gt_masks: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 N x 3 x H x W, got {images.dtype} {tuple(images.shape)}")
        native = (int(images.shape[2]), int(images.shape[3]))
        super().__init__(labels=labels, image_size=image_size or native, **kwargs)
        self.images = images
        self._gt_masks = gt_masks
        self._params = dict(params or {})
        if gt_masks is not None and self.image_size != native:
            # masks are only ever given at the generated size (synthetic)
            raise ValueError("gt_masks require image_size equal to the stored image size")

    @property
    def gt_masks(self) -> Tensor | None:
        return self._gt_masks

    def load_image(self, index: int) -> Tensor:
        image = self.images[index].to(torch.float32).div_(255.0)
        if tuple(image.shape[-2:]) != self.image_size:
            image = F.interpolate(image[None], size=self.image_size, mode="bilinear", antialias=True, align_corners=False)[0]
            image = image.clamp_(0.0, 1.0)
        return image

    def _fingerprint_params(self) -> dict[str, Any]:
        return {**super()._fingerprint_params(), **self._params}

    def _fingerprint_payload(self, h: "hashlib._Hash") -> None:
        hash_tensor(h, self.images)
        hash_tensor(h, self._labels)


def images_from_hwc(array: np.ndarray) -> Tensor:
    """uint8 N x H x W x 3 numpy array -> contiguous uint8 N x 3 x H x W tensor."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def channel_stats(dataset, n: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to ``n`` images (the model normalises inside)."""
    x = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
