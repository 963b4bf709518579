"""FSR: Feature Separation and Recalibration (Kim, Cho, Jung, Yoon, CVPR 2023), the module.

Sources: the paper (arXiv 2303.13846) and its supplementary (``seeds/002``, tables S1-S7;
REFERENCE section 3), and the authors' code (github.com/wkim97/FSR: ``models/resnet_fsr.py``,
``models/wideresnet34_fsr.py``, ``models/gumbel_sigmoid.py``, ``train.py``), which fixes
every formula below. The loss is in :mod:`dhat_seg.training_methods.fsr`.

The module sits after a network's last stage, on its final feature map f (C x H x W: the
output of ResNet-18's layer4; of a WRN's block3 after its final BN and ReLU, as in the
code; of a PreAct ResNet's final BN and ReLU; of the small CNN's last block), i.e. the map
the network would average-pool into its linear classifier:

* Separation: s = S(f), with S = conv3x3-BN-ReLU, conv3x3-BN-ReLU, conv3x3 (C -> 64 -> 64
  -> C channels, no biases): one robustness score per unit of f. The mask is a
  Gumbel-sigmoid of sigmoid(s) at temperature tau (0.1):
  m = softmax over two of ((log sigma(s) + g1) / tau, (log(1 - sigma(s)) + g2) / tau), first
  entry, with g1, g2 ~ Gumbel(0, 1) in training forwards. That is
  m = sigmoid((s + g1 - g2) / tau), and g1 - g2 is a standard logistic variable, which is
  what dhat-seg draws (log u - log(1 - u), u ~ U(0, 1)). Without noise (the code's
  ``is_eval=True``: both "uniforms" 0.5, so g1 = g2) m = sigmoid(s / tau), deterministic.
  Robust part f+ = m * f, non-robust part f- = (1 - m) * f.
* Recalibration: f~- = f- + R(f-) * (1 - m), R built like S: only the non-robust units
  are changed.
* Output: f~ = f+ + f~- (= f + R(f-) * (1 - m)), average-pooled into the network's own
  linear classifier.
* Auxiliary head: one linear layer (C -> classes), shared, on the average-pooled f+, f-
  and f~-; its logits feed the separation and recalibration losses only.

Departures from the code (dhat-seg's; see also the training method's notes):

* The code adds 1e-8 inside each log and to tau; dhat-seg computes sigmoid((s + L) / tau)
  directly (identical up to those epsilons; they clip the code's logit at about +-18, where
  the mask is saturated anyway).
* Masks are noisy only in train mode *and* outside :func:`deterministic_masks`; eval-mode
  forwards (evaluation, every attack at test time, the sanity checks) are deterministic.
  The code's forward takes an ``is_eval`` flag instead, which its attacks set.
* The code fixes the feature map's H x W when the module is built (a reshape); dhat-seg
  works on any input size. tau is a buffer of the module, so checkpoints carry it.
* The module's convolutions keep PyTorch's default initialisation for every backbone (the
  code's WRN re-initialises them with its He-normal loop).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg.errors import UserError

#: Hidden channels of the separation and recalibration nets (the code's ``num_channel``).
HIDDEN_CHANNELS = 64
#: Temperature of the Gumbel-sigmoid (paper, Fig. S1a; code default).
DEFAULT_TAU = 0.1
#: Suffix of the registry names of models with the FSR module (``resnet18_fsr``, ...).
SUFFIX = "_fsr"


def gumbel_sigmoid(scores: Tensor, tau: float | Tensor, noise: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """m = sigmoid((scores + L) / tau), L standard logistic (the difference of two Gumbel(0, 1)
    draws) when ``noise``, else 0. ``scores`` are logits: sigmoid(scores) is the code's input."""
    if noise:
        u = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=torch.float32)
        u = u.clamp(1e-6, 1 - 1e-6)
        scores = scores + (torch.log(u) - torch.log1p(-u)).to(scores.dtype)
    return torch.sigmoid(scores / tau)


