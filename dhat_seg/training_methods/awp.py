"""Adversarial Weight Perturbation (AWP; Wu, Xia and Wang, NeurIPS 2020), for any training method.

Official code: csdongxian/AWP (``utils_awp.py``: ``AdvWeightPerturb`` for AT-AWP,
``TradesAWP`` for TRADES-AWP). Per batch, after the adversarial inputs are made on the
current weights w:

1. a proxy copy of the model (kept between batches, reloaded from the model's state each
   batch) takes one plain SGD step on the *negative* training loss, i.e. one ascent step
   on the loss (AT-AWP: -CE(f(x_adv), y); TRADES-AWP: -(CE(f(x), y) + beta KL)); here the
   wrapped method's own loss on the batch;
2. for every weight tensor w_l with more than one dimension (conv and linear weights; not
   biases or BatchNorm affine parameters), d_l = w'_l - w_l is rescaled to the size of the
   layer: v_l = gamma ||w_l|| / (||d_l|| + 1e-20) d_l, so ||v_l|| = gamma ||w_l||;
3. the model's loss is computed and back-propagated at w + v, and the weights go back to w
   before the optimiser steps (the gradient taken at w + v updates w).

Because every v_l is rescaled, the proxy's learning rate does not change v (it cancels;
dhat-seg uses 0.01, as AT-AWP's code; TRADES-AWP's passes the training lr). gamma: 5e-3
for TRADES-AWP (with 10 warm-up epochs without AWP), 1e-2 for AT-AWP (no warm-up).

dhat-seg restores the weights by copying back the saved tensors, not by subtracting v, so
they are bit for bit those before the perturbation (this costs one copy of the perturbed
weights, besides the proxy and v). The proxy's loss runs in the training precision; under
float16 autocast its backward is not loss-scaled (v is rescaled per layer, so only a
gradient that underflows to 0 would matter: that layer is then not perturbed). The proxy's forwards change only the
proxy's BatchNorm statistics, never the model's.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

EPS = 1e-20
#: the proxy optimiser's learning rate (AT-AWP's code; it cancels, see the module doc)
PROXY_LR = 0.01


def perturbed_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters AWP perturbs: trainable ones with more than one dimension."""
    return [(name, p) for name, p in model.named_parameters() if p.dim() > 1 and p.requires_grad]


def relative_perturbation(model: nn.Module, proxy: nn.Module, gamma: float) -> dict[str, Tensor]:
    """v_l = gamma ||w_l|| / (||w'_l - w_l|| + 1e-20) (w'_l - w_l) for every perturbed w_l (see the module doc)."""
    proxy_params = dict(proxy.named_parameters())
    out = {}
    with torch.no_grad():
        for name, w in perturbed_parameters(model):
            d = proxy_params[name].detach() - w.detach()
            out[name] = (gamma * w.norm() / (d.norm() + EPS)) * d
    return out


class AdversarialWeightPerturbation:
    """The AWP adversary of one model: a persistent proxy, its optimiser and ``gamma``."""

    def __init__(self, gamma: float, proxy_lr: float = PROXY_LR):
        self.gamma, self.proxy_lr = gamma, proxy_lr
        self.proxy: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._source: weakref.ref | None = None

    def _proxy_of(self, model: nn.Module) -> nn.Module:
        if self.proxy is None or self._source is None or self._source() is not model:
            self.proxy = copy.deepcopy(model)
            for p in self.proxy.parameters():
                p.grad = None
            self._optimizer = torch.optim.SGD(self.proxy.parameters(), lr=self.proxy_lr)
            self._source = weakref.ref(model)
        self.proxy.load_state_dict(model.state_dict())
        self.proxy.train(model.training)
        return self.proxy

    def compute(self, model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> dict[str, Tensor]:
        """One proxy step on ``-loss_fn(proxy)``; returns the perturbation v (name -> tensor)."""
        proxy = self._proxy_of(model)
        self._optimizer.zero_grad(set_to_none=True)
        (-loss_fn(proxy)).backward()
        self._optimizer.step()
        return relative_perturbation(model, proxy, self.gamma)

    @contextlib.contextmanager
    def perturbed(self, model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> Iterator[dict[str, Tensor]]:
        """The model's weights are w + v inside the block and exactly w again after it (also on errors)."""
        v = self.compute(model, loss_fn)
        params = dict(model.named_parameters())
        saved = {}
        with torch.no_grad():
            for name, delta in v.items():
                saved[name] = params[name].detach().clone()
                params[name].add_(delta.to(params[name].dtype))
        try:
            yield v
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    params[name].copy_(original)
