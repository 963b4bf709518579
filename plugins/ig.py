"""Integrated Gradients attention (Sundararajan et al., 2017) through Captum.

IG attributes the classifier's target logit F_c to every input pixel and channel:

    IG_i(x) = (x_i - x'_i) * integral_0^1 dF_c(x' + a (x - x')) / dx_i da     (eq. 1)

with a baseline image x' (black by default). Captum approximates the integral with
``n_steps`` points (Gauss-Legendre by default), i.e. B * n_steps forward and backward
passes per batch, split into chunks of ``internal_batch_size`` images. Attributions
satisfy completeness, sum_i IG_i(x) = F_c(x) - F_c(x') (Prop. 1), up to that
approximation.

For DHAT the attributions become one map per image: the sum over channels of |IG|,
optionally smoothed by a Gaussian (pixel-level IG is speckled; a blur turns it into
regions before thresholding), min-max normalised per image. The whole batch stays on
its device: no numpy round trip, no per-image loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg.attention import AttentionContext, AttentionSpec, minmax_normalise
from dhat_seg.errors import UserError
from dhat_seg.hookspecs import hookimpl
from dhat_seg.attention import CLASSIFIER_TARGETS as TARGETS
from dhat_seg.models import module_mode, predicted_labels

#: Baselines x': "black" = zeros (the paper's choice for images), "white" = ones,
#: "mean" = each image's mean colour, "blur" = the image under a strong Gaussian blur
#: (sigma = min(H, W) / 8; Sturmfels et al., Distill 2020, "Visualizing the Impact of
#: Feature Attribution Baselines").
BASELINES = ("black", "white", "mean", "blur")
#: Captum's integral approximations (captum.attr._utils.approximation_methods).
METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")
#: internal_batch_size = 0 picks about this many pixels per forward pass (512 images of
#: 32 x 32; ResNet-18 on CIFAR then needs a few GB), and at least one whole batch.
AUTO_PIXELS_PER_PASS = 512 * 32 * 32

DEFAULT_OPTIONS = {
    "baseline": "black",
    "n_steps": 32,
    "internal_batch_size": 0,
    "method": "gausslegendre",
    "target": "label",
    "smooth": 0,
}


def opencv_sigma(kernel_size: int) -> float:
    """OpenCV's sigma for a kernel size, 0.3 ((k - 1) / 2 - 1) + 0.8 (cv2.getGaussianKernel
    with sigma <= 0; for k <= 9 OpenCV itself substitutes fixed binomial tables, which
    this does not). It equals torchvision's default, 0.15 k + 0.35."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_blur(x: Tensor, kernel_size: int, sigma: float | None = None) -> Tensor:
    """Gaussian blur of B x C x H x W, each channel on its own, by
    ``torchvision.transforms.functional.gaussian_blur``, applied separably (a k x 1
    then a 1 x k kernel: 2k instead of k^2 multiplications per pixel, which matters for
    the "blur" baseline's wide kernels on large images).

    ``sigma=None`` derives sigma from the size (:func:`opencv_sigma`), so "smooth=k"
    equals ``cv2.GaussianBlur(m, (k, k), sigma)`` with that sigma. Borders are mirrored
    without repeating the edge (torchvision pads with torch's "reflect" = OpenCV's
    default BORDER_REFLECT_101); when the kernel is wider than the image, which torch's
    reflect padding cannot do, edges are repeated instead (replicate-padded first,
    blurred, cropped back).
    """
    from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

    if kernel_size <= 1:
        return x
    sigma = opencv_sigma(kernel_size) if sigma is None else float(sigma)
    h, w = x.shape[-2:]
    pad = kernel_size // 2
    padded = pad >= min(h, w)
    if padded:
        x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    # torchvision's kernel_size is (width, height); a size-1 kernel is the identity
    x = tv_gaussian_blur(x, [kernel_size, 1], [sigma, sigma])
    x = tv_gaussian_blur(x, [1, kernel_size], [sigma, sigma])
    return x[..., pad : pad + h, pad : pad + w] if padded else x


def make_baseline(images: Tensor, kind: str = "black") -> Tensor:
    """The baseline image x' of each image, same shape, device and dtype (see BASELINES)."""
    if kind == "black":
        return torch.zeros_like(images)
    if kind == "white":
        return torch.ones_like(images)
    if kind == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
    if kind == "blur":
        sigma = min(images.shape[-2:]) / 8
        return gaussian_blur(images, 2 * math.ceil(3 * sigma) + 1, sigma)
    raise UserError(f"ig option baseline={kind!r} is invalid; expected one of {', '.join(BASELINES)}")


