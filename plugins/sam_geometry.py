"""SAM's geometry: the 8-bit image, Pillow-exact resize and point/box prompts exactly as
``SamPredictor`` sees them, and batched mask decoding (used by :mod:`dhat_seg.plugins.sam`)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# Pillow's fixed-point precision for 8-bit resampling (libImaging/Resample.c).
_PIL_PRECISION_BITS = 32 - 8 - 2


# ---------------------------------------------------------------------------------
# Image conversion: exactly what SamPredictor.set_image sees.
# ---------------------------------------------------------------------------------


def to_uint8_values(images: Tensor) -> Tensor:
    """Float [0, 1] images -> their 8-bit values round(x * 255), as float32.

    This is the uint8 image a user would hand to ``SamPredictor.set_image`` (images
    that came from 8-bit files, divided by 255, get their original values back).
    Kept as float32 so the rest of the pipeline stays on the device in one dtype.
    """
    return (images.float() * 255.0).round_().clamp_(0.0, 255.0)


@functools.lru_cache(maxsize=32)
def _pil_bilinear_coefficients(in_size: int, out_size: int) -> Tensor:
    """Pillow's bilinear resampling weights as an out_size x in_size integer matrix.

    Follows ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` of Pillow's
    libImaging/Resample.c: a triangle filter widened by the downscaling factor
    (antialiasing), weights normalised to sum 1 in double precision, then turned into
    fixed point with 22 fractional bits (rounded away from zero). Returned as float64
    holding integers, so matrix products with 8-bit values stay exact.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear filter support is 1
    one = 1 << _PIL_PRECISION_BITS
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C casts truncate toward zero
        xmax = min(int(center + support + 0.5), in_size)
        ks = [max(0.0, 1.0 - abs((x - center + 0.5) / filterscale)) for x in range(xmin, xmax)]
        total = 0.0
        for k in ks:  # same summation order as the C loop
            total += k
        for i, k in enumerate(ks):
            k = k / total if total != 0.0 else k
            weights[xx, xmin + i] = int(k * one + (0.5 if k >= 0 else -0.5))
    return weights


def _pil_pass(values: Tensor, weights: Tensor, dim: int) -> Tensor:
    """One Pillow resampling pass along ``dim`` (-1: width, -2: height) of 8-bit values.

    out = clip8((2^21 + sum_k w_k * v_k) >> 22), computed in float64 where every
    intermediate is an integer below 2^53, hence exact.
    """
    if dim == -2:
        values = values.transpose(-1, -2)
    acc = values @ weights.t()
    out = torch.floor((acc + (1 << (_PIL_PRECISION_BITS - 1))) / (1 << _PIL_PRECISION_BITS)).clamp_(0.0, 255.0)
    return out.transpose(-1, -2) if dim == -2 else out


# Kept hand-written (not torchvision/F.interpolate) for exact SamPredictor parity: Pillow's bit-exact resize.
def pil_bilinear_resize(values: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize 8-bit values (float, B x C x H x W) to ``size`` like PIL's BILINEAR resize.

    SamPredictor resizes with ``torchvision...resize(to_pil_image(image))``, i.e.
    Pillow: a horizontal pass, rounding to uint8, then a vertical pass, in fixed-point
    arithmetic. ``ResizeLongestSide.apply_image_torch`` (``F.interpolate``, float,
    antialias) only approximates that (its docstring says so) and, in
    segment-anything 1.0, computes the target size from the batch and channel
    dimensions instead of H and W (facebookresearch/segment-anything#218). This
    reproduces Pillow bit for bit, batched and on the values' device. Returns float32.
    """
    h, w = values.shape[-2:]
    new_h, new_w = size
    device = values.device
    # MPS has no float64; this step is cheap next to the encoder, so do it on the CPU.
    work_device = torch.device("cpu") if device.type == "mps" else device
    out = values.to(work_device, torch.float64)
    # Pillow skips a pass whose size does not change (its weights would be identity).
    if new_w != w:
        out = _pil_pass(out, _pil_bilinear_coefficients(w, new_w).to(work_device), dim=-1)
    if new_h != h:
        out = _pil_pass(out, _pil_bilinear_coefficients(h, new_h).to(work_device), dim=-2)
    return out.to(device, torch.float32)


def longest_side_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(new_h, new_w) with the longest side ``long_side`` (ResizeLongestSide's rounding)."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


# ---------------------------------------------------------------------------------
# Prompts, in SamPredictor's frame: (x, y) pixel positions in the input image.
# ---------------------------------------------------------------------------------


def center_points(b: int, h: int, w: int) -> tuple[Tensor, Tensor]:
    """One positive point per image at the pixel-grid centre ((W-1)/2, (H-1)/2)."""
    coords = torch.tensor([[(w - 1) / 2.0, (h - 1) / 2.0]], dtype=torch.float64)
    return coords.expand(b, 1, 2).clone(), torch.ones(b, 1, dtype=torch.int)


def margin_boxes(b: int, h: int, w: int, margin: float) -> Tensor:
    """B x 4 boxes (x0, y0, x1, y1): the whole image less ``margin`` of each side.

    margin = 0 gives [0, 0, W-1, H-1], the box of a mask covering every pixel (SAM's
    boxes use inclusive pixel positions).
    """
    box = [margin * w, margin * h, (w - 1) - margin * w, (h - 1) - margin * h]
    return torch.tensor([box], dtype=torch.float64).expand(b, 4).clone()


def peak_points(cam: Tensor, num_points: int = 1) -> tuple[Tensor, Tensor]:
    """Point prompts at the highest local maxima of B x 1 x H x W maps.

    The first point is each map's global argmax (label 1). Further points are the next
    highest strict-or-plateau local maxima (3 x 3 neighbourhood) with a positive value;
    where a map has fewer, the slot gets label -1, SAM's "not a point" padding, so the
    batch keeps one shape. Returns integer coords B x K x 2 (x, y) and labels B x K int.
    """
    b, _, h, w = cam.shape
    flat = cam.flatten(1)
    is_peak = (F.max_pool2d(cam, 3, stride=1, padding=1) == cam).flatten(1) & (flat > 0)
    scores = torch.where(is_peak, flat, torch.full_like(flat, -1.0))
    k = min(num_points, h * w)
    top_scores, top_idx = scores.topk(k, dim=1)
    top_idx[:, 0] = flat.argmax(dim=1)
    labels = torch.where(top_scores > 0, 1, -1).to(torch.int)
    labels[:, 0] = 1
    coords = torch.stack([top_idx % w, top_idx // w], dim=-1)
    return coords, labels


def to_input_frame(coords: Tensor, original_size: tuple[int, int], input_size: tuple[int, int], device: torch.device) -> Tensor:
    """Scale (x, y) coordinates (B x K x 2 points or B x 4 boxes) from the original
    image to the resized encoder input, as float32 on ``device``.

    Like ``ResizeLongestSide.apply_coords``: in float64 (numpy's precision there), then
    float32 for the model. Done on the CPU: a few numbers, and MPS has no float64.
    """
    (old_h, old_w), (new_h, new_w) = original_size, input_size
    scale = torch.tensor([new_w / old_w, new_h / old_h], dtype=torch.float64)
    coords = coords.detach().to("cpu", torch.float64)
    return (coords.reshape(*coords.shape[:-1], -1, 2) * scale).reshape(coords.shape).to(device, torch.float32)




# ---------------------------------------------------------------------------------
# Mask decoding: B images x 1 prompt each.
# ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _known_decoders() -> tuple:
    """``predict_masks`` functions whose computation :func:`_decode_batched` mirrors."""
    known = []
    try:
        from segment_anything.modeling.mask_decoder import MaskDecoder

        known.append(MaskDecoder.predict_masks)
    except ImportError:
        pass
    try:
        from mobile_sam.modeling.mask_decoder import MaskDecoder as MobileMaskDecoder

        known.append(MobileMaskDecoder.predict_masks)
    except Exception:  # not installed, or its optional dependencies (timm) missing
        pass
    return tuple(known)


def _decode_batched(decoder: nn.Module, emb: Tensor, pe: Tensor, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
    """segment-anything's ``MaskDecoder.predict_masks`` with one prompt set per image.

    Upstream repeats the image embeddings once per prompt (``repeat_interleave``), so a
    call with B images and B prompts would decode B x B pairs. Here image i is decoded
    with prompt i only; every other step is the upstream computation.
    """
    b = emb.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    src = emb + dense
    pos_src = pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    _, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_token_out)


def decode_masks(sam: nn.Module, emb: Tensor, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, multimask: bool) -> tuple[Tensor, Tensor]:
    """Low-resolution mask logits B x C x h x w and predicted IoUs B x C.

    Image i gets prompt i. C is 3 with ``multimask`` (SAM's three disambiguated masks)
    and 1 otherwise, as ``MaskDecoder.forward`` selects them. Decoders whose
    ``predict_masks`` is segment-anything's (or MobileSAM's copy of it) run batched;
    any other decoder is called once per image, which is correct for any subclass.
    """
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    pe = sam.prompt_encoder.get_dense_pe()
    decoder = sam.mask_decoder
    if type(decoder).predict_masks in _known_decoders():
        masks, iou = _decode_batched(decoder, emb, pe, sparse, dense)
        sl = slice(1, None) if multimask else slice(0, 1)
        return masks[:, sl], iou[:, sl]
    outs = [
        decoder(
            image_embeddings=emb[i : i + 1],
            image_pe=pe,
            sparse_prompt_embeddings=sparse[i : i + 1],
            dense_prompt_embeddings=dense[i : i + 1],
            multimask_output=multimask,
        )
        for i in range(emb.shape[0])
    ]
    return torch.cat([m for m, _ in outs]), torch.cat([q for _, q in outs])
