"""The dataset's own ground-truth masks as the attention method (``oracle``), optionally
degraded in a controlled way.

An upper bound for DHAT's background extraction, and, with the degradations, a knob
for a sweep of attention quality: how do clean and robust accuracy change as the mask
gets worse (dilated, eroded, shifted, noisy)? Only data with exact foreground masks can
be used; of the built-in datasets those are ``synthetic`` and ``digits`` (every sample carries the
exact mask of its object, :mod:`dhat_seg.data.synthetic`).

Which sample is an image? The attention contract hands a method images and labels,
not sample indices. The oracle recognises each image by its exact 8-bit pixel values
(round(255 x), hashed) among the un-augmented images of the run's data, which it
builds from the run's configuration (``AttentionContext.config``): first the training
split, then, only when an image is not found there, the other splits (val, test, ...).
That is what the mask cache shows it (``mask_source: cache``, the default for image
methods: every training image once, un-augmented) and what ``dhat-seg masks score``,
``masks show`` and the evaluation's attention IoU show it. Randomly cropped or flipped
training batches (``mask_source: online`` with augmentation) are not the dataset's
images; the oracle then stops with an error saying so rather than guess.

Degradations (options; applied in this order, each optional, all composable):

* ``dilate=k``: grow the mask by k pixels (every pixel within chessboard distance k of
  the object becomes foreground),
* ``erode=k``: shrink it by k pixels (a pixel stays foreground only when every pixel
  within distance k that lies inside the image is foreground: the image border does
  not eat into objects that touch it),
* ``shift_x=dx``, ``shift_y=dy``: move it dx pixels right and dy down (negative: left,
  up); pixels shifted in from outside are background,
* ``flip=p``: flip every pixel (foreground <-> background) independently with
  probability p; the noise is drawn from ``seed``, the dataset's fingerprint and the
  sample's index, so a sample gets the same noise in every batch, cache build and
  process.

The result is a bool mask (hard, no threshold involved).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dhat_seg.attention import AttentionContext, AttentionSpec
from dhat_seg.errors import UserError
from dhat_seg.hookspecs import hookimpl

DEFAULT_OPTIONS = {
    "dilate": 0,
    "erode": 0,
    "shift_x": 0,
    "shift_y": 0,
    "flip": 0.0,
    "seed": 0,
}

NO_MASKS_HINT = ("the built-in data have them (--data synthetic or --data digits); an image folder has them "
                 "in ROOT/masks/<split>/, see docs/datasets.md")


def check_options(options: Mapping[str, Any]) -> None:
    """A one-line UserError naming an invalid option value."""
    for name in ("dilate", "erode"):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"oracle option {name}={value!r} is invalid; expected an integer >= 0 (pixels)")
    for name in ("shift_x", "shift_y", "seed"):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"oracle option {name}={value!r} is invalid; expected an integer")
    p = options["flip"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise UserError(f"oracle option flip={p!r} is invalid; expected a probability in [0, 1]")


def image_digests(images: Tensor) -> list[bytes]:
    """Per image, a digest of its 8-bit values round(255 x) (B x C x H x W, [0, 1])."""
    values = (images.detach().float() * 255.0).round_().clamp_(0, 255).to(torch.uint8).cpu()
    rows = values.reshape(values.shape[0], -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def _dataset_digests(dataset) -> list[bytes]:
    stored = getattr(dataset, "images", None)
    if isinstance(stored, Tensor) and stored.dtype == torch.uint8 and tuple(stored.shape[-2:]) == tuple(dataset.image_size):
        rows = stored.reshape(stored.shape[0], -1).numpy()  # what load_image returns, times 255
        return [hashlib.blake2b(np.ascontiguousarray(r).tobytes(), digest_size=16).digest() for r in rows]
    out: list[bytes] = []
    for start in range(0, len(dataset), 256):
        batch = torch.stack([dataset.load_image(i) for i in range(start, min(len(dataset), start + 256))])
        out.extend(image_digests(batch))
    return out


def degrade(masks: Tensor, *, dilate: int = 0, erode: int = 0, shift_x: int = 0, shift_y: int = 0,
            flip: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """Apply the degradations to bool masks B x 1 x H x W (see the module docstring).

    ``noise``: B x 1 x H x W uniform [0, 1) values for the pixel flips (required when
    ``flip`` > 0); a pixel flips where noise < flip.
    """
    m = masks.float()
    if dilate:
        m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    if erode:
        # max_pool2d pads with -inf: pixels outside the image never count as background
        m = -F.max_pool2d(-m, 2 * erode + 1, stride=1, padding=erode)
    out = m > 0.5
    if shift_x or shift_y:
        out = shift(out, shift_x, shift_y)
    if flip:
        if noise is None:
            raise ValueError("flip > 0 needs noise")
        out = out ^ (noise < flip)
    return out


def shift(masks: Tensor, dx: int, dy: int) -> Tensor:
    """Move masks (..., H, W) dx pixels right and dy down; vacated pixels are False."""
    h, w = masks.shape[-2:]
    out = torch.zeros_like(masks)
    if abs(dx) >= w or abs(dy) >= h:
        return out
    src_y, dst_y = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    src_x, dst_x = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., dst_y, dst_x] = masks[..., src_y, src_x]
    return out


def flip_noise(seed: int, fingerprint: str, index: int, shape: tuple[int, int]) -> Tensor:
    """Uniform [0, 1) H x W values of one sample, from (seed, data fingerprint, index) only."""
    from dhat_seg.data.base import derive_seed

    g = torch.Generator().manual_seed(derive_seed(seed, "oracle-flip", fingerprint, index))
    return torch.rand(shape, generator=g)


class OracleAttention:
    """Per-batch callable: each image's ground-truth mask (found by its pixels), degraded.

    Args:
        sources: datasets with ``gt_masks``, or zero-argument callables returning one
            (built only when an image is not found in the ones before).
        describe: how to name the data in the error for an unknown image.
        options: the degradation options (:data:`DEFAULT_OPTIONS`).
    """

    def __init__(self, sources: Sequence[Any | Callable[[], Any]], options: Mapping[str, Any] | None = None,
                 describe: str = "the run's data"):
        self.options = {**DEFAULT_OPTIONS, **dict(options or {})}
        check_options(self.options)
        self.describe = describe
        self._pending = list(sources)
        self._datasets: list[Any] = []
        self._table: dict[bytes, tuple[int, int] | None] = {}

    # -- the lookup --------------------------------------------------------------

    def _index_next(self) -> bool:
        """Index the next pending dataset; False when none is left."""
        if not self._pending:
            return False
        source = self._pending.pop(0)
        dataset = source() if callable(source) and not hasattr(source, "gt_masks") else source
        if getattr(dataset, "gt_masks", None) is None:
            name = f"{getattr(dataset, 'name', type(dataset).__name__)}/{getattr(dataset, 'split', '?')}"
            raise UserError(f"attention method 'oracle' uses the dataset's ground-truth foreground masks and dataset "
                            f"{name!r} has none ({NO_MASKS_HINT})")
        k = len(self._datasets)
        self._datasets.append(dataset)
        masks = dataset.gt_masks
        for i, digest in enumerate(_dataset_digests(dataset)):
            if digest not in self._table:
                self._table[digest] = (k, i)
            else:
                prev = self._table[digest]
                # the same pixels twice: fine when the masks agree, ambiguous otherwise
                if prev is not None and not torch.equal(self._datasets[prev[0]].gt_masks[prev[1]], masks[i]):
                    self._table[digest] = None
        return True

    def ensure_indexed(self) -> None:
        """Index the first source now (so that data without masks fails at build time)."""
        if not self._datasets:
            self._index_next()

    def lookup(self, images: Tensor) -> list[tuple[int, int]]:
        """(dataset number, sample index) of every image."""
        self.ensure_indexed()
        digests = image_digests(images)
        found: list[tuple[int, int] | None] = []
        for j, digest in enumerate(digests):
            while digest not in self._table and self._index_next():
                pass
            if digest not in self._table:
                raise UserError(
                    f"attention method 'oracle': image {j} of the batch is not one of the un-augmented images of "
                    f"{self.describe}, so its ground-truth mask is unknown; the oracle works on the mask cache "
                    "(mask_source: cache) and on evaluation images, not on randomly cropped or flipped batches "
                    "(mask_source: online with augmentation)")
            if self._table[digest] is None:
                raise UserError(f"attention method 'oracle': image {j} of the batch occurs several times in "
                                f"{self.describe} with different ground-truth masks")
            found.append(self._table[digest])
        return found  # type: ignore[return-value]

    # -- the attention function --------------------------------------------------

    def ground_truth(self, images: Tensor) -> tuple[Tensor, list[tuple[int, int]]]:
        """Exact masks of the images (bool B x 1 x H x W on the images' device) and
        where each was found (dataset number, sample index)."""
        where = self.lookup(images)
        masks = torch.stack([self._datasets[k].gt_masks[i] for k, i in where]).unsqueeze(1)
        if tuple(masks.shape[-2:]) != tuple(images.shape[-2:]):
            raise UserError(f"attention method 'oracle': the ground-truth masks are {tuple(masks.shape[-2:])} but the "
                            f"images are {tuple(images.shape[-2:])}")
        return masks.to(images.device), where

    def __call__(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        o = self.options
        masks, where = self.ground_truth(images)
        noise = None
        if o["flip"]:
            h, w = masks.shape[-2:]
            noise = torch.stack([flip_noise(o["seed"], self._datasets[k].fingerprint(), i, (h, w)) for k, i in where])
            noise = noise.unsqueeze(1).to(images.device)
        return degrade(masks, dilate=o["dilate"], erode=o["erode"], shift_x=o["shift_x"], shift_y=o["shift_y"],
                       flip=float(o["flip"]), noise=noise)


def _splits(cfg) -> list[str]:
    from dhat_seg.data.registry import DATASETS

    info = DATASETS.get(cfg.data)
    splits = list(info.splits) if info is not None else ["train", "val", "test"]
    return ["train"] + [s for s in splits if s != "train"]


def _build(ctx: AttentionContext) -> OracleAttention:
    check_options(ctx.options)
    cfg = ctx.config
    if cfg is None:
        raise UserError("attention method 'oracle' needs the run's data settings to find the ground-truth masks: build "
                        "it through dhat_seg.attention.model.build_attention (or give AttentionContext(config=...))")
    from dhat_seg.cache import dataset_for

    def source(split: str):
        return lambda: dataset_for(cfg, split)

    oracle = OracleAttention([source(s) for s in _splits(cfg)], ctx.options,
                             describe=f"dataset {cfg.data!r} (seed {cfg.seed}; splits {', '.join(_splits(cfg))})")
    oracle.ensure_indexed()  # data without masks: fail now, not at the first batch
    return oracle


@hookimpl
def register_attention_methods(register):
    register(
        AttentionSpec(
            name="oracle",
            description="the dataset's ground-truth masks (built-in data), optionally dilated/eroded/shifted/noisy",
            factory=_build,
            version="1",
            kind="image",
            default_options=dict(DEFAULT_OPTIONS),
        )
    )
