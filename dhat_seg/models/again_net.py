"""AGAIN as released (Yin et al., CVPR 2023; github.com/InsLin/AGAIN), the model side: the
auxiliary heads and the channel-wise modulation (models ``<name>_again``). The loss, the
attack and the training schedule are in :mod:`dhat_seg.training_methods.again_code`.

The official model (``AGAIN_with_AWP/models/wideresnet_AGAIN_woHFF.py``, a WRN-34-10) has two
AGAIN sites, each an auxiliary linear layer h (channels -> classes, bias zeroed at init) on a
feature map f (B x C x H x W):

* in the last block of its last stage (``BasicBlock_ASE``, the last block of ``block3``), on
  the input of the block's residual branch, relu(bn1(x)) (the shortcut keeps x);
* after the final BN-ReLU, on the map that is average-pooled into the classifier.

At each site the auxiliary logits are h(mean of f over H x W), and f is multiplied channel by
channel by rows of h's weight matrix W (C values per sample):

    train mode:  f * (0.6 W[y] + 0.4 W[y'])     y' = y[randperm(B)], a fresh permutation per site and forward
    eval mode:   f * W[pred]                     pred = argmax of the site's auxiliary logits

The mask is not detached (W gets gradients through it); the auxiliary logits are computed
before the modulation. The forward returns (logits, [auxiliary logits of the two sites]); the
loss adds their CE (:mod:`~dhat_seg.training_methods.again_code`).

dhat-seg's form of it (:class:`AgainNet`, for every registry model):

* The sites are the entry of the residual branch of the last block of the last stage (the
  model's ``again_entry``: its first convolution, whose input is modulated; the shortcut is
  not) and the last feature map before pooling (``feature_map``), for the WRNs exactly the
  official places. ResNet-18: the last block of ``layer4`` (its input is already a ReLU
  output); PreAct ResNet-18: likewise, after the block's BN-ReLU, and after the final
  BN-ReLU; the small CNN: the input of its last conv-BN-ReLU block (``cam_layer``).
* The forward returns the logits only. The labels of a train-mode forward are given with
  :func:`labelled` (the mixing weight 0.6 is ``again.alpha``); a train-mode forward without
  labels (none of dhat-seg's code-form passes makes one) modulates with W[pred], as eval mode.
  :func:`recording` collects each forward's auxiliary logits.
* The auxiliary heads have ``num_classes`` outputs (the official ones are fixed at 10, so its
  CIFAR-100 option cannot run); y' is drawn with torch's global CPU generator (the trainer
  reseeds it per epoch, so runs repeat and resume exactly).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg.errors import UserError

#: Suffix of the registry names of models with AGAIN's auxiliary heads (``resnet18_again``, ...).
SUFFIX = "_again"
#: The true label's share of the training mask (the official 0.6; ``again.alpha``).
DEFAULT_ALPHA = 0.6


class AgainGate(nn.Module):
    """One AGAIN site: an auxiliary linear head on the pooled map and the channel-wise modulation
    of the map by rows of its weight matrix (see the module doc)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)
        nn.init.zeros_(self.fc.bias)  # the official init loop zeroes every linear bias
        #: labels of the current train-mode forwards (:func:`labelled`), their share alpha
        self.labels: Tensor | None = None
        self.alpha = DEFAULT_ALPHA
        #: whether forwards keep their auxiliary logits (:func:`recording`)
        self.keep = False
        self._kept: Tensor | None = None

    def mask(self, logits: Tensor) -> Tensor:
        """The B x C channel weights: alpha W[y] + (1 - alpha) W[y[perm]] in train mode with labels, else W[pred]."""
        w = self.fc.weight
        if self.training and self.labels is not None:
            y = self.labels
            if y.shape[0] != logits.shape[0]:
                raise UserError(f"AGAIN's modulation got {y.shape[0]} labels for a batch of {logits.shape[0]}; "
                                "expected one label per sample of the labelled forward")
            fake = y[torch.randperm(y.shape[0]).to(y.device)]
            return self.alpha * w[y] + (1 - self.alpha) * w[fake]
        return w[logits.argmax(dim=1)]

    def forward(self, f: Tensor) -> Tensor:
        logits = self.fc(f.mean(dim=(2, 3)))
        if self.keep:
            self._kept = logits
        return f * self.mask(logits)[:, :, None, None].to(f.dtype)

    def take(self) -> Tensor:
        """The auxiliary logits of the last forward (kept since :func:`recording` began), then forgotten."""
        if self._kept is None:
            raise UserError("AGAIN's auxiliary head kept no logits; expected a forward inside recording(model)")
        out, self._kept = self._kept, None
        return out


