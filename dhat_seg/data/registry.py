"""Dataset registry: names users pass to ``--dataset`` and :func:`build_dataset`."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dhat_seg.data.base import IndexedDataset
from dhat_seg.data.datasets import GENERATED_TEST_SPLITS, load_cifar, load_synthetic
from dhat_seg.data.folder import FOLDER_SPLITS, folder_splits, load_folder
from dhat_seg.data.synthetic import DEFAULT_SALIENCE
from dhat_seg.data.transforms import JointAugment
from dhat_seg.errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dhat-seg datasets`` lists about a dataset.

    Attributes:
        name: the registry name.
        description: one line.
        num_classes: number of classes, or None when it depends on the data (folder).
        needs_download: True when the data must be fetched (``--download``) or supplied
            (``--data-root``) before use.
        splits: the split names :func:`build_dataset` accepts.
        built_in: generated here (synthetic, digits): exact masks, the
            Backgrounds-Challenge test splits, the quick recipe as the settings' base.
        flip: horizontal flips keep the class (not for digits), used by augmentation.
    """

    name: str
    description: str
    num_classes: int | None
    needs_download: bool
    splits: tuple[str, ...] = ("train", "val", "test")
    built_in: bool = False
    flip: bool = True


#: Backgrounds-Challenge accuracies (Xiao et al., ICLR 2021) of the built-in data: key in
#: ``eval.json``'s ``background_challenge`` -> test split. ``no_fg_bg_class`` is scored
#: against the background's class, the others against the object's.
BACKGROUND_CHALLENGE_SPLITS = {
    "same": "test",
    "mixed_rand": "test-mixed-rand",
    "only_fg": "test-only-fg",
    "no_fg_bg_class": "test-no-fg",
}


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "synthetic",
            "built-in shapes on textures, 10 classes, exact foreground masks; the background "
            "matches the class with probability rho (spurious cue); no download",
            10,
            False,
            ("train", "val", *GENERATED_TEST_SPLITS),
            built_in=True,
        ),
        DatasetInfo(
            "digits",
            "built-in real handwritten digits (scikit-learn's 1797, upsampled) on the same textures, "
            "10 classes, masks from the ink; train and test from disjoint source digits; no download",
            10,
            False,
            ("train", "val", *GENERATED_TEST_SPLITS),
            built_in=True,
            flip=False,
        ),
        DatasetInfo("cifar10", "CIFAR-10 (torchvision), 32x32, 10 classes", 10, True),
        DatasetInfo("cifar100", "CIFAR-100 (torchvision), 32x32, 100 classes", 100, True),
        DatasetInfo(
            "folder",
            "your images: --data-root with train/ and test/ (optional val/, Backgrounds-Challenge "
            "test splits, masks/) subfolders of class folders, or a single folder of class folders",
            None,
            False,
            FOLDER_SPLITS,
        ),
    )
}

#: Alternative split names.
SPLIT_ALIASES = {"test-same": "test", "valid": "val", "validation": "val"}


def generator_version(name: str) -> str | None:
    """The version of the generator of built-in dataset ``name`` (None for other data):
    part of the config digest, so finished runs on other images are never reused."""
    from dhat_seg.data.digits import DIGITS_VERSION
    from dhat_seg.data.synthetic import GENERATOR_VERSION

    return {"synthetic": GENERATOR_VERSION, "digits": f"{GENERATOR_VERSION}+digits-{DIGITS_VERSION}"}.get(name)


def available_splits(name: str, root: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The splits dataset ``name`` has: all of :attr:`DatasetInfo.splits`, except for an
    image folder, whose test splits are the subfolders ``root`` holds."""
    return folder_splits(root) if name == "folder" else DATASETS[name].splits


def list_datasets() -> list[DatasetInfo]:
    """All registered datasets, in registry order."""
    return list(DATASETS.values())


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    image_size: int = 32,
    size: int | None = None,
    rho: float = 0.9,
    val_size: int | float = 0.1,
    augment: bool = False,
    salience: float = DEFAULT_SALIENCE,
) -> IndexedDataset:
    """Build one split of a registered dataset.

    Args:
        name: a key of :data:`DATASETS`.
        split: "train", "val", "test" (and for the built-in data, or a folder holding them,
            "test-mixed-rand", "test-only-fg", "test-no-fg"; "test" is the ``same`` variant,
            correlated like training).
        root: data folder (CIFAR: default ``~/.cache/dhat-seg/data``; folder: required).
        download: CIFAR only: fetch the data into ``root`` if it is missing.
        seed: seeds generation (synthetic), the validation carve-out and ``size`` subsets.
        image_size: side of the returned square images (CIFAR is resized on access
            when it is not 32).
        size: number of samples: for train and val, the size of the *training pool*
            that val is carved from (so train + val = size); for test, of the test set.
            Synthetic defaults: pool 5000, test 1000; others: all samples (a
            deterministic random subset when given).
        rho: built-in data only: P(background == class) in train and test ("same").
        salience: built-in data only: foreground salience of the generator.
        val_size: fraction in [0, 1) or count of the training pool held out for val.
        augment: apply :class:`JointAugment` (random crop pad 4 + horizontal flip) to
            train images; ignored for the other splits.
    """
    info = DATASETS.get(name)
    if info is None:
        raise UserError(f"dataset {name!r} is unknown; known datasets: {', '.join(DATASETS)}")
    split = SPLIT_ALIASES.get(split, split)
    if split not in info.splits:
        raise UserError(f"split {split!r} is unknown for dataset {name!r}; expected one of {', '.join(info.splits)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise UserError(f"size {size!r} is invalid: expected a positive integer (number of samples)")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 1024:
        raise UserError(f"image size {image_size!r} is invalid: expected an integer from 8 to 1024")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= float(rho) <= 1.0:
        raise UserError(f"rho {rho!r} is invalid: expected a probability in [0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed {seed!r} is invalid: expected an integer")
    transform = JointAugment(padding=4, flip=info.flip) if augment and split == "train" else None
    if info.built_in:
        return load_synthetic(
            split, seed=seed, image_size=image_size, size=size, rho=float(rho), val_size=val_size, transform=transform,
            salience=salience, name=name,
        )
    if name in ("cifar10", "cifar100"):
        return load_cifar(
            name,
            split,
            root=root,
            download=download,
            seed=seed,
            image_size=image_size,
            size=size,
            val_size=val_size,
            transform=transform,
        )
    return load_folder(split, root=root, seed=seed, image_size=image_size, size=size, val_size=val_size, transform=transform)


def split_for(cfg, split: str, *, augment: bool = False) -> IndexedDataset:
    """Split ``split`` of a run configuration's data, as training builds it: the one
    place that maps config keys to :func:`build_dataset` arguments. ``size`` is
    ``test_size`` for test splits, else ``train_size`` (the pool val is carved from);
    the data is seeded by ``cfg.dataset_seed`` (``data_seed``, else ``seed``).
    ``augment`` applies to the train split only."""
    return build_dataset(**split_args(cfg, split, augment=augment))


def split_args(cfg, split: str, *, augment: bool = False) -> dict:
    """The :func:`build_dataset` keyword arguments of :func:`split_for` (JSON-able; mask
    caches record them so ``masks show`` can rebuild the dataset)."""
    size = cfg.test_size if split.startswith("test") else cfg.train_size
    return dict(name=cfg.data, split=split, root=cfg.data_root, download=cfg.download, seed=cfg.dataset_seed,
                image_size=cfg.image_size, size=size, rho=cfg.rho, val_size=cfg.val_size,
                augment=bool(augment and split == "train"), salience=cfg.salience)
