"""Reference tests of the two classifier-based attention plugins, gradcam and ig.

* Grad-CAM against pytorch-grad-cam (PyPI ``grad-cam``), the implementation the DHAT
  authors' omega = 0.1 threshold was tuned on.
* Integrated Gradients against a direct Captum ``IntegratedGradients`` call reduced by
  hand, against the completeness axiom (Sundararajan et al. 2017, Prop. 1), and its
  blurs against OpenCV and against the hand-written blur torchvision replaced.
* The plugin contract: classifier modes restored, no parameter gradients left behind,
  results pass ``validate_attention`` on the images' device, user mistakes -> UserError.

Tiny, randomly initialised models trained for a few steps on random data (so that the
maps are not degenerate); no downloads.
"""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dhat_seg.attention import AttentionContext, AttentionSpec, validate_attention
from dhat_seg.errors import UserError
from dhat_seg.plugins import gradcam, ig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    """Three conv-BN-ReLU stages (stride 4 overall), global pooling, linear head; takes
    [0, 1] images (normalisation inside, like the registry's models)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def stage(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(stage(3, 16, 1), stage(16, 32, 2), stage(32, 32, 2))
        self.cam_layer = self.features[-1]
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.features((x - 0.5) / 0.25)
        return self.head(x.mean(dim=(2, 3)))


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem (3x3 conv, no max-pool): layer4 is 4x4 at 32x32."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.cam_layer = model.layer4
    return model


def _train_a_little(model: nn.Module, images, labels, steps: int, lr: float) -> nn.Module:
    """A few SGD steps so that the classifier is not at its symmetric random start."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    """(model, images, labels); non-square 20 x 28 images -> a 5 x 7 CAM layer."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    images = torch.rand(6, 3, 20, 28, generator=g)
    labels = torch.randint(0, 10, (6,), generator=g)
    return _train_a_little(TinyCNN(), images, labels, steps=10, lr=0.05), images, labels


@pytest.fixture(scope="module")
def resnet():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    images = torch.rand(4, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (4,), generator=g)
    return _train_a_little(cifar_resnet18(), images, labels, steps=3, lr=0.02), images, labels


def _spec(module) -> AttentionSpec:
    """The single spec a plugin module registers (without the plugin manager, so that
    these tests do not depend on the other built-in plugins)."""
    specs = []
    module.register_attention_methods(register=specs.append)
    assert len(specs) == 1
    return specs[0]


def _attention_fn(module, model, options=None, device="cpu", image_size=(32, 32)):
    spec = _spec(module)
    ctx = AttentionContext(
        options=spec.resolve_options(options or {}),
        device=torch.device(device),
        classifier=model,
        cam_layer=getattr(model, "cam_layer", None),
        image_size=image_size,
    )
    return spec.build(ctx)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ---------------------------------------------------------------------------------
# 1. Grad-CAM == pytorch-grad-cam
# ---------------------------------------------------------------------------------


