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

**Salience.** With colours drawn uniformly for both object and background (version 1
of the generator, ``salience=0``), no model learns the shapes: texture edges are as
strong as the object's outline and smooth textures look like the object locally. At
salience ``s`` the object's colour channels are drawn in ``[s, 1]`` and the
background's in ``[0, 1 - s/2]``: the object is brighter than its background on
average, so its outline is the strongest edge, while the background's textures stay
visible and class-correlated. The default (:data:`DEFAULT_SALIENCE`) is calibrated so
that a classifier learns the shapes *and* still uses the background
(``benchmarks/study_benchmark_regime.py``, docs/datasets.md); the bands stop
overlapping at ``s = 2/3``, where the background is ignored.

**Backgrounds-Challenge variants** (Xiao et al., ICLR 2021): :func:`only_foreground`
puts each object on a black background (``only_fg``); :func:`remove_foreground`
blacks the object out (``no_fg``), to be scored against the *background's* class.

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
GENERATOR_VERSION = "2"

#: Default foreground salience (see the module docstring); 0 = version 1's colours.
DEFAULT_SALIENCE = 0.4

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
        sources: int64 N, the source image of each sample's object where it has one
            (the ``digits`` dataset), else None.
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    backgrounds: Tensor
    sources: Tensor | None = None

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
    salience: float = DEFAULT_SALIENCE,
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
        salience: in [0, 1): object colour channels in [salience, 1], background colour
            channels in [0, 1 - salience / 2]; 0 gives version 1's colours exactly.

    The random draws do not depend on ``background`` except for the background index,
    so the two modes with the same seed give the same objects (paired test sets).
    """
    _check_args(n, image_size, rho, background, num_classes, salience)
    g = torch.Generator().manual_seed(int(seed))

    # ---- per-sample parameters, drawn in a fixed order -------------------------------
    labels = torch.randint(0, num_classes, (n,), generator=g)
    backgrounds = draw_backgrounds(labels, num_classes, rho, background, g)
    centre, half = draw_placement(n, OBJECT_SIDE, g)

    def masks_of(sl: slice) -> Tensor:
        return _render_shapes(labels[sl], centre[sl], half[sl], xs, ys)

    ys, xs = _pixel_grid(image_size)
    images, masks = paint(masks_of, backgrounds, image_size, salience, g)
    return SyntheticArrays(images=images, labels=labels, masks=masks, backgrounds=backgrounds)


def draw_backgrounds(labels: Tensor, k: int, rho: float, background: str, g: torch.Generator) -> Tensor:
    """Each sample's texture index: the label with probability ``rho``, else a uniformly
    random other texture ("correlated"), or uniform over all textures ("random"). The
    draws are the same in both modes (paired test sets)."""
    n = labels.shape[0]
    same = torch.rand(n, generator=g) < rho
    # a uniformly random *other* texture: label + offset in 1..k-1 (mod k)
    other = (labels + torch.randint(1, k, (n,), generator=g)) % k
    uniform_bg = torch.randint(0, k, (n,), generator=g)
    return torch.where(same, labels, other) if background == "correlated" else uniform_bg


def draw_placement(n: int, side_range: tuple[float, float], g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Object centres (N x 2, x then y) and half sides (N), in units of the image side;
    the object's box always lies inside the image."""
    side = side_range[0] + (side_range[1] - side_range[0]) * torch.rand(n, generator=g)
    half = side / 2
    centre = half[:, None] + (1 - 2 * half[:, None]) * torch.rand(n, 2, generator=g)
    return centre, half