class Gated(nn.Module):
    """``layer`` whose input first passes an :class:`AgainGate`."""

    def __init__(self, gate: AgainGate, layer: nn.Module):
        super().__init__()
        self.gate, self.layer = gate, layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.gate(x))


@dataclass
class AgainOutputs:
    """One forward: the logits and the auxiliary logits of the sites, in the official order
    (the last block's, then the final map's)."""

    logits: Tensor
    aux: tuple[Tensor, ...]


class AgainNet(nn.Module):
    """A registry network (``feature_map``, ``head``, ``cam_layer``, ``again_entry``) with an
    AGAIN site at the entry of its last block's residual branch and one on its last feature map."""

    def __init__(self, base: nn.Module, num_classes: int):
        super().__init__()
        parent, name = base.again_entry
        entry = getattr(parent, name)
        setattr(parent, name, Gated(AgainGate(entry.in_channels, num_classes), entry))
        self.base = base
        self.gate = AgainGate(base.head.in_features, num_classes)
        self.recording: list[AgainOutputs] | None = None

    @property
    def cam_layer(self) -> nn.Module:
        return self.base.cam_layer

    @property
    def head(self) -> nn.Module:
        return self.base.head

    def gates(self) -> list[AgainGate]:
        """The sites in forward order: the last block's, then the final map's."""
        return [m for m in self.modules() if isinstance(m, AgainGate)]

    def feature_map(self, x: Tensor) -> Tensor:
        return self.gate(self.base.feature_map(x))

    def features(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.feature_map(x), 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.base.head(self.features(x))
        if self.recording is not None:
            self.recording.append(AgainOutputs(logits, tuple(g.take() for g in self.gates())))
        return logits


def require_again(model: nn.Module, what: str = "AGAIN's code form") -> AgainNet:
    """The model's single :class:`AgainNet`, or a UserError naming the fix."""
    nets = [m for m in model.modules() if isinstance(m, AgainNet)]
    if len(nets) != 1:
        raise UserError(f"{what} needs a model with AGAIN's auxiliary heads; got {len(nets)}: choose a model named "
                        f"<model>{SUFFIX} (e.g. resnet18{SUFFIX})")
    return nets[0]


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[list[AgainOutputs]]:
    """Collect the :class:`AgainOutputs` of every forward of ``model`` in the block, in order."""
    net = require_again(model)
    gates = net.gates()
    saved = net.recording, [g.keep for g in gates]
    net.recording = []
    for g in gates:
        g.keep = True
    try:
        yield net.recording
    finally:
        net.recording = saved[0]
        for g, keep in zip(gates, saved[1]):
            g.keep, g._kept = keep, None


@contextlib.contextmanager
def labelled(model: nn.Module, y: Tensor, alpha: float = DEFAULT_ALPHA) -> Iterator[nn.Module]:
    """Train-mode forwards in the block modulate with alpha W[y] + (1 - alpha) W[y[perm]]."""
    gates = require_again(model).gates()
    saved = [(g.labels, g.alpha) for g in gates]
    for g in gates:
        g.labels, g.alpha = y, float(alpha)
    try:
        yield model
    finally:
        for g, (labels, a) in zip(gates, saved):
            g.labels, g.alpha = labels, a


def is_again_model(name: str) -> bool:
    return name.endswith(SUFFIX)


def again_model_name(name: str) -> str:
    """The registry name of ``name`` with AGAIN's auxiliary heads (itself if it has them)."""
    return name if is_again_model(name) else name + SUFFIX
