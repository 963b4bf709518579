"""Segment Anything (Kirillov et al., 2023) as a foreground segmenter, batched.

The paper's best row of Table 10 takes the foreground from SAM. ``SamPredictor`` works
one image at a time (numpy in, PIL resize, one 1024 x 1024 encoder pass, numpy out);
here a whole batch stays on its device:

1. images (float [0, 1]) -> the uint8 values SamPredictor would be given (x * 255,
   rounded), resized so the longest side is the encoder's ``img_size`` with exactly the
   arithmetic of the PIL bilinear resize SamPredictor uses (:func:`pil_bilinear_resize`),
2. ``sam.preprocess`` (normalise, pad), ``sam.image_encoder`` on stacks of
   ``encoder_batch_size`` images,
3. prompt encoder + mask decoder for B images x 1 prompt each (the upstream decoder
   would pair every image with every prompt, see :func:`decode_masks`),
4. the mask with the best predicted IoU (``multimask``), ``sam.postprocess_masks`` back
   to the input size, thresholded at ``sam.mask_threshold``.

The result is a bool B x 1 x H x W mask, equal to what SamPredictor returns for the
same uint8 image and prompt (tests/test_sam.py checks this).

Prompts (option ``prompt``; coordinates follow SamPredictor: (x, y) pixel positions):

* ``center``: one positive point at ((W - 1) / 2, (H - 1) / 2),
* ``box``: the whole image less ``box_margin`` of each side,
* ``peak``: one positive point at the argmax of the Grad-CAM of the attention model
  (``dhat_seg.plugins.gradcam.grad_cam``) for the given labels,
* ``peaks``: the ``num_points`` highest local maxima of that Grad-CAM (fewer when the
  map has fewer; the missing ones are SAM's "not a point" padding, label -1). SAM's
  authors advise a single output mask for several points: ``multimask=false``.

With ``peak``/``peaks`` the masks depend on the attention model as well as the image:
the spec says so (:func:`uses_classifier`), so dhat-seg provides that model and keys
the mask cache by its weights.

Weights come from a local checkpoint only (``--attention-checkpoint PATH``), read with
``torch.load(weights_only=True)``; segment-anything's own builder would unpickle it.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from dhat_seg.attention import AttentionContext, AttentionSpec
from dhat_seg.errors import UserError
from dhat_seg.hookspecs import hookimpl

PROMPTS = ("center", "box", "peak", "peaks")
MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "vit_t")

#: Official checkpoints (file name, URL) per model type.
CHECKPOINTS = {
    "vit_b": ("sam_vit_b_01ec64.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"),
    "vit_l": ("sam_vit_l_0b3195.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth"),
    "vit_h": ("sam_vit_h_4b8939.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"),
    "vit_t": ("mobile_sam.pt", "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"),
}
#: Width of the ViT patch embedding of each official checkpoint (to name a mismatch).
_VIT_WIDTHS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}

SAM_INSTALL = "pip install segment-anything (a dependency of dhat-seg: reinstall dhat-seg)"
MOBILE_SAM_INSTALL = "pip install timm git+https://github.com/ChaoningZhang/MobileSAM.git"

DEFAULT_OPTIONS = {
    "checkpoint": "",
    "model_type": "vit_b",
    "prompt": "center",
    "encoder_batch_size": 8,
    "multimask": True,
    "box_margin": 0.05,
    "num_points": 3,
}

from dhat_seg.plugins.sam_geometry import (  # noqa: E402  (re-exported: tests and benchmarks use them here)
    to_uint8_values,
    pil_bilinear_resize,
    longest_side_shape,
    center_points,
    margin_boxes,
    peak_points,
    to_input_frame,
    _known_decoders,
    decode_masks,
)


# ---------------------------------------------------------------------------------
# The attention function.
# ---------------------------------------------------------------------------------


def _check_options(options: Mapping[str, Any]) -> None:
    """Raise a UserError for an invalid option value (one line, naming it)."""
    if options["prompt"] not in PROMPTS:
        raise UserError(f"sam option prompt={options['prompt']!r} is invalid; expected one of {', '.join(PROMPTS)}")
    if int(options["encoder_batch_size"]) < 1:
        raise UserError(f"sam option encoder_batch_size={options['encoder_batch_size']!r} is invalid; expected an integer >= 1")
    if not 0.0 <= float(options["box_margin"]) < 0.5:
        raise UserError(f"sam option box_margin={options['box_margin']!r} is invalid; expected a fraction in [0, 0.5)")
    if int(options["num_points"]) < 1:
        raise UserError(f"sam option num_points={options['num_points']!r} is invalid; expected an integer >= 1")


class SamAttention:
    """Batched SAM foreground masks: ``fn(images, labels) -> bool B x 1 x H x W``.

    Build it from a checkpoint through the plugin (``dhat-seg ... --attention sam
    --attention-checkpoint PATH``), or from a constructed ``Sam`` with
    :meth:`from_model`. The model is put in eval mode and frozen; it follows the
    images to their device.
    """

    def __init__(
        self,
        sam: nn.Module,
        *,
        prompt: str = "center",
        encoder_batch_size: int = 8,
        multimask: bool = True,
        box_margin: float = 0.05,
        num_points: int = 3,
        classifier: nn.Module | None = None,
        cam_layer: nn.Module | None = None,
    ):
        options = dict(prompt=prompt, encoder_batch_size=encoder_batch_size, box_margin=box_margin, num_points=num_points)
        _check_options(options)
        if prompt in ("peak", "peaks") and (classifier is None or cam_layer is None):
            raise UserError(
                f"sam option prompt={prompt!r} places points at Grad-CAM peaks and needs a classifier: "
                "pass --attention-model PATH or let dhat-seg train an attention model"
            )
        self.sam = sam.eval().requires_grad_(False)
        self.prompt = prompt
        self.encoder_batch_size = int(encoder_batch_size)
        self.multimask = bool(multimask)
        self.box_margin = float(box_margin)
        self.num_points = 1 if prompt == "peak" else int(num_points)
        self.classifier, self.cam_layer = classifier, cam_layer

    @classmethod
    def from_model(cls, sam: nn.Module, **options: Any) -> "SamAttention":
        """Wrap an already constructed ``Sam`` (tests, benchmarks, custom weights).

        ``options`` are the keyword arguments of the constructor.
        """
        return cls(sam, **options)

    def prompts(self, images: Tensor, labels: Tensor) -> tuple[tuple[Tensor, Tensor] | None, Tensor | None]:
        """(points, boxes) for the batch, in the input image's pixel frame."""
        b, _, h, w = images.shape
        if self.prompt == "center":
            return center_points(b, h, w), None
        if self.prompt == "box":
            return None, margin_boxes(b, h, w, self.box_margin)
        from dhat_seg.plugins.gradcam import grad_cam

        cam = grad_cam(self.classifier, self.cam_layer, images, labels.to(images.device).long())
        return peak_points(cam, self.num_points), None

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise UserError(f"sam expects images B x 3 x H x W; got shape {tuple(images.shape)}")
        if self.sam.pixel_mean.device != images.device:
            self.sam.to(images.device)
        b, _, h, w = images.shape
        points, boxes = self.prompts(images, labels)
        input_size = longest_side_shape(h, w, self.sam.image_encoder.img_size)
        if points is not None:
            points = (to_input_frame(points[0], (h, w), input_size, images.device), points[1].to(images.device))
        if boxes is not None:
            boxes = to_input_frame(boxes, (h, w), input_size, images.device)
        out = torch.empty(b, 1, h, w, dtype=torch.bool, device=images.device)
        # no_grad rather than inference_mode: the masks are later used in autograd ops.
        with torch.no_grad():
            for start in range(0, b, self.encoder_batch_size):
                sl = slice(start, start + self.encoder_batch_size)
                pixels = pil_bilinear_resize(to_uint8_values(images[sl]), input_size)
                emb = self.sam.image_encoder(self.sam.preprocess(pixels))
                chunk_points = None if points is None else (points[0][sl], points[1][sl])
                chunk_boxes = None if boxes is None else boxes[sl]
                low_res, iou = decode_masks(self.sam, emb, chunk_points, chunk_boxes, self.multimask)
                # Keep the mask SAM rates best; selecting before upsampling is the same
                # as after (postprocess_masks works channel by channel) and 3x cheaper.
                best = iou.argmax(dim=1)
                low_res = low_res[torch.arange(low_res.shape[0], device=low_res.device), best].unsqueeze(1)
                logits = self.sam.postprocess_masks(low_res, input_size, (h, w))
                out[sl] = logits > self.sam.mask_threshold
        return out