def _conv_net(channels: int, hidden: int) -> nn.Sequential:
    """conv3x3-BN-ReLU, conv3x3-BN-ReLU, conv3x3: channels -> hidden -> hidden -> channels."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, channels, 3, 1, 1, bias=False),
    )


@dataclass
class FSRParts:
    """The intermediate maps of one FSR forward: mask m, f+ = m f, f- = (1 - m) f, f~- and the output f~."""

    mask: Tensor
    robust: Tensor
    non_robust: Tensor
    recalibrated: Tensor
    output: Tensor


@dataclass
class FSROutputs:
    """What the FSR loss reads from one forward: the main logits and the auxiliary head's
    logits on pooled f+ (``robust``), f- (``non_robust``) and f~- (``recalibrated``)."""

    logits: Tensor
    robust: Tensor
    non_robust: Tensor
    recalibrated: Tensor
    mask_mean: Tensor


class FSRModule(nn.Module):
    """Separation, recalibration and the auxiliary head on a C-channel feature map."""

    def __init__(self, channels: int, num_classes: int, hidden: int = HIDDEN_CHANNELS, tau: float = DEFAULT_TAU):
        super().__init__()
        self.separation = _conv_net(channels, hidden)
        self.recalibration = _conv_net(channels, hidden)
        self.aux = nn.Linear(channels, num_classes)
        self.register_buffer("tau", torch.tensor(float(tau)))
        #: Gumbel noise in train-mode forwards (off inside :func:`deterministic_masks`)
        self.noise = True

    def mask(self, f: Tensor) -> Tensor:
        return gumbel_sigmoid(self.separation(f), self.tau, noise=self.training and self.noise)

    def forward(self, f: Tensor) -> FSRParts:
        m = self.mask(f)
        robust, non_robust = f * m, f * (1 - m)
        recalibrated = non_robust + self.recalibration(non_robust) * (1 - m)
        return FSRParts(m, robust, non_robust, recalibrated, robust + recalibrated)

    def aux_logits(self, feature_map: Tensor) -> Tensor:
        return self.aux(F.adaptive_avg_pool2d(feature_map, 1).flatten(1))


class FSRNet(nn.Module):
    """A registry network (``feature_map``, ``head``, ``cam_layer``) with the FSR module
    inserted between its last stage and its pooling + linear classifier. ``forward``
    returns the logits only; inside :func:`recording` each forward also appends its
    :class:`FSROutputs` to the recording list."""

    def __init__(self, base: nn.Module, num_classes: int, hidden: int = HIDDEN_CHANNELS, tau: float = DEFAULT_TAU):
        super().__init__()
        self.base = base
        self.fsr = FSRModule(base.head.in_features, num_classes, hidden, tau)
        self.recording: list[FSROutputs] | None = None

    @property
    def cam_layer(self) -> nn.Module:
        """The backbone's last stage (the FSR module's input)."""
        return self.base.cam_layer

    @property
    def head(self) -> nn.Module:
        return self.base.head

    def feature_map(self, x: Tensor) -> Tensor:
        return self.fsr(self.base.feature_map(x)).output

    def features(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.feature_map(x), 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        parts = self.fsr(self.base.feature_map(x))
        logits = self.base.head(F.adaptive_avg_pool2d(parts.output, 1).flatten(1))
        if self.recording is not None:
            aux = self.fsr.aux_logits
            self.recording.append(FSROutputs(logits, aux(parts.robust), aux(parts.non_robust),
                                             aux(parts.recalibrated), parts.mask.detach().float().mean()))
        return logits


def fsr_nets(model: nn.Module) -> list[FSRNet]:
    return [m for m in model.modules() if isinstance(m, FSRNet)]


def require_fsr(model: nn.Module, what: str = "method 'fsr'") -> FSRNet:
    """The model's single :class:`FSRNet`, or a UserError naming the fix."""
    nets = fsr_nets(model)
    if len(nets) != 1:
        raise UserError(f"{what} needs a model with one FSR module; got {len(nets)}: choose a model named "
                        f"<model>{SUFFIX} (e.g. resnet18{SUFFIX})")
    return nets[0]


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[list[FSROutputs]]:
    """Collect the :class:`FSROutputs` of every forward of ``model`` in the block, in order."""
    net = require_fsr(model)
    saved, net.recording = net.recording, []
    try:
        yield net.recording
    finally:
        net.recording = saved


@contextlib.contextmanager
def deterministic_masks(model: nn.Module) -> Iterator[nn.Module]:
    """Forwards in the block draw no Gumbel noise, in train mode too (the code's attacks)."""
    modules = [m for m in model.modules() if isinstance(m, FSRModule)]
    saved = [m.noise for m in modules]
    for m in modules:
        m.noise = False
    try:
        yield model
    finally:
        for m, flag in zip(modules, saved):
            m.noise = flag


def set_tau(model: nn.Module, tau: float) -> None:
    """Set the Gumbel-sigmoid temperature of every FSR module of ``model`` (saved with the weights)."""
    for m in model.modules():
        if isinstance(m, FSRModule):
            m.tau.fill_(float(tau))


def is_fsr_model(name: str) -> bool:
    return name.endswith(SUFFIX)


def fsr_model_name(name: str) -> str:
    """The registry name of ``name`` with the FSR module (itself if it has one)."""
    return name if is_fsr_model(name) else name + SUFFIX
