"""SOLO / SOLOv2 attention: the foreground is where an instance segmenter finds objects.

DHAT's Table 10 uses SOLO (Wang et al., 2020) as one of its attention methods. This
plugin runs a COCO-trained SOLO or SOLOv2 (mmdetection model zoo or the original
WXinlong/SOLO release; see :mod:`dhat_seg.plugins.solo_net`, plain torch, no mmcv) on
the clean images and returns a boolean foreground mask, B x 1 x H x W:

* ``mode="union"``: the union of the confident instances: the ``max_instances`` best
  after matrix NMS whose final SOLO score (class score x maskness x NMS decay) is at
  least ``score_thr``;
* ``mode="best"``: the single best such instance.

When no instance is confident for an image (frequent for 32 x 32 CIFAR images, whose
objects are not COCO-like), ``fallback="best"`` (the default) returns the mask of the
grid cell with the highest class score anyway, since an all-background mask makes
DHAT's background image equal to the inverse-adversarial image and its debiasing
terms meaningless; ``fallback="empty"`` returns an all-False mask instead. If even the
best cell's mask is empty after ``mask_thr``, the mask is all-False.

Images are upsampled so that their shorter side is ``input_size`` before the network
(a COCO segmenter sees nothing useful in 32 pixels), normalised as mmdet does (ImageNet
mean/std on 0-255 RGB), and the masks are resized back to the input size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from dhat_seg.attention import AttentionContext, AttentionSpec
from dhat_seg.errors import UserError
from dhat_seg.hookspecs import hookimpl

MODES = ("union", "best")
FALLBACKS = ("best", "empty")
VARIANT_OPTIONS = ("auto", "solo", "solov2")

#: Real mmdetection model-zoo checkpoints (configs/solo/metafile.yml, configs/solov2/metafile.yml).
CHECKPOINT_URLS = {
    "SOLOv2 R50-FPN 3x COCO (mask AP 37.5)": "https://download.openmmlab.com/mmdetection/v2.0/solov2/"
    "solov2_r50_fpn_3x_coco/solov2_r50_fpn_3x_coco_20220512_125856-fed092d4.pth",
    "SOLO R50-FPN 3x COCO (mask AP 35.9)": "https://download.openmmlab.com/mmdetection/v2.0/solo/"
    "solo_r50_fpn_3x_coco/solo_r50_fpn_3x_coco_20210901_012353-11d224d7.pth",
}

DEFAULT_OPTIONS = {
    "checkpoint": "",
    "variant": "auto",
    "depth": 50,
    "input_size": 256,
    "score_thr": 0.1,
    "mask_thr": 0.5,
    "mode": "union",
    "max_instances": 10,
    "fallback": "best",
}


def _download_hint() -> str:
    urls = "; ".join(f"{name}: {url}" for name, url in CHECKPOINT_URLS.items())
    return f"download a checkpoint from the mmdetection model zoo ({urls}) and pass --attention-checkpoint PATH"


def validate_options(options: Mapping[str, Any]) -> None:
    """Raise a UserError naming the first invalid option value."""
    checks = (
        ("variant", options["variant"] in VARIANT_OPTIONS, f"one of {', '.join(VARIANT_OPTIONS)}"),
        ("mode", options["mode"] in MODES, f"one of {', '.join(MODES)}"),
        ("fallback", options["fallback"] in FALLBACKS, f"one of {', '.join(FALLBACKS)}"),
        ("depth", options["depth"] in (18, 34, 50, 101, 152), "one of 18, 34, 50, 101, 152"),
        ("input_size", isinstance(options["input_size"], int) and options["input_size"] >= 0,
         "an integer >= 0 (0 = keep the image size)"),
        ("score_thr", 0.0 <= float(options["score_thr"]) < 1.0, "a number in [0, 1)"),
        ("mask_thr", 0.0 <= float(options["mask_thr"]) < 1.0, "a number in [0, 1)"),
        ("max_instances", isinstance(options["max_instances"], int) and options["max_instances"] >= 1,
         "an integer >= 1"),
    )
    for name, ok, expected in checks:
        if not ok:
            raise UserError(f"solo option {name}={options[name]!r} is invalid; expected {expected}")


def check_ready(options: Mapping[str, Any]) -> str | None:
    """None when a checkpoint file is given and exists, else what to do."""
    path = str(options.get("checkpoint") or "")
    if not path:
        return f"it needs SOLO/SOLOv2 weights: {_download_hint()}"
    if not Path(path).expanduser().is_file():
        return f"checkpoint file {path!r} does not exist: {_download_hint()}"
    return None


def combine_instances(masks: Tensor, mode: str) -> Tensor:
    """One image's instance masks (N x H x W bool, best first) -> H x W foreground."""
    if masks.shape[0] == 0:
        return torch.zeros(masks.shape[1:], dtype=torch.bool, device=masks.device)
    return masks[0] if mode == "best" else masks.any(dim=0)


class SoloAttention:
    """Per-batch callable built by the ``solo`` spec: a frozen SOLO/SOLOv2 model."""

    def __init__(self, model, options: Mapping[str, Any]):
        self.model = model
        self.options = dict(options)
        self.device = next(model.parameters()).device

    def instances(self, images: Tensor):
        """The per-image :class:`~dhat_seg.plugins.solo_net.Instances` of a batch."""
        o = self.options
        return self.model.predict(
            images.to(self.device),
            input_size=int(o["input_size"]),
            score_thr=float(o["score_thr"]),
            mask_thr=float(o["mask_thr"]),
            max_num=1 if o["mode"] == "best" else int(o["max_instances"]),
            # one threshold for "confident": the final score must also pass score_thr
            filter_thr=float(o["score_thr"]),
            fallback_best=o["fallback"] == "best",
        )

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        found = self.instances(images)
        masks = torch.stack([combine_instances(inst.masks, self.options["mode"]) for inst in found])
        return masks.unsqueeze(1).to(images.device)


def build(ctx: AttentionContext) -> SoloAttention:
    """Load the checkpoint once (strict, frozen, eval mode, on ``ctx.device``)."""
    from dhat_seg.plugins.solo_net import build_from_checkpoint

    options = {**DEFAULT_OPTIONS, **ctx.options}
    validate_options(options)
    problem = check_ready(options)
    if problem:
        raise UserError(f"attention method 'solo' cannot run: {problem}")
    model = build_from_checkpoint(Path(options["checkpoint"]).expanduser(), variant=options["variant"],
                                  depth=int(options["depth"]), device=ctx.device)
    return SoloAttention(model, options)


def _check_ready(options: Mapping[str, Any]) -> str | None:
    validate_options({**DEFAULT_OPTIONS, **options})
    return check_ready(options)


@hookimpl
def register_attention_methods(register):
    register(
        AttentionSpec(
            name="solo",
            description="SOLO/SOLOv2 instance segmentation (COCO checkpoint, plain torch): union or best instance mask",
            factory=build,
            version="1",
            kind="image",
            default_options=dict(DEFAULT_OPTIONS),
            check_ready=_check_ready,
        )
    )