# ---------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------


def _registry(model_type: str):
    """The builder of ``model_type`` (segment-anything, or MobileSAM for vit_t)."""
    if model_type == "vit_t":
        from mobile_sam import sam_model_registry
    else:
        from segment_anything import sam_model_registry
    return sam_model_registry[model_type]


def _missing_dependency(model_type: str) -> str | None:
    try:
        if model_type == "vit_t":
            import mobile_sam  # noqa: F401
        else:
            import segment_anything  # noqa: F401
    except ImportError:
        if model_type == "vit_t":
            return f"model_type 'vit_t' (MobileSAM) needs the mobile_sam package: {MOBILE_SAM_INSTALL}"
        return f"the segment-anything package is not installed: {SAM_INSTALL}"
    return None


def _download_hint(model_type: str) -> str:
    name, url = CHECKPOINTS[model_type]
    return (
        f"download {name} from {url} and pass --attention-checkpoint PATH "
        f"(or choose another size with --attention-opt model_type={'|'.join(MODEL_TYPES)})"
    )


def check_ready(options: Mapping[str, Any]) -> str | None:
    """None when SAM can run with ``options``, else what is missing and how to provide it."""
    model_type = options["model_type"]
    if model_type not in MODEL_TYPES:
        return f"model_type {model_type!r} is unknown; expected one of {', '.join(MODEL_TYPES)} (--attention-opt model_type=...)"
    missing = _missing_dependency(model_type)
    if missing:
        return missing
    checkpoint = str(options["checkpoint"] or "")
    if not checkpoint:
        return f"SAM {model_type} needs its weights: {_download_hint(model_type)}"
    if not os.path.isfile(os.path.expanduser(checkpoint)):
        return f"SAM checkpoint {checkpoint!r} does not exist or is not a file: {_download_hint(model_type)}"
    with open(os.path.expanduser(checkpoint), "rb") as f:
        head = f.read(4)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip format, or a legacy pickle
        return f"{_NOT_SAM.format(path=checkpoint)}: {_download_hint(model_type)}"
    return None


