"""Concrete datasets: synthetic and digits (built in), CIFAR-10/100 (torchvision); image
folders are in :mod:`dhat_seg.data.folder`.

Each ``load_*`` function returns an :class:`~dhat_seg.data.base.IndexedDataset` for one
split. Train and val come from the same training pool: val is carved out of it
deterministically from ``seed`` and the two are disjoint with union = the pool. The
test set is never used for validation.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dhat_seg.data.base import (
    IndexedDataset,
    JointTransform,
    TensorImageDataset,
    derive_seed,
    images_from_hwc,
    pool_split,
    subset_indices,
    validation_count,
)
from dhat_seg.data.digits import DIGIT_NAMES, DIGITS_VERSION, generate_digits, source_split
from dhat_seg.data.synthetic import (
    BACKGROUNDS,
    DEFAULT_SALIENCE,
    GENERATOR_VERSION,
    SHAPES,
    SyntheticArrays,
    check_salience,
    generate_synthetic,
    only_foreground,
    remove_foreground,
)
from dhat_seg.errors import UserError

#: Where CIFAR is looked for (and downloaded to) when no root is given.
DEFAULT_DATA_ROOT = "~/.cache/dhat-seg/data"

SYNTHETIC_TRAIN_SIZE = 5000
SYNTHETIC_TEST_SIZE = 1000

# ---------------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------------


#: Test splits of the generated datasets: (background mode, what is done to the images).
#: ``test`` and ``test-only-fg`` share one draw, ``test-mixed-rand`` and ``test-no-fg``
#: the same objects with uniformly random backgrounds.
GENERATED_TEST_SPLITS = {
    "test": ("correlated", None),
    "test-mixed-rand": ("random", None),
    "test-only-fg": ("correlated", "only_fg"),
    "test-no-fg": ("random", "no_fg"),
}


@functools.lru_cache(maxsize=2)
def _generate_cached(name: str, n: int, seed: int, image_size: int, rho: float, mode: str, salience: float,
                     source_seed: int, source_pool: str) -> SyntheticArrays:
    # train and val are carved from the same pool, usually built one after the other
    if name == "digits":
        train_sources, test_sources = source_split(source_seed)
        sources = test_sources if source_pool == "test" else train_sources
        return generate_digits(n, seed=seed, sources=sources, image_size=image_size, rho=rho, background=mode,
                               salience=salience)
    return generate_synthetic(n, seed=seed, image_size=image_size, rho=rho, background=mode, salience=salience)


class SyntheticDataset(TensorImageDataset):
    """A generated dataset: shapes (``synthetic``) or handwritten digits (``digits``) on
    textures (:mod:`dhat_seg.data.synthetic`, :mod:`dhat_seg.data.digits`).

    Extra attributes: ``backgrounds`` (int64 N, texture index per sample: the class the
    background stands for), ``background_names``, ``sources`` (digits: the source digit
    of each sample, else None); ``gt_masks`` holds the exact object masks.
    """

    def __init__(self, *args: Any, backgrounds: Tensor, sources: Tensor | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.backgrounds = backgrounds
        self.sources = sources
        self.background_names = list(BACKGROUNDS[: self.num_classes])


def load_synthetic(
    split: str,
    *,
    seed: int,
    image_size: int,
    size: int | None,
    rho: float,
    val_size: int | float,
    transform: JointTransform | None,
    salience: float = DEFAULT_SALIENCE,
    name: str = "synthetic",
) -> SyntheticDataset:
    """train/val: a pool of ``size`` (default 5000) correlated samples, val carved out;
    test: ``size`` (default 1000) samples correlated like training (the ``same``
    variant); test-mixed-rand: the same objects with uniformly random backgrounds;
    test-only-fg: ``test``'s objects on black; test-no-fg: ``test-mixed-rand`` with the
    objects blacked out (score it against ``backgrounds``). ``name``: "synthetic" or
    "digits" (its test splits draw from source digits that training never sees)."""
    is_test = split.startswith("test")
    n = size if size is not None else (SYNTHETIC_TEST_SIZE if is_test else SYNTHETIC_TRAIN_SIZE)
    mode, edit = GENERATED_TEST_SPLITS[split] if is_test else ("correlated", None)
    # the test variants share a seed: same objects, only the background draw differs
    gen_seed = derive_seed(seed, "synthetic", "test" if is_test else "train")
    if not is_test:
        validation_count(n, val_size)  # reject a bad val_size before generating
    check_salience(salience)
    arrays = _generate_cached(name, n, gen_seed, image_size, float(rho), mode, float(salience), seed,
                              "test" if is_test else "train")
    params: dict[str, Any] = {
        "generator": GENERATOR_VERSION if name == "synthetic" else f"{GENERATOR_VERSION}+digits-{DIGITS_VERSION}",
        "seed": int(seed),
        "rho": float(rho),
        "salience": float(salience),
        "background": mode,
        "pool": n,
    }
    if edit:
        params["edit"] = edit
    if is_test:
        idx = None
        take = slice(None)
    else:
        idx = take = pool_split(split, n, val_size, seed)
        params["val_size"] = val_size
    if edit == "only_fg":
        images = only_foreground(arrays)
    elif edit == "no_fg":
        images = remove_foreground(arrays)
    else:
        images = arrays.images
    # indexing copies, so datasets never share storage with the generation cache
    return SyntheticDataset(
        images[take].clone(),
        arrays.labels[take].clone(),
        backgrounds=arrays.backgrounds[take].clone(),
        sources=None if arrays.sources is None else arrays.sources[take].clone(),
        gt_masks=arrays.masks[take].clone(),
        params=params,
        name=name,
        split=split,
        num_classes=len(SHAPES),
        class_names=SHAPES if name == "synthetic" else DIGIT_NAMES,
        source_indices=idx,
        transform=transform,
    )


# ---------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision)
# ---------------------------------------------------------------------------------


def resolve_root(root: str | os.PathLike | None) -> Path:
    return Path(root if root is not None else DEFAULT_DATA_ROOT).expanduser()


def load_cifar(
    name: str,
    split: str,
    *,
    root: str | os.PathLike | None,
    download: bool,
    seed: int,
    image_size: int,
    size: int | None,
    val_size: int | float,
    transform: JointTransform | None,
) -> TensorImageDataset:
    """CIFAR-10/100 from ``root`` (downloaded there only when ``download``)."""
    from torchvision import datasets as tvd  # heavy-ish import, only when needed

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    pretty = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    base = resolve_root(root)
    # accept the extracted folder itself (".../cifar-10-batches-py") as the root
    if base.name == cls.base_folder:
        base = base.parent
    try:
        ds = cls(root=str(base), train=not split.startswith("test"), download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted ..."
        raise UserError(
            f"{pretty} not found under {base}: pass --download to fetch it, or --data-root PATH "
            f"pointing at a folder that contains {cls.base_folder}"
        ) from exc
    except OSError as exc:  # network / disk problems while downloading
        raise UserError(f"downloading {pretty} into {base} failed: {exc}") from exc
    images = images_from_hwc(ds.data)
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    sub = subset_indices(len(labels), size, seed, f"{name}-{'test' if split == 'test' else 'train'}")
    if sub is not None:
        images, labels = images[sub], labels[sub]
    source = sub
    params: dict[str, Any] = {"size": size, "subset_seed": int(seed) if sub is not None else None}
    if split != "test":
        idx = pool_split(split, len(labels), val_size, seed)
        images, labels = images[idx], labels[idx]
        source = idx if sub is None else sub[idx]
        params.update(seed=int(seed), val_size=val_size)
    return TensorImageDataset(
        images,
        labels,
        params=params,
        image_size=(image_size, image_size),
        name=name,
        split=split,
        num_classes=len(ds.classes),
        class_names=ds.classes,
        source_indices=source,
        transform=transform,
    )
