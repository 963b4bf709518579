"""The built-in "digits" dataset: real handwritten digits on class-correlated textures.

scikit-learn ships 1797 handwritten 8 x 8 digits inside its wheel
(``sklearn.datasets.load_digits``: the UCI optical-recognition set, 43 writers; no
download). Each sample pastes one of them, upsampled, in one flat colour onto one of
the ten background textures of the synthetic dataset, in the Biased-MNIST /
Colored-MNIST family: the texture equals the digit's class with probability ``rho``
("correlated") or is uniform ("random", the ``mixed-rand`` variant). The foreground
mask is the digit's ink: the pixels where the bilinearly upsampled glyph reaches half
of full intensity, painted in the object colour, so the mask is exact.

Training and test images come from **disjoint source digits**: the 1797 digits are
split once, from the data seed, into a training pool (70 %) and a test pool (30 %);
training and validation samples draw only from the first, every test split only from
the second. Each source digit is used several times (different position, scale,
colour and background), as a generated image, never as the same image in train and
test.

Colours, textures and salience are exactly the synthetic generator's
(:func:`dhat_seg.data.synthetic.paint`), so the two datasets differ only in what the
foreground is.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from dhat_seg.data.base import derive_seed
from dhat_seg.data.synthetic import (
    DEFAULT_SALIENCE,
    SyntheticArrays,
    _check_args,
    draw_backgrounds,
    draw_placement,
    paint,
)
from dhat_seg.errors import UserError

#: Bump when the generated pixels change for the same parameters (part of fingerprints).
DIGITS_VERSION = "1"

DIGIT_NAMES = tuple(str(d) for d in range(10))
#: The digit's box side as a fraction of the image side.
DIGIT_SIDE = (0.6, 0.9)
#: Fraction of the 1797 source digits that only test splits use.
TEST_SOURCE_FRACTION = 0.3
#: Ink threshold on the upsampled glyph (intensity in [0, 1]).
INK_THRESHOLD = 0.5


@functools.lru_cache(maxsize=1)
def source_digits() -> tuple[Tensor, Tensor]:
    """The 1797 scikit-learn digits: glyphs float N x 8 x 8 in [0, 1] and labels int64 N."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a core dependency
        raise UserError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from exc
    bunch = load_digits()
    glyphs = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)
    return glyphs, torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))


def source_split(seed: int) -> tuple[Tensor, Tensor]:
    """Sorted indices of the source digits of (training pool, test pool): disjoint, their
    union all 1797, drawn from ``seed`` and stratified by class (each class keeps the
    same test fraction)."""
    _, labels = source_digits()
    g = torch.Generator().manual_seed(derive_seed(seed, "digits-sources"))
    train, test = [], []
    for c in range(10):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(TEST_SOURCE_FRACTION * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def generate_digits(
    n: int,
    *,
    seed: int,
    sources: Tensor,
    image_size: int = 32,
    rho: float = 0.9,
    background: str = "correlated",
    salience: float = DEFAULT_SALIENCE,
) -> SyntheticArrays:
    """Generate ``n`` samples, each a digit drawn uniformly from ``sources`` (indices
    into :func:`source_digits`) on a texture. Same arguments give identical bytes; the
    two background modes with the same seed give the same digits (paired test sets).
    The returned arrays' ``sources`` holds each sample's source digit index."""
    _check_args(n, image_size, rho, background, 10, salience)
    if sources.numel() == 0:
        raise UserError("digits: no source digits to draw from")
    glyphs, digit_labels = source_digits()
    g = torch.Generator().manual_seed(int(seed))
    pick = sources[torch.randint(0, len(sources), (n,), generator=g)]
    labels = digit_labels[pick]
    backgrounds = draw_backgrounds(labels, 10, rho, background, g)
    centre, half = draw_placement(n, DIGIT_SIDE, g)

    def masks_of(sl: slice) -> Tensor:
        return _render_glyphs(glyphs[pick[sl]], centre[sl], half[sl], image_size)

    images, masks = paint(masks_of, backgrounds, image_size, salience, g)
    return SyntheticArrays(images=images, labels=labels, masks=masks, backgrounds=backgrounds, sources=pick)


def _render_glyphs(glyphs: Tensor, centre: Tensor, half: Tensor, size: int) -> Tensor:
    """Bool masks N x H x W: each 8 x 8 glyph upsampled (bilinear) into its box, ink where
    the intensity reaches :data:`INK_THRESHOLD`."""
    n = glyphs.shape[0]
    # affine_grid maps output coords in [-1, 1] to input coords: box = centre +- half
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / (2 * half)
    theta[:, :, 2] = (1.0 - 2 * centre) / (2 * half[:, None])
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    ink = F.grid_sample(glyphs[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return ink[:, 0] >= INK_THRESHOLD