_NOT_SAM = "{path!r} is not a SAM checkpoint; expected a PyTorch state dict file (torch.save, as the official sam_vit_*.pth)"


def read_state_dict(path: str) -> dict[str, Tensor]:
    """A checkpoint's tensors, read without unpickling code (``weights_only=True``).

    Accepts a plain state dict (the official files) or one nested under "model" or
    "state_dict" (common in fine-tuning code).
    """
    try:
        state = torch.load(os.path.expanduser(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{_NOT_SAM.format(path=path)} that loads weights-only: {first}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"SAM checkpoint {path!r} is not a state dict of tensors")
    return state


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], path: str, model_type: str) -> None:
    """A one-line UserError when ``state`` does not fit ``model`` (names and shapes)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        width = state.get("image_encoder.patch_embed.proj.weight")
        guess = _VIT_WIDTHS.get(int(width.shape[0])) if isinstance(width, Tensor) and width.dim() == 4 else None
        hint = f"; it looks like a {guess} checkpoint: pass --attention-opt model_type={guess}" if guess and guess != model_type else ""
        details = "; ".join(
            f"{what} {len(keys)} (e.g. {keys[0]})"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        )
        raise UserError(f"SAM checkpoint {path!r} does not fit model_type {model_type!r}: {details}{hint}")


def load_sam(checkpoint: str, model_type: str = "vit_b") -> nn.Module:
    """Build SAM ``model_type`` without weights and load ``checkpoint`` into it safely.

    The registry builders call an unrestricted ``torch.load`` when given a path, so
    they are called with ``checkpoint=None`` and the weights are loaded here.
    """
    if model_type not in MODEL_TYPES:
        raise UserError(f"sam option model_type={model_type!r} is invalid; expected one of {', '.join(MODEL_TYPES)}")
    missing = _missing_dependency(model_type)
    if missing:
        raise UserError(missing)
    state = read_state_dict(checkpoint)
    builder = _registry(model_type)
    # Check the architecture on a weightless (meta) copy first: a wrong file is then
    # reported at once, without allocating and initialising vit_h's 636M parameters.
    try:
        with torch.device("meta"):
            skeleton, model = builder(checkpoint=None), None
    except Exception:  # a builder that cannot run on meta tensors: check the real model
        skeleton = model = builder(checkpoint=None)
    check_state_dict(skeleton, state, checkpoint, model_type)
    model = model if model is not None else builder(checkpoint=None)
    model.load_state_dict(state)
    return model.eval()


def _global_blocks(depth: int) -> tuple[int, ...]:
    """Blocks with global attention: [2, 5, 8, 11] for depth 12 as in vit_b; the last one below depth 4."""
    if depth < 4:
        return (depth - 1,)
    step = depth // 4
    return tuple(i for i in range(depth) if (i + 1) % step == 0)[-4:]


def random_sam(
    img_size: int = 64,
    patch_size: int = 16,
    embed_dim: int = 32,
    depth: int = 2,
    num_heads: int = 2,
    prompt_dim: int = 32,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised SAM of the official architecture at a chosen size.

    Built from segment-anything's own modules (ImageEncoderViT, PromptEncoder,
    MaskDecoder, TwoWayTransformer) like ``build_sam``, with the encoder's size, depth
    and width as arguments: for tests and benchmarks, where no weights can be fetched.
    ``random_sam(1024, 16, 768, 12, 12, 256)`` has vit_b's shapes.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = img_size // patch_size
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=depth,
                embed_dim=embed_dim,
                img_size=img_size,
                mlp_ratio=4,
                norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
                num_heads=num_heads,
                patch_size=patch_size,
                qkv_bias=True,
                use_rel_pos=True,
                # vit_b/l/h attend globally in every (depth / 4)-th block, windowed elsewhere
                global_attn_indexes=_global_blocks(depth),
                window_size=max(1, min(14, grid // 2)),
                out_chans=prompt_dim,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=prompt_dim,
                image_embedding_size=(grid, grid),
                input_image_size=(img_size, img_size),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=2, embedding_dim=prompt_dim, mlp_dim=8 * prompt_dim, num_heads=max(1, prompt_dim // 32)
                ),
                transformer_dim=prompt_dim,
                iou_head_depth=3,
                iou_head_hidden_dim=prompt_dim,
            ),
        )
    finally:
        torch.random.set_rng_state(generator_state)
    return sam.eval()


# ---------------------------------------------------------------------------------
# The plugin.
# ---------------------------------------------------------------------------------


def _build(ctx: AttentionContext) -> SamAttention:
    options = ctx.options
    _check_options(options)
    if options["prompt"] in ("peak", "peaks") and (ctx.classifier is None or ctx.cam_layer is None):
        raise UserError(
            f"sam option prompt={options['prompt']!r} places points at Grad-CAM peaks and needs a classifier: "
            "pass --attention-model PATH or let dhat-seg train an attention model"
        )
    sam = load_sam(str(options["checkpoint"]), options["model_type"]).to(ctx.device)
    return SamAttention(
        sam,
        prompt=options["prompt"],
        encoder_batch_size=options["encoder_batch_size"],
        multimask=options["multimask"],
        box_margin=options["box_margin"],
        num_points=options["num_points"],
        classifier=ctx.classifier,
        cam_layer=ctx.cam_layer,
    )


def uses_classifier(options: Mapping[str, Any]) -> bool:
    """Whether the prompt reads the attention model: ``peak``/``peaks`` place points at
    its Grad-CAM peaks. Declaring it makes dhat-seg load (or train) that classifier for
    SAM, and puts its weights' SHA-256 in the mask-cache key, so masks prompted by one
    classifier are never reused for another."""
    return options["prompt"] in ("peak", "peaks")


@hookimpl
def register_attention_methods(register):
    register(
        AttentionSpec(
            name="sam",
            description="Segment Anything (vit_b/l/h, or MobileSAM vit_t) masks from a centre, box or Grad-CAM-peak prompt; needs a checkpoint",
            factory=_build,
            version="1",
            kind="image",
            default_options=dict(DEFAULT_OPTIONS),
            check_ready=check_ready,
            uses_classifier=uses_classifier,
        )
    )
