"""Joint image + mask augmentation (the standard CIFAR training augmentation).

DHAT trains with random crop 32 (pad 4) + horizontal flip (REFERENCE.md section 1). When
a foreground mask travels with an image, it must undergo the *same* crop and flip, or the
background extraction x_B = x * (1 - M) would black out the wrong pixels. torchvision's
transforms.v2 draws the random parameters once per call and applies them to every
``tv_tensors`` argument, so wrapping the image as ``tv_tensors.Image`` and the mask as
``tv_tensors.Mask`` shares the geometry by construction.
"""

from __future__ import annotations

from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from dhat_seg.errors import UserError

PADDING_MODES = ("constant", "reflect")


class JointAugment:
    """Random crop (zero or reflect padding) + random horizontal flip of an image and its mask.

    Args:
        padding: pixels added on each side before cropping back to the input size.
        flip: also flip horizontally with probability 0.5.
        padding_mode: "constant" (zeros for the image, False for the mask: torchvision's
            ``RandomCrop(32, padding=4)``, the usual CIFAR recipe) or "reflect". With
            "reflect" the mask is reflected too, so that it still marks the object pixels
            that reflection copies into the border.

    Call: ``aug(image, mask) -> (image, mask)`` with image float 3 x H x W and mask bool
    1 x H x W, uint8 1 x H x W (a quantised soft map from the mask cache; padding fills
    0, i.e. background) or None (returned as None). Outputs are plain tensors of the
    input sizes and dtypes. The random draws are the same with or without a mask, so a
    mask never changes how its image is augmented.
    Randomness comes from torch's global generator (seeded per DataLoader worker).
    """

    def __init__(self, padding: int = 4, flip: bool = True, padding_mode: str = "constant"):
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise UserError(f"augmentation padding {padding!r} is invalid: expected an integer >= 0")
        if padding_mode not in PADDING_MODES:
            raise UserError(f"padding mode {padding_mode!r} is unknown; expected one of {', '.join(PADDING_MODES)}")
        self.padding = padding
        self.flip = flip
        self.padding_mode = padding_mode
        self._pipelines: dict[tuple[int, int], v2.Transform] = {}

    def _pipeline(self, size: tuple[int, int]) -> v2.Transform:
        # RandomCrop needs the output size at construction: one pipeline per input size.
        if size not in self._pipelines:
            steps: list[v2.Transform] = []
            if self.padding > 0:
                steps.append(v2.RandomCrop(size, padding=self.padding, padding_mode=self.padding_mode, fill=0))
            if self.flip:
                steps.append(v2.RandomHorizontalFlip(p=0.5))
            self._pipelines[size] = v2.Compose(steps) if steps else v2.Identity()
        return self._pipelines[size]

    def __call__(self, image: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if image.ndim != 3:
            raise ValueError(f"JointAugment expects one image 3 x H x W, got shape {tuple(image.shape)}")
        size = (int(image.shape[-2]), int(image.shape[-1]))
        pipeline = self._pipeline(size)
        if mask is None:
            return pipeline(tv_tensors.Image(image)).as_subclass(Tensor), None
        if tuple(mask.shape[-2:]) != size:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape)}")
        out_image, out_mask = pipeline(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return out_image.as_subclass(Tensor), out_mask.as_subclass(Tensor)

    def __repr__(self) -> str:
        return f"JointAugment(padding={self.padding}, flip={self.flip}, padding_mode={self.padding_mode!r})"
