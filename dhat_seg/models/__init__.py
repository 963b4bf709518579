"""Model registry: classifiers that take images in [0, 1] (normalisation inside).

Every model is a :class:`Classifier`: ``net`` is the architecture, ``cam_layer`` the
layer class-activation methods read (the last convolutional stage), and
``features(x)`` the penultimate features. ``create_model(name, num_classes)`` is the
one way in; ``MODELS`` describes every entry without building it.

Each architecture (``net``) also has ``feature_map(x)`` (its last feature map, before
pooling), ``head`` (its linear classifier) and ``again_entry`` (where its last block's residual
branch starts: (parent module, attribute name) of its first layer); ``<name>_fsr`` is ``<name>``
with the FSR module between the two (:class:`dhat_seg.models.fsr_module.FSRNet`, for method ``fsr``),
``<name>_again`` with AGAIN's auxiliary heads at the entry of its last block and on its last
feature map (:class:`dhat_seg.models.again_net.AgainNet`, for ``--method again`` with ``again.form: code``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg.models.again_net import AgainNet, again_model_name
from dhat_seg.errors import UserError
from dhat_seg.models.fsr_module import FSRNet, fsr_model_name

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


@contextlib.contextmanager
def module_mode(module: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """Put ``module`` in train (``training=True``) or eval mode for a block, then restore.

    Every submodule's own ``training`` flag is restored, not just the top one: a model
    in train mode with, say, frozen BatchNorm layers kept in eval mode must come back
    exactly as it was (``module.train(flag)`` would flip those layers too).
    """
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def frozen_bn_statistics(module: nn.Module, frozen: bool = True) -> Iterator[nn.Module]:
    """Forwards in the block leave BatchNorm running statistics (and counters) untouched.

    Layers in train mode still normalise with the batch's own statistics, as they do in
    the authors' code; only the update of ``running_mean``/``running_var`` is skipped
    (``track_running_stats`` is off for the block, so BN passes no running buffers to
    ``F.batch_norm``). ``frozen=False`` makes this a no-op.
    """
    if not frozen:
        yield module
        return
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield module
    finally:
        for m in layers:
            m.track_running_stats = True


def predicted_labels(classifier: nn.Module, images: Tensor, eval_mode: bool = True) -> Tensor:
    """argmax of the classifier's logits, without gradients, in eval mode by default."""
    with torch.no_grad(), module_mode(classifier, training=not eval_mode):
        return classifier(images).argmax(dim=1)


class Classifier(nn.Module):
    """Normalise, then run ``net``. Inputs are B x 3 x H x W in [0, 1]."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def cam_layer(self) -> nn.Module:
        return self.net.cam_layer

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (input of the last linear layer)."""
        return self.net.features((x - self.mean) / self.std)