def paint(masks_of, backgrounds: Tensor, image_size: int, salience: float,
          g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Images (uint8 N x 3 x H x W) and masks (bool N x H x W): each sample's texture in
    two background colours with its object on top in one flat colour far from both.

    ``masks_of(slice)`` gives the object masks of a chunk of samples. The texture
    parameters and colours are drawn here, then the per-pixel randomness chunk by chunk.
    """
    n = backgrounds.shape[0]
    texture_params = torch.rand(n, 6, generator=g)  # frequencies, phases, directions
    bg_band, obj_band = salience_bands(salience)
    colour_a = _in_band(torch.rand(n, 3, generator=g), bg_band)
    colour_b = _far_colours(colour_a, TEXTURE_CONTRAST, g, bg_band)
    colour_obj = _far_colours_from_segment(colour_a, colour_b, OBJECT_CONTRAST, g, obj_band)

    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    masks = torch.empty(n, image_size, image_size, dtype=torch.bool)
    ys, xs = _pixel_grid(image_size)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        mask = masks_of(sl)
        pattern = _render_textures(backgrounds[sl], texture_params[sl], xs, ys, g)
        # background = mix of its two colours; every background pixel lies on the
        # segment [colour_a, colour_b], far from the object colour.
        a = colour_a[sl, :, None, None]
        img = torch.addcmul(a, colour_b[sl, :, None, None] - a, pattern[:, None])
        img = torch.where(mask[:, None], colour_obj[sl, :, None, None], img)
        # colours and mixtures lie in [0, 1], so no clamp is needed
        images[sl] = img.mul_(255).round_().to(torch.uint8)
        masks[sl] = mask
    return images, masks


def salience_bands(salience: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(background band, object band): the ranges of the colour channels at a salience."""
    s = float(salience)
    return (0.0, 1.0 - s / 2), (s, 1.0)


def only_foreground(arrays: SyntheticArrays) -> Tensor:
    """Images with every background pixel black (Backgrounds Challenge ``only_fg``)."""
    return torch.where(arrays.masks[:, None], arrays.images, torch.zeros((), dtype=arrays.images.dtype))


def remove_foreground(arrays: SyntheticArrays) -> Tensor:
    """Images with the object's pixels black, as Xiao et al. fill the hole of ``no_fg``."""
    return torch.where(arrays.masks[:, None], torch.zeros((), dtype=arrays.images.dtype), arrays.images)


def _check_args(n, image_size, rho, background, num_classes, salience=0.0) -> None:
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
    check_salience(salience)


def check_salience(salience) -> None:
    if isinstance(salience, bool) or not isinstance(salience, (int, float)) or not 0.0 <= float(salience) < 1.0:
        raise UserError(f"salience {salience!r} is invalid: expected a number in [0, 1) (0 = the version-1 colours)")


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


def _in_band(unit: Tensor, band: tuple[float, float]) -> Tensor:
    """Values in [0, 1] mapped affinely onto ``band`` (the identity for (0, 1))."""
    lo, hi = band
    return unit if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * unit


def _far_colours(anchor: Tensor, min_dist: float, g: torch.Generator, band=(0.0, 1.0)) -> Tensor:
    """A random colour per sample, channels in ``band``, at RGB distance >= min_dist from
    ``anchor`` (N x 3) (or the farthest of the candidates in the rare case none is far
    enough)."""
    n = anchor.shape[0]
    cand = _in_band(torch.rand(n, _CANDIDATES, 3, generator=g), band)
    return _pick_first_far(cand, (cand - anchor[:, None]).norm(dim=-1), min_dist)


def _far_colours_from_segment(a: Tensor, b: Tensor, min_dist: float, g: torch.Generator,
                              band=(0.0, 1.0)) -> Tensor:
    """A random colour per sample, channels in ``band``, far from every point of the RGB
    segment [a, b].

    Background pixels are convex mixtures of a and b, so this bounds the contrast
    between the object and *every* background pixel. The 8 corners of the band's cube
    are extra candidates (used only when no random one is far enough; with the full
    band some corner always is; in the rare case none is, the farthest candidate is
    used: its distance is still positive, so the object's pixels stay distinct).
    """
    n = a.shape[0]
    corners = _in_band(torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float32), band)
    cand = torch.cat([_in_band(torch.rand(n, _CANDIDATES, 3, generator=g), band), corners.expand(n, 8, 3)], dim=1)
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
