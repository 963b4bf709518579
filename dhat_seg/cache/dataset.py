"""Training data with cached masks: each sample's mask travels with its image through the same augmentation.
"""

from __future__ import annotations


from torch.utils.data import Dataset

from dhat_seg.errors import UserError
from dhat_seg.cache.key import REBUILD_HINT
from dhat_seg.cache.store import MaskCache

# ---------------------------------------------------------------------------------
# Training data with masks
# ---------------------------------------------------------------------------------


class MaskedDataset(Dataset):
    """``(image, label, index, mask)``: each sample with its cached mask, both through
    the dataset's joint transform in one call (:class:`~dhat_seg.data.JointAugment`:
    the same random crop and flip), so that the mask marks the object pixels of the
    image it travels with. The transform draws the same random numbers with or without
    a mask, so the images equal those of the plain dataset under the same seeds.

    Args:
        dataset: an :class:`~dhat_seg.data.IndexedDataset` (its ``transform`` is used;
            the dataset itself is not modified).
        masks: the cache of this dataset (same size and fingerprint).
    """

    def __init__(self, dataset, masks: MaskCache):
        if len(dataset) != len(masks):
            raise UserError(f"mask cache {str(masks.directory)!r} holds {len(masks)} masks but the dataset has "
                            f"{len(dataset)} samples; {REBUILD_HINT}")
        fp = masks.key.get("dataset", {}).get("fingerprint")
        if hasattr(dataset, "fingerprint") and fp != dataset.fingerprint():
            raise UserError(f"mask cache {str(masks.directory)!r} describes other data (fingerprint {fp}, dataset "
                            f"{dataset.fingerprint()}); {REBUILD_HINT}")
        if (masks.height, masks.width) != tuple(dataset.image_size):
            raise UserError(f"mask cache {str(masks.directory)!r} holds {masks.height}x{masks.width} masks but the images are "
                            f"{dataset.image_size[0]}x{dataset.image_size[1]}; {REBUILD_HINT}")
        self.dataset, self.masks = dataset, masks
        self.transform = getattr(dataset, "transform", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        index = int(index)
        image, mask = self.dataset.load_image(index), self.masks[index]
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, int(self.dataset.labels[index]), index, mask


