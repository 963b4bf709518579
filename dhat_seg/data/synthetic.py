"""The built-in "synthetic" dataset: shapes on textures, with a spurious background cue.

Each image shows one foreground object whose *shape* is the class (disc, square, ...),
in a random colour, position and scale, drawn on one of ``num_classes`` background
textures (stripes, checkerboard, ...). In the "correlated" mode the background index
equals the class with probability ``rho`` and is a uniformly random *other* texture
otherwise, so a classifier can take the shortcut "texture identifies class" ("grass
identifies sheep"), the background bias that DHAT removes. In the "random" mode
(the ``mixed-rand`` test variant, after Xiao et al., "Noise or Signal", ICLR 2021) the
background is uniform over all textures, so only the object tells the class.

Every sample carries its exact foreground mask: the object is painted with one flat
colour chosen far (in RGB) from every colour its background can take, so the mask is
exactly the set of pixels of that colour.

Generation is vectorised in torch over coordinate grids (no per-pixel Python loops)
and deterministic given ``seed``: all per-sample parameters are drawn up front from one
``torch.Generator``, per-pixel randomness (the noise and blotch textures) chunk by
chunk in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from dhat_seg.errors import UserError

#: Class names, in label order: the shape of the foreground object.
SHAPES = (
    "disc",
    "square",
    "triangle",
    "plus",
    "ring",
    "diamond",
    "x-cross",
    "bar",
    "frame",
    "star",
)

#: Background texture names, in index order (texture k is the spurious cue of class k).
BACKGROUNDS = (
    "horizontal-stripes",
    "vertical-stripes",
    "diagonal-stripes",
    "checkerboard",
    "dots",
    "gradient",
    "ripples",
    "grid",
    "noise",
    "blotches",
)

BACKGROUND_MODES = ("correlated", "random")

#: Bump when the generated pixels change for the same parameters (part of fingerprints).
GENERATOR_VERSION = "1"

#: Object side as a fraction of the image side (the bounding box of the shape).
OBJECT_SIDE = (0.35, 0.70)
#: Minimum RGB distance between the object colour and any background colour, and
#: between the two colours of a texture (so the texture stays visible).
OBJECT_CONTRAST = 0.35
TEXTURE_CONTRAST = 0.3
#: Samples rendered at once (bounds memory at ~3 x 4 bytes x chunk x H x W).
_CHUNK = 2048
#: Colour candidates drawn per sample; the first that is far enough is used.
_CANDIDATES = 16


@dataclass
class SyntheticArrays:
    """A generated set of samples.

    Attributes:
        images: uint8 N x 3 x H x W.
        labels: int64 N, the object's shape (index into :data:`SHAPES`).
        masks: bool N x H x W, True exactly on the object's pixels.
        backgrounds: int64 N, the background texture (index into :data:`BACKGROUNDS`).
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    backgrounds: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def generate_synthetic(
    n: int,
    *,
    seed: int,
    image_size: int = 32,
    rho: float = 0.9,
    background: str = "correlated",
    num_classes: int = 10,
) -> SyntheticArrays:
    """Generate ``n`` samples of the synthetic shapes-on-textures dataset.

    Args:
        n: number of samples (> 0).
        seed: seed of the torch.Generator; same arguments -> identical bytes.
        image_size: side of the square images, in pixels (8 to 512).
        rho: "correlated" mode: probability that the background index equals the label.
        background: "correlated" (training and the ``same`` test variant) or "random"
            (the ``mixed-rand`` variant: background uniform over all textures).
        num_classes: 2 to 10; uses the first ``num_classes`` shapes and textures.

    The random draws do not depend on ``background`` except for the background index,
    so the two modes with the same seed give the same objects (paired test sets).
    """
    _check_args(n, image_size, rho, background, num_classes)
    g = torch.Generator().manual_seed(int(seed))
    k = num_classes

    # ---- per-sample parameters, drawn in a fixed order -------------------------------
    labels = torch.randint(0, k, (n,), generator=g)
    same = torch.rand(n, generator=g) < rho
    # a uniformly random *other* texture: label + offset in 1..k-1 (mod k)
    other = (labels + torch.randint(1, k, (n,), generator=g)) % k
    uniform_bg = torch.randint(0, k, (n,), generator=g)
    if background == "correlated":
        backgrounds = torch.where(same, labels, other)
    else:
        backgrounds = uniform_bg

    side = OBJECT_SIDE[0] + (OBJECT_SIDE[1] - OBJECT_SIDE[0]) * torch.rand(n, generator=g)
    half = side / 2  # in units of the image side
    centre = half[:, None] + (1 - 2 * half[:, None]) * torch.rand(n, 2, generator=g)  # keeps it inside
    texture_params = torch.rand(n, 6, generator=g)  # frequencies, phases, directions
    colour_a = torch.rand(n, 3, generator=g)
    colour_b = _far_colours(colour_a, TEXTURE_CONTRAST, g)
    colour_obj = _far_colours_from_segment(colour_a, colour_b, OBJECT_CONTRAST, g)

    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    masks = torch.empty(n, image_size, image_size, dtype=torch.bool)
    ys, xs = _pixel_grid(image_size)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        mask = _render_shapes(labels[sl], centre[sl], half[sl], xs, ys)
        pattern = _render_textures(backgrounds[sl], texture_params[sl], xs, ys, g)
        # background = mix of its two colours; every background pixel lies on the
        # segment [colour_a, colour_b], far from the object colour.
        a = colour_a[sl, :, None, None]
        img = torch.addcmul(a, colour_b[sl, :, None, None] - a, pattern[:, None])
        img = torch.where(mask[:, None], colour_obj[sl, :, None, None], img)
        # colours and mixtures lie in [0, 1], so no clamp is needed
        images[sl] = img.mul_(255).round_().to(torch.uint8)
        masks[sl] = mask
    return SyntheticArrays(images=images, labels=labels, masks=masks, backgrounds=backgrounds)


