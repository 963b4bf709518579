"""Attention methods: the objects plugins register, and what dhat-seg does with them.

An attention method turns a batch of clean images (B x 3 x H x W, floats in [0, 1])
and their labels into either

* a soft attention map: float tensor B x 1 x H x W with values in [0, 1], or
* a hard foreground mask: bool tensor B x 1 x H x W (True = foreground),

on the same device as the images. Soft maps are turned into foreground masks by a
threshold policy (:func:`foreground_mask`, the paper's omega). Every result goes
through :func:`validate_attention`, which names the plugin when something is wrong.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor, nn

from dhat_seg.errors import PluginError, UserError

#: Kinds of attention method. "classifier": the map depends on a classifier's weights
#: (Grad-CAM, Integrated Gradients); "image": it depends only on the image and the
#: method's own weights (SAM, SOLO).
KINDS = ("classifier", "image")

#: Which class a classifier-based map explains: the true label (DHAT) or the prediction (PART).
CLASSIFIER_TARGETS = ("label", "pred")


class AttentionFn(Protocol):
    """What an :class:`AttentionSpec` factory builds: called once per batch."""

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor: ...


@dataclass
class AttentionContext:
    """Everything a factory may need to build its attention function.

    dhat-seg builds it from the run's settings (``dhat_seg.attention.model.build_attention``);
    a plugin's unit test builds one by hand, e.g. ``AttentionContext(options=
    spec.resolve_options({}), classifier=model, cam_layer=model.cam_layer)``.

    Attributes:
        options: the method's options, its ``default_options`` updated with the user's.
        device: where images will live.
        classifier: a classifier taking [0, 1] images (normalisation inside), or None.
            For "classifier" methods this is the frozen attention model (the paper's
            separately trained ResNet-18) or the model being trained.
        cam_layer: the layer of ``classifier`` to take class activation maps from
            (the registry's models name theirs ``cam_layer``), or None.
        image_size: (H, W) of the images the function will receive.
        num_classes: number of classes of the dataset.
        config: the run's configuration (a ``TrainConfig``) when the function is built
            for a run, else None; for methods that read the run's data (``oracle``
            takes the ground-truth masks of the samples it is shown).
    """

    options: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    classifier: nn.Module | None = None
    cam_layer: nn.Module | None = None
    image_size: tuple[int, int] = (32, 32)
    num_classes: int = 10
    config: Any = None


@dataclass(frozen=True)
class AttentionSpec:
    """One attention method, as registered by a plugin.

    Attributes:
        name: the name users pass to ``--attention`` (lowercase, no spaces).
        description: one line for ``dhat-seg plugins``.
        factory: ``factory(ctx: AttentionContext) -> AttentionFn``. Heavy imports and
            weight loading belong here, not at plugin import time.
        version: bump it whenever the maps change for the same inputs; it is part of
            the mask-cache key.
        kind: "classifier" or "image" (see :data:`KINDS`).
        default_options: every option the method accepts, with its default. Unknown
            option names are rejected with an error listing these.
        check_ready: ``check_ready(options) -> None | str``: None when the method can
            run with these options, else a message saying what is missing and which
            option provides it (e.g. a checkpoint path).
        uses_classifier: ``uses_classifier(options) -> bool``: whether the method needs
            ``ctx.classifier`` with these options (default: ``kind == "classifier"``);
            e.g. SAM prompted at Grad-CAM peaks needs one although its kind is "image".
        plugin: filled in by dhat-seg: the plugin (distribution) that registered it.
    """

    name: str
    description: str
    factory: Callable[[AttentionContext], AttentionFn]
    version: str = "1"
    kind: str = "classifier"
    default_options: Mapping[str, Any] = field(default_factory=dict)
    check_ready: Callable[[Mapping[str, Any]], str | None] | None = None
    uses_classifier: Callable[[Mapping[str, Any]], bool] | None = None
    plugin: str = ""

    def __post_init__(self):
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise PluginError(f"attention method name {self.name!r} is invalid: use letters, digits, '-' or '_'")
        if self.kind not in KINDS:
            raise PluginError(f"attention method {self.name!r} has kind {self.kind!r}; expected one of {KINDS}")

    def resolve_options(self, user_options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults updated with the user's options; unknown names are an error."""
        options = dict(self.default_options)
        for key, value in (user_options or {}).items():
            if key not in options:
                allowed = ", ".join(sorted(options)) or "none"
                raise UserError(
                    f"attention method {self.name!r} has no option {key!r}; its options are: {allowed}"
                )
            options[key] = _coerce_like(value, options[key], key, self.name)
        return options

    def needs_classifier(self, options: Mapping[str, Any]) -> bool:
        """Whether building this method with ``options`` needs a classifier."""
        if self.uses_classifier is not None:
            return bool(self.uses_classifier(options))
        return self.kind == "classifier"

    def readiness(self, user_options: Mapping[str, Any] | None = None) -> str | None:
        """None when ready, else what is missing."""
        if self.check_ready is None:
            return None
        return self.check_ready(self.resolve_options(user_options))

    def build(self, ctx: AttentionContext) -> AttentionFn:
        """Build the per-batch function; raises UserError when the method is not ready."""
        problem = self.check_ready(ctx.options) if self.check_ready else None
        if problem:
            raise UserError(f"attention method {self.name!r} cannot run: {problem}")
        return self.factory(ctx)

    def with_plugin(self, plugin: str) -> "AttentionSpec":
        return dataclasses.replace(self, plugin=plugin)