def auto_internal_batch_size(batch: int, height: int, width: int, n_steps: int) -> int:
    """Images per forward pass for ``internal_batch_size=0`` (see AUTO_PIXELS_PER_PASS).

    A multiple of ``batch`` (Captum splits along the integration steps, ``internal //
    batch`` steps at a time), never more than the ``batch * n_steps`` images there are.
    """
    steps_per_pass = max(1, AUTO_PIXELS_PER_PASS // max(1, batch * height * width))
    return batch * min(n_steps, steps_per_pass)


def integrated_gradients(
    classifier: nn.Module,
    images: Tensor,
    targets: Tensor,
    baseline: str | Tensor = "black",
    n_steps: int = 32,
    method: str = "gausslegendre",
    internal_batch_size: int = 0,
    eval_mode: bool = True,
) -> Tensor:
    """Raw Integrated Gradients of the target logits, B x C x H x W (eq. 1 above).

    Args:
        classifier: maps [0, 1] images to logits (normalisation inside).
        images: B x C x H x W in [0, 1].
        targets: B class indices.
        baseline: a name from BASELINES, or a tensor broadcastable to ``images``.
        n_steps, method: Captum's integral approximation (see METHODS).
        internal_batch_size: images per forward pass; 0 picks one (auto_internal_batch_size).
        eval_mode: run the classifier in eval mode (BatchNorm must not learn from the
            interpolated images); its train/eval mode is restored afterwards.

    Gradients are taken with ``torch.autograd.grad`` w.r.t. the inputs only, so no
    ``.grad`` is left on the classifier's parameters.
    """
    from captum.attr import IntegratedGradients

    b, _, h, w = images.shape
    base = make_baseline(images, baseline) if isinstance(baseline, str) else baseline.to(images).expand_as(images)
    chunk = internal_batch_size or auto_internal_batch_size(b, h, w, n_steps)
    with torch.enable_grad(), module_mode(classifier, training=not eval_mode):
        attributions = IntegratedGradients(classifier).attribute(
            images,
            baselines=base,
            target=targets.to(images.device),
            n_steps=n_steps,
            method=method,
            # Captum refuses fewer images than one batch per pass (with a warning)
            internal_batch_size=max(int(chunk), b),
        )
    return attributions.detach()


def attribution_map(attributions: Tensor, smooth: int = 0) -> Tensor:
    """One map per image from B x C x H x W attributions: sum_c |IG_c|, optionally
    Gaussian-blurred with an odd kernel of ``smooth`` pixels, min-max normalised per
    image to [0, 1]. Returns float B x 1 x H x W."""
    saliency = attributions.float().abs().sum(dim=1, keepdim=True)
    if smooth:
        saliency = gaussian_blur(saliency, int(smooth))
    return minmax_normalise(saliency, eps=1e-12).clamp_(0.0, 1.0)


class IntegratedGradientsAttention:
    """Per-batch callable built by the ``ig`` spec."""

    def __init__(self, classifier: nn.Module, options: dict):
        self.classifier, self.options = classifier, options

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        o = self.options
        targets = predicted_labels(self.classifier, images) if o["target"] == "pred" else labels.to(images.device)
        attributions = integrated_gradients(
            self.classifier,
            images,
            targets,
            baseline=o["baseline"],
            n_steps=o["n_steps"],
            method=o["method"],
            internal_batch_size=o["internal_batch_size"],
        )
        return attribution_map(attributions, o["smooth"])


def _check_options(options: dict) -> dict:
    """Validate the user's options once, at build time; returns them with ints cast."""

    def choice(name, allowed):
        if options[name] not in allowed:
            raise UserError(f"ig option {name}={options[name]!r} is invalid; expected one of {', '.join(allowed)}")

    def integer(name, low):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"ig option {name}={value!r} is invalid; expected an integer >= {low}")

    choice("target", TARGETS)
    choice("baseline", BASELINES)
    choice("method", METHODS)
    integer("n_steps", 1)
    integer("internal_batch_size", 0)
    integer("smooth", 0)
    if options["smooth"] and options["smooth"] % 2 == 0:
        raise UserError(f"ig option smooth={options['smooth']!r} is invalid; expected 0 (off) or an odd kernel size in pixels")
    if options["method"] == "riemann_trapezoid" and options["n_steps"] < 2:
        raise UserError("ig option n_steps=1 is invalid with method riemann_trapezoid; expected n_steps >= 2")
    return dict(options)


def _build(ctx: AttentionContext) -> IntegratedGradientsAttention:
    if ctx.classifier is None:
        raise UserError("attention method 'ig' needs a classifier: pass --attention-model PATH or let dhat-seg train one")
    options = _check_options({**DEFAULT_OPTIONS, **ctx.options})
    return IntegratedGradientsAttention(ctx.classifier, options)


@hookimpl
def register_attention_methods(register):
    register(
        AttentionSpec(
            name="ig",
            description="Integrated Gradients (Captum) of a frozen, normally trained classifier: sum over channels of |IG|",
            factory=_build,
            version="1",
            kind="classifier",
            default_options=dict(DEFAULT_OPTIONS),
        )
    )