def _reference_grad_cam(model, images, labels) -> np.ndarray:
    """pytorch-grad-cam on a copy (it calls model.eval(), fills .grad and keeps hooks)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ref_model = copy.deepcopy(model)
    with GradCAM(model=ref_model, target_layers=[ref_model.cam_layer]) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in labels])


@pytest.mark.parametrize("which", ["tiny", "resnet"])
def test_grad_cam_matches_pytorch_grad_cam(which, request):
    model, images, labels = request.getfixturevalue(which)
    ours = gradcam.grad_cam(model, model.cam_layer, images, labels)
    ref = _reference_grad_cam(model, images, labels)

    assert ours.shape == (images.shape[0], 1, *images.shape[-2:]) and ref.shape == (images.shape[0], *images.shape[-2:])
    ours = ours[:, 0].numpy()
    for i in range(len(ref)):
        # the maps must not be degenerate, or the comparison proves nothing
        assert ref[i].std() > 0.05, f"image {i}: reference CAM is nearly constant"
        assert _pearson(ours[i], ref[i]) >= 0.99, f"image {i}"
    # same order of operations (min-max, cv2-style bilinear resize, min-max): same values
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert ours.min() == 0.0 and np.allclose(ours.reshape(len(ours), -1).max(1), 1.0)


def test_grad_cam_targets_matter(tiny):
    """A different target class gives a different map (the target is really used)."""
    model, images, labels = tiny
    a = gradcam.grad_cam(model, model.cam_layer, images, labels)
    b = gradcam.grad_cam(model, model.cam_layer, images, (labels + 1) % 10)
    ref_b = _reference_grad_cam(model, images, (labels + 1) % 10)
    np.testing.assert_allclose(b[:, 0].numpy(), ref_b, atol=1e-4)
    assert (a - b).abs().amax() > 0.1


# ---------------------------------------------------------------------------------
# 2. IG == Captum, reduced by hand
# ---------------------------------------------------------------------------------


def _reduce_by_hand(attributions: torch.Tensor, smooth: int = 0) -> torch.Tensor:
    """sum_c |a| then per-image (m - min) / (max - min), written out independently."""
    m = attributions.abs().sum(dim=1, keepdim=True)
    if smooth:
        sigma = 0.3 * ((smooth - 1) * 0.5 - 1) + 0.8
        m = torch.from_numpy(
            np.stack([cv2.GaussianBlur(img[0].numpy(), (smooth, smooth), sigma, borderType=cv2.BORDER_REFLECT_101)
                      for img in m])[:, None]
        )
    lo = m.amin(dim=(1, 2, 3), keepdim=True)
    hi = m.amax(dim=(1, 2, 3), keepdim=True)
    return (m - lo) / (hi - lo)


@pytest.mark.parametrize(
    "options, captum_kwargs",
    [
        ({"n_steps": 16}, {"baselines": 0.0, "n_steps": 16}),
        ({"n_steps": 8, "method": "riemann_trapezoid"}, {"baselines": 0.0, "n_steps": 8, "method": "riemann_trapezoid"}),
        ({"n_steps": 8, "baseline": "white"}, {"baselines": 1.0, "n_steps": 8}),
        ({"n_steps": 8, "smooth": 5}, {"baselines": 0.0, "n_steps": 8}),
    ],
)
def test_ig_matches_captum(tiny, options, captum_kwargs):
    from captum.attr import IntegratedGradients

    model, images, labels = tiny
    ours = _attention_fn(ig, model, options)(images, labels)
    raw = IntegratedGradients(model).attribute(images, target=labels, **captum_kwargs).detach()
    expected = _reduce_by_hand(raw, options.get("smooth", 0))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_ig_mean_and_blur_baselines(tiny):
    """'mean' is each image's mean colour; 'blur' is OpenCV's Gaussian blur, sigma = min(H, W) / 8."""
    from captum.attr import IntegratedGradients

    model, images, labels = tiny
    mean = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    torch.testing.assert_close(ig.make_baseline(images, "mean"), mean)
    ref_attr = IntegratedGradients(model).attribute(images, baselines=mean, target=labels, n_steps=8)
    torch.testing.assert_close(
        ig.integrated_gradients(model, images, labels, "mean", n_steps=8), ref_attr.detach(), atol=1e-6, rtol=1e-4
    )

    sigma = min(images.shape[-2:]) / 8
    k = 2 * int(np.ceil(3 * sigma)) + 1
    ref_blur = np.stack([
        np.stack([cv2.GaussianBlur(ch.numpy(), (k, k), sigma, borderType=cv2.BORDER_REFLECT_101) for ch in img])
        for img in images
    ])
    np.testing.assert_allclose(ig.make_baseline(images, "blur").numpy(), ref_blur, atol=1e-5)


def test_ig_chunking_does_not_change_the_result(tiny):
    """internal_batch_size only splits the integration steps into passes."""
    model, images, labels = tiny
    b = images.shape[0]
    one_pass = ig.integrated_gradients(model, images, labels, n_steps=12, internal_batch_size=b * 12)
    for chunk in (0, 1, b, 5 * b):  # auto, smaller than a batch (clamped), 1 step, uneven split
        torch.testing.assert_close(
            ig.integrated_gradients(model, images, labels, n_steps=12, internal_batch_size=chunk), one_pass,
            atol=1e-6, rtol=1e-4,
        )


def test_auto_internal_batch_size():
    assert ig.auto_internal_batch_size(128, 32, 32, 32) == 512  # 4 steps per pass
    assert ig.auto_internal_batch_size(4, 16, 16, 32) == 4 * 32  # everything in one pass
    assert ig.auto_internal_batch_size(2, 224, 224, 32) == 2 * 5
    assert ig.auto_internal_batch_size(128, 224, 224, 32) == 128  # at least one batch


def test_gaussian_blur_follows_opencv_size_rule():
    """smooth=k blurs with OpenCV's kernel for size k (sigma from the size): the blur of
    a centred delta is the outer product of cv2.getGaussianKernel(k, 0)."""
    for k in (11, 15):
        delta = torch.zeros(1, 1, 2 * k + 1, 2 * k + 1, dtype=torch.float64)
        delta[..., k, k] = 1.0
        g = cv2.getGaussianKernel(k, 0)[:, 0]
        blurred = ig.gaussian_blur(delta, k)[0, 0, k - k // 2 : k + k // 2 + 1, k - k // 2 : k + k // 2 + 1]
        np.testing.assert_allclose(blurred.numpy(), np.outer(g, g), atol=1e-12)


def _hand_written_gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float | None = None) -> torch.Tensor:
    """The separable blur ig.py used before it called torchvision (kept as the reference)."""
    if kernel_size <= 1:
        return x
    if sigma is None:
        sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    c, (h, w) = x.shape[1], x.shape[-2:]
    t = torch.arange(kernel_size, dtype=x.dtype) - (kernel_size - 1) / 2
    g = torch.exp(-(t**2) / (2 * float(sigma) ** 2))
    g = g / g.sum()
    pad = kernel_size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect" if pad < min(h, w) else "replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


#: Bound on |torchvision - hand-written| for values in [0, 1]: rounding only (same
#: separable passes in the same order; torchvision builds the kernel with linspace, the
#: old code with arange); measured max abs diff over the cases below 1.8e-7 in float32,
#: 3.3e-16 in float64.
BLUR_MAX_ABS_DIFF = {torch.float32: 1e-6, torch.float64: 1e-14}


@pytest.mark.parametrize(
    "shape, kernel_size, sigma",
    [
        ((4, 3, 32, 32), 25, 4.0),  # the 'blur' baseline at 32 x 32: sigma = 32 / 8, k = 2 ceil(3 sigma) + 1
        ((4, 3, 20, 28), 17, 2.5),  # non-square, the 'blur' baseline of 20 x 28
        ((4, 1, 32, 32), 5, None),  # smooth=5 (sigma from the size)
        ((2, 1, 32, 32), 31, None),  # smooth=31: pad 15 < 32, reflect
        ((2, 1, 8, 12), 17, None),  # kernel wider than the image: edges repeated
        ((2, 1, 1, 1), 3, 0.125),  # the 'blur' baseline of a 1 x 1 image
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torchvision_blur_equals_the_hand_written_one(shape, kernel_size, sigma, dtype):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(kernel_size), dtype=dtype)
    ours = ig.gaussian_blur(x, kernel_size, sigma)
    reference = _hand_written_gaussian_blur(x, kernel_size, sigma)
    assert ours.shape == x.shape and ours.dtype == x.dtype
    assert (ours - reference).abs().max().item() <= BLUR_MAX_ABS_DIFF[dtype]


# ---------------------------------------------------------------------------------
# 4. completeness: sum_i IG_i = F(x) - F(x')
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["black", "white", "mean"])
def test_ig_completeness(tiny, baseline):
    model, images, labels = tiny
    attributions = ig.integrated_gradients(model, images, labels, baseline, n_steps=64)
    assert attributions.shape == images.shape
    with torch.no_grad():
        f = lambda x: model(x).gather(1, labels[:, None])[:, 0]  # noqa: E731
        gap = f(images) - f(ig.make_baseline(images, baseline))
    total = attributions.flatten(1).sum(dim=1)
    assert gap.abs().min() > 1e-3, "degenerate case: F(x) = F(baseline)"
    torch.testing.assert_close(total, gap, atol=2e-3, rtol=5e-2)


# ---------------------------------------------------------------------------------
# 3. the plugin contract
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("module, options", [(gradcam, {}), (gradcam, {"target": "pred"}),
                                             (ig, {"n_steps": 4}), (ig, {"n_steps": 4, "target": "pred", "smooth": 3})])
def test_contract(tiny, module, options, device):
    model, images, labels = tiny
    model = copy.deepcopy(model).to(device)
    images, labels = images.to(device), labels.to(device)
    # train mode, with one BatchNorm deliberately frozen in eval mode: all flags must survive
    model.train()
    model.features[0][1].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    stats = {k: v.clone() for k, v in model.state_dict().items()}

    fn = _attention_fn(module, model, options, device=device, image_size=tuple(images.shape[-2:]))
    with torch.no_grad():  # a trainer may well call it inside no_grad
        out = fn(images, labels)

    validate_attention(out, images, module.__name__)
    assert out.dtype == torch.float32 and out.device == images.device
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    # run in eval mode: BatchNorm statistics (and all weights) untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k
    per_image = out.flatten(1)
    assert torch.allclose(per_image.amin(1), torch.zeros(1, device=device))
    assert torch.allclose(per_image.amax(1), torch.ones(1, device=device))


@pytest.mark.parametrize("module, options", [(gradcam, {}), (ig, {"n_steps": 4})])
def test_pred_target_is_the_argmax(tiny, module, options):
    model, images, labels = tiny
    with torch.no_grad():
        pred = model(images).argmax(1)
    wrong = (pred + 1) % 10  # labels that the "pred" target must ignore
    by_pred = _attention_fn(module, model, {**options, "target": "pred"})(images, wrong)
    by_label = _attention_fn(module, model, options)(images, pred)
    torch.testing.assert_close(by_pred, by_label)


@pytest.mark.parametrize("module", [gradcam, ig])
def test_frozen_classifier(tiny, module):
    """The attention model is frozen (requires_grad False): gradients still flow."""
    model, images, labels = tiny
    model = copy.deepcopy(model).requires_grad_(False)
    out = _attention_fn(module, model, {"n_steps": 4} if module is ig else {})(images, labels)
    validate_attention(out, images, module.__name__)
    assert out.flatten(1).amax(1).min() == 1.0


@pytest.mark.parametrize("module", [gradcam, ig])
def test_missing_classifier(module):
    spec = _spec(module)
    with pytest.raises(UserError, match="needs a classifier"):
        spec.build(AttentionContext(options=spec.resolve_options({})))


@pytest.mark.parametrize(
    "module, options, match",
    [
        (gradcam, {"target": "foo"}, "target='foo'"),
        (ig, {"target": "foo"}, "target='foo'"),
        (ig, {"baseline": "grey"}, "baseline='grey'"),
        (ig, {"method": "simpson"}, "method='simpson'"),
        (ig, {"n_steps": "0"}, "n_steps=0"),
        (ig, {"internal_batch_size": -1}, "internal_batch_size=-1"),
        (ig, {"smooth": 4}, "smooth=4"),
        (ig, {"smooth": "x"}, "'x'"),
        (ig, {"n_steps": 1, "method": "riemann_trapezoid"}, "n_steps=1"),
        (ig, {"steps": 8}, "no option 'steps'"),
    ],
)
def test_bad_options(tiny, module, options, match):
    model = tiny[0]
    with pytest.raises(UserError, match=match):
        _attention_fn(module, model, options)


def test_options_from_the_command_line_are_coerced(tiny):
    """--attention-opt values arrive as strings."""
    model, images, labels = tiny
    spec = _spec(ig)
    assert spec.kind == "classifier" and spec.name == "ig"
    assert set(spec.default_options) == {"baseline", "n_steps", "internal_batch_size", "method", "target", "smooth"}
    a = _attention_fn(ig, model, {"n_steps": "4", "smooth": "3", "internal_batch_size": "0"})(images, labels)
    b = _attention_fn(ig, model, {"n_steps": 4, "smooth": 3})(images, labels)
    torch.testing.assert_close(a, b)