def _coerce_like(value: Any, default: Any, key: str = "", method: str = "") -> Any:
    """Options from the command line arrive as strings: convert them to the default's type."""
    if not isinstance(value, str) or default is None or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(type(default), type(default).__name__)
        raise UserError(f"attention method {method!r}: option {key}={value!r} is invalid; expected {expected} "
                        f"(--attention-opt {key}=...)") from None
    return value


def validate_attention(result: Any, images: Tensor, method: str) -> Tensor:
    """Check what an attention function returned; raise a PluginError naming ``method``.

    Accepts a float tensor B x 1 x H x W in [0, 1] or a bool tensor of that shape,
    on the images' device. Returns it unchanged (nothing is clamped or converted).

    Checks, in this order: ``result`` is a ``torch.Tensor``; its shape is
    ``(B, 1, H, W)`` of ``images`` (B x C x H x W); it is on ``images.device``; a bool
    tensor then passes; otherwise it must be floating point, free of NaN and infinity,
    with values in [0, 1] up to 1e-4. dhat-seg calls it on every result (mask-cache
    builds, training with ``mask_source: online``, scoring); plugin tests can call it
    directly: ``validate_attention(fn(images, labels), images, "mymethod")``.
    """
    b, _, h, w = images.shape
    where = f"attention method {method!r}"
    if not isinstance(result, Tensor):
        raise PluginError(f"{where} returned {type(result).__name__}; expected a torch.Tensor of shape {(b, 1, h, w)}")
    if tuple(result.shape) != (b, 1, h, w):
        raise PluginError(f"{where} returned shape {tuple(result.shape)}; expected {(b, 1, h, w)}")
    if result.device != images.device:
        raise PluginError(f"{where} returned a tensor on {result.device}; expected {images.device} (the images' device)")
    if result.dtype == torch.bool:
        return result
    if not result.is_floating_point():
        raise PluginError(f"{where} returned dtype {result.dtype}; expected a float tensor in [0, 1] or a bool mask")
    if not torch.isfinite(result).all():
        raise PluginError(f"{where} returned NaN or infinite values; expected values in [0, 1]")
    lo, hi = float(result.min()), float(result.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise PluginError(f"{where} returned values in [{lo:.4g}, {hi:.4g}]; expected values in [0, 1]")
    return result


# ---------------------------------------------------------------------------------
# Threshold policies: soft attention -> foreground mask (the paper's omega).
# ---------------------------------------------------------------------------------

THRESHOLD_POLICIES = ("fixed", "quantile", "mean", "otsu", "mean_std")


def foreground_mask(attention: Tensor, policy: str = "fixed", omega: float = 0.1, quantile: float = 0.5) -> Tensor:
    """Foreground = attention >= threshold, per image (DHAT eq. for x_B, Alg. 1 l.13).

    Args:
        attention: B x 1 x H x W float in [0, 1], or a bool mask (returned as is).
        policy: "fixed": threshold omega (the authors' code: omega = 0.1 on a min-max
            normalised Grad-CAM); "quantile": each image's ``quantile``-quantile, so a
            fraction 1 - quantile of pixels is foreground; "mean": each image's mean;
            "otsu": each image's Otsu threshold (the paper's "adaptive threshold");
            "mean_std": above each image's mean + standard deviation, strictly (PART: the
            standardised CAM w = (L - mean) / std marks pixels with w > 1 important).
        omega: threshold of the "fixed" policy.
        quantile: quantile of the "quantile" policy.

    Returns:
        bool tensor B x 1 x H x W, True on the foreground.
    """
    if attention.dtype == torch.bool:
        return attention
    flat = attention.flatten(1).float()
    if policy == "fixed":
        threshold = torch.full((flat.shape[0], 1), float(omega), device=flat.device)
    elif policy == "quantile":
        threshold = torch.quantile(flat, float(quantile), dim=1, keepdim=True)
    elif policy == "mean":
        threshold = flat.mean(dim=1, keepdim=True)
    elif policy == "otsu":
        threshold = otsu_threshold(flat)
    elif policy == "mean_std":  # PART's w > 1: strictly above (population std, as numpy's in its code)
        std, mean = torch.std_mean(flat, dim=1, correction=0, keepdim=True)
        return (flat > mean + std).view_as(attention)
    else:
        raise UserError(f"threshold policy {policy!r} is unknown; expected one of {', '.join(THRESHOLD_POLICIES)}")
    return (flat >= threshold).view_as(attention)


def otsu_threshold(flat: Tensor, bins: int = 64) -> Tensor:
    """Per-row Otsu threshold of values in [0, 1] (maximises between-class variance).

    Args:
        flat: B x N values in [0, 1].
    Returns:
        B x 1 thresholds.
    """
    b = flat.shape[0]
    idx = (flat.clamp(0, 1) * (bins - 1)).round().long()
    hist = torch.zeros(b, bins, device=flat.device).scatter_add_(1, idx, torch.ones_like(flat))
    p = hist / hist.sum(dim=1, keepdim=True)
    centres = torch.linspace(0, 1, bins, device=flat.device)
    w0 = p.cumsum(1)
    mu = (p * centres).cumsum(1)
    mu_total = mu[:, -1:]
    w1 = 1 - w0
    between = (mu_total * w0 - mu) ** 2 / (w0 * w1).clamp_min(1e-12)
    between = torch.where((w0 > 0) & (w1 > 0), between, torch.zeros_like(between))
    k = between.argmax(dim=1, keepdim=True)
    # threshold halfway to the next bin so that values in bin k count as background
    return (centres[k] + 0.5 / (bins - 1)).clamp(max=1.0)


def minmax_normalise(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-image min-max normalisation of B x C x H x W maps to [0, 1]."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)


def foreground_iou(predicted: Tensor, truth: Tensor) -> Tensor:
    """Per-image IoU of two bool foreground masks (B x 1 x H x W or B x H x W) -> B.

    An image where both masks are empty scores 1 (they agree).
    """
    p, t = predicted.flatten(1).bool(), truth.flatten(1).bool()
    inter = (p & t).sum(1).float()
    union = (p | t).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
