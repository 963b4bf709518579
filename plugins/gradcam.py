"""Grad-CAM attention (Selvaraju et al., 2017) through Captum's ``LayerGradCam``.

As in DHAT, the map is taken from a classifier (by default a separately trained and
frozen ResNet-18, see ``dhat_seg.attention.model``) at its last convolutional stage
(``cam_layer``), for the true label, with ReLU, min-max normalised per image and
upsampled bilinearly to the input size. The whole batch stays on its device: no numpy
round trip, no per-image loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg.attention import CLASSIFIER_TARGETS as TARGETS
from dhat_seg.attention import AttentionContext, AttentionSpec, minmax_normalise
from dhat_seg.errors import UserError
from dhat_seg.hookspecs import hookimpl
from dhat_seg.models import module_mode, predicted_labels

def grad_cam(classifier: nn.Module, layer: nn.Module, images: Tensor, targets: Tensor, eval_mode: bool = True) -> Tensor:
    """Grad-CAM maps, B x 1 x H x W in [0, 1].

    ReLU(sum_k alpha_k A^k) with alpha_k the spatial mean of d y_c / d A^k (Selvaraju
    et al., eq. 1-2), normalised per image by (m - min) / (max - min) at the layer's
    resolution, resized bilinearly (half-pixel centres, as cv2.resize) to the image
    size and min-max normalised again: exactly pytorch-grad-cam's order, so that every
    map spans [0, 1] and a fixed threshold (DHAT's omega = 0.1) means the same thing as
    in the authors' code. Gradients are taken with ``torch.autograd.grad`` (by Captum),
    so no ``.grad`` is left on the classifier's parameters. The classifier's train/eval
    mode is set for the call and restored afterwards.
    """
    from captum.attr import LayerGradCam

    with torch.enable_grad(), module_mode(classifier, training=not eval_mode):
        cam = LayerGradCam(classifier, layer).attribute(images, target=targets, relu_attributions=True)
    cam = minmax_normalise(cam.detach().float().sum(dim=1, keepdim=True), eps=1e-7)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    # Bilinear upsampling with half-pixel centres rarely lands on the coarse map's
    # extremes, so the resized map spans less than [0, 1]; renormalise (pytorch-grad-cam
    # does the same in aggregate_multi_layers).
    return minmax_normalise(cam, eps=1e-7).clamp_(0.0, 1.0)


class GradCamAttention:
    """Per-batch callable built by the ``gradcam`` spec."""

    def __init__(self, classifier: nn.Module, layer: nn.Module, target: str):
        self.classifier, self.layer, self.target = classifier, layer, target

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        if self.target == "pred":
            labels = predicted_labels(self.classifier, images)
        return grad_cam(self.classifier, self.layer, images, labels.to(images.device))


def _build(ctx: AttentionContext) -> GradCamAttention:
    if ctx.classifier is None or ctx.cam_layer is None:
        raise UserError("attention method 'gradcam' needs a classifier: pass --attention-model PATH or let dhat-seg train one")
    target = ctx.options["target"]
    if target not in TARGETS:
        raise UserError(f"gradcam option target={target!r} is invalid; expected one of {', '.join(TARGETS)}")
    return GradCamAttention(ctx.classifier, ctx.cam_layer, target)


@hookimpl
def register_attention_methods(register):
    register(
        AttentionSpec(
            name="gradcam",
            description="Grad-CAM (Captum LayerGradCam) of a frozen, normally trained classifier; the paper's default",
            factory=_build,
            # 2: maps are min-max normalised again after resizing (as pytorch-grad-cam)
            version="2",
            kind="classifier",
            default_options={"target": "label"},
        )
    )
