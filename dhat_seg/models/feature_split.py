"""Where a registry classifier splits: its penultimate features A, its last linear layer W and
its first stage, for methods that work on these pieces (AGAIN, :mod:`dhat_seg.training_methods.again`).

Every model of :data:`dhat_seg.models.MODELS` is a :class:`~dhat_seg.models.Classifier` whose
``net`` has a linear ``head`` on the average-pooled last feature map (``net.features``), so

    logits = head(features(x)) = A W^T + b,   A = model.features(x)  (B x D),  W = head.weight (K x D)

(:func:`penultimate_and_head`). The first stage (:func:`first_stage`) is the block after the
stem: the small CNN's first conv-BN-ReLU block, a ResNet's ``layer1``, a WideResNet's
``block1``; for ``<name>_fsr`` and ``<name>_again`` models, the backbone's. Anything else is refused with a
UserError naming what is supported.
"""

from __future__ import annotations

from torch import Tensor, nn

from dhat_seg.models.again_net import AgainNet
from dhat_seg.errors import UserError
from dhat_seg.models.fsr_module import FSRNet
from dhat_seg.models import Classifier, ResNet, SmallCNN, WideResNet


def _net(model: nn.Module, what: str) -> nn.Module:
    if not isinstance(model, Classifier):
        raise UserError(f"{what} needs a dhat-seg registry model (dhat_seg.models.create_model); got "
                        f"{type(model).__name__}")
    return model.net


def last_linear(model: nn.Module, what: str = "this method") -> nn.Linear:
    """The model's last linear layer W (its ``net.head``)."""
    head = getattr(_net(model, what), "head", None)
    if not isinstance(head, nn.Linear):
        raise UserError(f"{what} needs a model whose classifier is one linear layer on the pooled features; "
                        f"{type(model.net).__name__} has {type(head).__name__}")
    return head


def penultimate_and_head(model: nn.Module, x: Tensor, what: str = "this method") -> tuple[Tensor, nn.Linear]:
    """(A, W): the penultimate features of ``x`` (one forward, B x D) and the last linear layer,
    with ``W(A)`` = ``model(x)``."""
    head = last_linear(model, what)
    return model.features(x), head


def first_stage(model: nn.Module, what: str = "this method") -> nn.Module:
    """The stage after the stem, whose output is a B x C x H x W feature map (see the module doc)."""
    net = _net(model, what)
    if isinstance(net, (FSRNet, AgainNet)):
        net = net.base
    if isinstance(net, SmallCNN):
        return net.body[0]
    if isinstance(net, ResNet):
        return net.layer1
    if isinstance(net, WideResNet):
        return net.block1
    raise UserError(f"{what} cannot find the first stage of {type(net).__name__}; expected one of the registry's "
                    "small CNN, ResNet, PreAct ResNet or WideResNet (or its _fsr or _again variant)")