def _check_args(n, image_size, rho, background, num_classes) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise UserError(f"number of samples {n!r} is invalid: expected a positive integer")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 512:
        raise UserError(f"image size {image_size!r} is invalid: expected an integer from 8 to 512")
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not 0.0 <= float(rho) <= 1.0:
        raise UserError(f"rho {rho!r} is invalid: expected a probability in [0, 1]")
    if background not in BACKGROUND_MODES:
        raise UserError(f"background mode {background!r} is unknown; expected one of {', '.join(BACKGROUND_MODES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= len(SHAPES):
        raise UserError(f"num_classes {num_classes!r} is invalid: expected an integer from 2 to {len(SHAPES)}")


def _pixel_grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in (0, 1): ys 1 x H x 1 (down), xs 1 x 1 x W (right).

    Kept separable: functions of x alone or y alone (stripes, a shape's |u| and |v|)
    are computed on H or W values and only broadcast to H x W when combined.
    """
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return c.view(1, size, 1), c.view(1, 1, size)


# ---------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------


def _pick_first_far(candidates: Tensor, dist: Tensor, min_dist: float) -> Tensor:
    """Per sample, the first candidate with dist >= min_dist, else the farthest one.

    candidates: N x C x 3, dist: N x C.
    """
    ok = dist >= min_dist
    # index of the first ok candidate; argmax of a bool row returns the first True
    first = ok.to(torch.uint8).argmax(dim=1)
    best = torch.where(ok.any(dim=1), first, dist.argmax(dim=1))
    return candidates[torch.arange(candidates.shape[0]), best]


def _far_colours(anchor: Tensor, min_dist: float, g: torch.Generator) -> Tensor:
    """A random colour per sample at RGB distance >= min_dist from ``anchor`` (N x 3)
    (or the farthest of the candidates in the rare case none is far enough)."""
    n = anchor.shape[0]
    cand = torch.rand(n, _CANDIDATES, 3, generator=g)
    return _pick_first_far(cand, (cand - anchor[:, None]).norm(dim=-1), min_dist)


def _far_colours_from_segment(a: Tensor, b: Tensor, min_dist: float, g: torch.Generator) -> Tensor:
    """A random colour per sample far from every point of the RGB segment [a, b].

    Background pixels are convex mixtures of a and b, so this bounds the contrast
    between the object and *every* background pixel. The 8 cube corners are extra
    candidates (used only when no random one is far enough; some corner always is).
    """
    n = a.shape[0]
    corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float32)
    cand = torch.cat([torch.rand(n, _CANDIDATES, 3, generator=g), corners.expand(n, 8, 3)], dim=1)
    return _pick_first_far(cand, _segment_distance(cand, a[:, None], b[:, None]), min_dist)


def _segment_distance(p: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance from points p to segments [a, b] (broadcast over the last dim)."""
    ab = b - a
    t = ((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)
    closest = a + t.clamp(0, 1)[..., None] * ab
    return (p - closest).norm(dim=-1)


# ---------------------------------------------------------------------------------
# Shapes: boolean masks from local coordinates u, v in [-1, 1] (the object's box)
# ---------------------------------------------------------------------------------


def _shape_mask(cls: int, u: Tensor, v: Tensor) -> Tensor:
    """Mask of shape ``cls`` in box coordinates (u right, v down, box = [-1, 1]^2);
    u is N x 1 x W and v is N x H x 1, the result N x H x W."""
    au, av = u.abs(), v.abs()
    r2 = u * u + v * v
    if cls == 0:  # disc
        return r2 <= 1.0
    if cls == 1:  # square (slightly smaller than the box so its area is close to the disc's)
        return torch.maximum(au, av) <= 0.85
    if cls == 2:  # triangle, apex up
        top, bottom = -0.95, 0.8
        return (v >= top) & (v <= bottom) & (au <= (v - top) / (bottom - top))
    if cls == 3:  # plus
        return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
    if cls == 4:  # ring
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if cls == 5:  # diamond
        return au + av <= 1.0
    if cls == 6:  # x-cross (a plus turned by 45 degrees)
        return (((u - v).abs() <= 0.45) | ((u + v).abs() <= 0.45)) & (torch.maximum(au, av) <= 0.85)
    if cls == 7:  # horizontal bar
        return (au <= 1.0) & (av <= 0.35)
    if cls == 8:  # frame (hollow square)
        m = torch.maximum(au, av)
        return (m <= 0.9) & (m >= 0.5)
    if cls == 9:  # five-pointed star, one tip up: radius limit peaks at the tips
        theta = torch.atan2(u, -v)
        t = torch.frac(theta * (5 / (2 * math.pi)) + 10.0)  # +10 keeps it positive
        d = (2 * t - 1).abs()  # 1 at a tip, 0 between two tips
        r_lim = 0.42 + 0.58 * d * d
        return r2 <= r_lim * r_lim
    raise AssertionError(cls)


def _render_shapes(labels: Tensor, centre: Tensor, half: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Bool masks N x H x W of each sample's object."""
    n = labels.shape[0]
    out = torch.zeros(n, ys.shape[-2], xs.shape[-1], dtype=torch.bool)
    for cls in labels.unique().tolist():
        idx = (labels == cls).nonzero().squeeze(1)
        h = half[idx, None, None]
        u = (xs - centre[idx, 0, None, None]) / h
        v = (ys - centre[idx, 1, None, None]) / h
        out[idx] = _shape_mask(cls, u, v)
    return out


# ---------------------------------------------------------------------------------
# Textures: mixing weights p in [0, 1] between the two background colours
# ---------------------------------------------------------------------------------


def _texture(bg: int, q: Tensor, xs: Tensor, ys: Tensor, g: torch.Generator) -> Tensor:
    """Pattern in [0, 1] of texture ``bg``, broadcastable to N x H x W; q: N x 6
    uniform parameters.

    Frequencies are in cycles per image so the look does not depend on the image size.
    """
    n = q.shape[0]
    col = [q[:, i, None, None] for i in range(6)]
    freq = 3.0 + 2.0 * col[0]  # 3..5 cycles per image
    ph1, ph2 = col[1], col[2]
    if bg == 0:  # horizontal stripes
        return (torch.frac(freq * ys + ph1) < 0.5).float()
    if bg == 1:  # vertical stripes
        return (torch.frac(freq * xs + ph1) < 0.5).float()
    if bg == 2:  # diagonal stripes, random direction (so a horizontal flip keeps the class)
        sign = torch.where(col[3] < 0.5, -1.0, 1.0)
        return (torch.frac(freq * (sign * xs + ys) / math.sqrt(2) + ph1 + 5.0) < 0.5).float()
    if bg == 3:  # checkerboard
        f = 2.5 + 1.5 * col[0]
        return ((torch.frac(f * xs + ph1) < 0.5) ^ (torch.frac(f * ys + ph2) < 0.5)).float()
    if bg == 4:  # dots on a lattice
        dx = torch.frac(freq * xs + ph1) - 0.5
        dy = torch.frac(freq * ys + ph2) - 0.5
        return (dx * dx + dy * dy <= 0.28**2).float()
    if bg == 5:  # smooth linear gradient in a random direction
        angle = 2 * math.pi * col[3]
        proj = (xs - 0.5) * torch.cos(angle) + (ys - 0.5) * torch.sin(angle)
        return (proj / math.sqrt(2) + 0.5).clamp(0, 1)
    if bg == 6:  # sinusoidal ripples around a random centre (smooth values)
        r = ((xs - col[3]) ** 2 + (ys - col[4]) ** 2).sqrt()
        return 0.5 + 0.5 * torch.sin(2 * math.pi * (freq * r + ph1))
    if bg == 7:  # grid of thin lines
        f = 2.5 + 1.5 * col[0]
        return ((torch.frac(f * xs + ph1) < 0.2) | (torch.frac(f * ys + ph2) < 0.2)).float()
    if bg == 8:  # per-pixel uniform noise
        return torch.rand(n, ys.shape[-2], xs.shape[-1], generator=g)
    if bg == 9:  # blotches: thresholded bicubic upsampling of a coarse random field
        coarse = torch.rand(n, 1, 5, 5, generator=g)
        field = F.interpolate(coarse, size=(ys.shape[-2], xs.shape[-1]), mode="bicubic", align_corners=False)
        return (field[:, 0] > 0.5).float()
    raise AssertionError(bg)


def _render_textures(backgrounds: Tensor, q: Tensor, xs: Tensor, ys: Tensor, g: torch.Generator) -> Tensor:
    """Patterns N x H x W in [0, 1] of each sample's background."""
    n = backgrounds.shape[0]
    out = torch.empty(n, ys.shape[-2], xs.shape[-1])
    # iterate textures in index order so per-pixel random draws happen in a fixed order
    for bg in range(len(BACKGROUNDS)):
        idx = (backgrounds == bg).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = _texture(bg, q[idx], xs, ys, g)
    return out
