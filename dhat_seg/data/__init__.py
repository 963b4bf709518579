"""Datasets for dhat-seg: the built-in synthetic set, CIFAR-10/100 and image folders.

Every dataset yields ``(image, label, index)`` (see :class:`IndexedDataset`); build one
with :func:`build_dataset`.
"""

from dhat_seg.data.base import IndexedDataset, TensorImageDataset, carve_validation, channel_stats, derive_seed
from dhat_seg.data.datasets import DEFAULT_DATA_ROOT, SyntheticDataset
from dhat_seg.data.folder import FolderDataset
from dhat_seg.data.registry import DATASETS, DatasetInfo, build_dataset, list_datasets, split_args, split_for
from dhat_seg.data.synthetic import BACKGROUNDS, SHAPES, SyntheticArrays, generate_synthetic
from dhat_seg.data.transforms import JointAugment

__all__ = [
    "BACKGROUNDS",
    "DATASETS",
    "DEFAULT_DATA_ROOT",
    "DatasetInfo",
    "FolderDataset",
    "IndexedDataset",
    "JointAugment",
    "SHAPES",
    "SyntheticArrays",
    "SyntheticDataset",
    "TensorImageDataset",
    "build_dataset",
    "carve_validation",
    "channel_stats",
    "derive_seed",
    "generate_synthetic",
    "list_datasets",
    "split_args",
    "split_for",
]