# ---------------------------------------------------------------- small CNN (CPU runs)
class SmallCNN(nn.Module):
    """A fast 4-block CNN for CPU runs and tests (about 0.3M parameters)."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(3, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2))
        self.cam_layer = block(4 * width, 4 * width, 1)
        self.fc = nn.Linear(4 * width, num_classes)

    @property
    def head(self) -> nn.Module:
        return self.fc

    @property
    def again_entry(self) -> tuple[nn.Module, str]:
        """The first layer of the last block (AGAIN's code form modulates its input)."""
        return self.cam_layer, "0"

    def feature_map(self, x: Tensor) -> Tensor:
        """The last feature map, before pooling (where FSR is inserted)."""
        return self.cam_layer(self.body(x))

    def features(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.feature_map(x), 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


# ---------------------------------------------------------------- ResNet-18 (CIFAR stem)
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + shortcut


class ResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, no max-pool (He et al. 2016, CIFAR variant)."""

    def __init__(self, block, num_blocks=(2, 2, 2, 2), num_classes=10, preact=False):
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(64)
        cin, layers = 64, []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.final_bn = nn.BatchNorm2d(512) if preact else nn.Identity()
        self.linear = nn.Linear(512, num_classes)

    @property
    def cam_layer(self) -> nn.Module:
        return self.layer4

    @property
    def head(self) -> nn.Module:
        return self.linear

    @property
    def again_entry(self) -> tuple[nn.Module, str]:
        """The first convolution of the residual branch of layer4's last block (AGAIN's code form)."""
        return self.layer4[-1], "conv1"

    def feature_map(self, x: Tensor) -> Tensor:
        """The last feature map, before pooling (where FSR is inserted)."""
        out = self.conv1(x)
        out = out if self.preact else F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.final_bn(out))
        return out

    def features(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.feature_map(x), 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x))


# ---------------------------------------------------------------- Wide ResNet
class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.equal else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis 2016), as used by DHAT (WRN-28-10)."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10):
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths[1:]):
            stage = [WideBlock(cin if j == 0 else width, width, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            blocks.append(nn.Sequential(*stage))
            cin = width
        self.block1, self.block2, self.block3 = blocks
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    @property
    def cam_layer(self) -> nn.Module:
        return self.block3

    @property
    def head(self) -> nn.Module:
        return self.fc

    @property
    def again_entry(self) -> tuple[nn.Module, str]:
        """The first convolution of the residual branch of block3's last block (AGAIN's code form)."""
        return self.block3[-1], "conv1"

    def feature_map(self, x: Tensor) -> Tensor:
        """The last feature map, before pooling (where FSR is inserted)."""
        return F.relu(self.bn(self.block3(self.block2(self.block1(self.conv1(x))))))

    def features(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.feature_map(x), 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


# ---------------------------------------------------------------- registry
@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    builder: Callable[[int], nn.Module]


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry("small_cnn", "4-block CNN, fast on CPU (quick runs, tests)", lambda k: SmallCNN(k)),
        ModelEntry("resnet18", "ResNet-18, CIFAR variant (3x3 stem); the paper's Grad-CAM model", lambda k: ResNet(BasicBlock, num_classes=k)),
        ModelEntry("preact_resnet18", "PreAct ResNet-18", lambda k: ResNet(PreActBlock, num_classes=k, preact=True)),
        ModelEntry("wrn28_10", "WideResNet-28-10 (the paper's main model)", lambda k: WideResNet(28, 10, k)),
        ModelEntry("wrn34_10", "WideResNet-34-10", lambda k: WideResNet(34, 10, k)),
    )
}


def _with_fsr(entry: ModelEntry) -> ModelEntry:
    """``<name>_fsr``: the model with the FSR module after its last stage (dhat_seg/models/fsr_module.py)."""
    return ModelEntry(fsr_model_name(entry.name), f"{entry.description}, with the FSR module after its last stage "
                      "(Kim et al. 2023; method fsr)", lambda k: FSRNet(entry.builder(k), k))


def _with_again(entry: ModelEntry) -> ModelEntry:
    """``<name>_again``: the model with AGAIN's auxiliary heads (dhat_seg/models/again_net.py)."""
    return ModelEntry(again_model_name(entry.name), f"{entry.description}, with AGAIN's auxiliary heads (Yin et al. "
                      "2023, as released; method again with again.form=code)", lambda k: AgainNet(entry.builder(k), k))


_PLAIN = list(MODELS.items())
MODELS.update({fsr_model_name(name): _with_fsr(entry) for name, entry in _PLAIN})
MODELS.update({again_model_name(name): _with_again(entry) for name, entry in _PLAIN})


def create_model(name: str, num_classes: int, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD) -> Classifier:
    """Build a registered model, wrapped with its input normalisation."""
    if name not in MODELS:
        raise UserError(f"model {name!r} is unknown; expected one of {', '.join(MODELS)}")
    if num_classes < 2:
        raise UserError(f"num_classes={num_classes} is invalid; expected at least 2")
    return Classifier(MODELS[name].builder(num_classes), mean, std)
