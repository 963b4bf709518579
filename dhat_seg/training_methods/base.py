"""The base class of every training method and the trainer hooks it may override."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from dhat_seg import attacks
from dhat_seg.training_methods.awp import AdversarialWeightPerturbation
from dhat_seg.models import frozen_bn_statistics


def max_abs(logits: Tensor) -> Tensor:
    """Largest |logit| of a batch, detached, in fp32 (a divergence signal)."""
    return logits.detach().abs().max().float()


class TrainingMethod:
    """Base class. ``cfg`` is the run's :class:`dhat_seg.config.TrainConfig`."""

    needs_attention = False

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.eps, self.alpha = cfg.eps / 255, cfg.step_size / 255
        self.inv_eps, self.inv_alpha = cfg.inv_eps / 255, cfg.inv_step_size / 255
        self._awp: AdversarialWeightPerturbation | None = None
        from dhat_seg.training_methods import attack_mode_of  # the registry (the parent package)

        #: the mode every training attack runs in: ``attack_mode``, else the run's method's authors'
        #: (the registry's ``attack_mode``; a base built into UIAT/DHAT/PART/FSR takes the outer method's)
        self.attack_mode = attack_mode_of(cfg)

    def auxiliary(self, model: nn.Module):
        """Context for forwards that must not update BN running statistics (see module doc)."""
        return frozen_bn_statistics(model, frozen=not self.cfg.attack_bn_update)

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor | None = None) -> Tensor:
        """x_adv: PGD on the CE (Madry et al.), under :meth:`auxiliary`, in :attr:`attack_mode`, fp32.
        ``eps``: another radius than ``self.eps`` (a per-sample or per-pixel tensor: PART's budget map)."""
        with self.auxiliary(model):
            return attacks.pgd(model, x, y, self.eps if eps is None else eps, self.alpha, self.cfg.attack_steps,
                               mode=self.attack_mode, precision=self.cfg.attack_precision)

    def prepare(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """What the loss needs that is made without weight gradients (adversarial inputs), on the current weights."""
        return {}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, foreground: Tensor | None,
             prepared: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def warmup_loss(self, model: nn.Module, x: Tensor, y: Tensor,
                    prepared: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss during ``attention_burn_in`` epochs (no masks yet): the method without its attention terms."""
        return self.loss(model, x, y, None, prepared)

    # ---------------------------------------------------------- trainer hooks (all optional)
    # Methods with state across steps (CFA's class-wise calibration and weight average,
    # SGLR's self-distilled teacher) override these; the trainer calls them in this order.
    def on_train_data(self, num_samples: int, batches_per_epoch: int) -> None:
        """Once, when the run is built (before :meth:`on_fit_start`): the training split's size and
        the batches of each epoch (for schedules over iterations: AGAIN's i / N)."""

    def on_fit_start(self, model: nn.Module, state: dict[str, Any] | None) -> None:
        """Before the first epoch; ``state``: this method's :meth:`state_dict` from the resumed checkpoint."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Before ``epoch`` (0-based) is trained."""

    def on_batch_start(self, index: Tensor) -> None:
        """Before each training batch: the dataset indices of its samples (``batch[2]``, on the
        CPU), for methods with per-sample state (SGLR's soft labels)."""

    def after_step(self, model: nn.Module) -> None:
        """After each optimiser step (e.g. an exponential moving average of the weights)."""

    def on_epoch_end(self, model: nn.Module, epoch: int, val_x: Tensor, val_y: Tensor,
                     device: torch.device) -> dict[str, Any]:
        """After ``epoch`` is trained, before validation; returns statistics for the epoch's record."""
        return {}

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        """The model that is validated, selected, checkpointed as ``model.safetensors`` and
        evaluated (e.g. CFA's fairness-aware weight average); default: the trained model."""
        return model

    def state_dict(self) -> dict[str, Any] | None:
        """What :meth:`on_fit_start` needs to resume exactly (tensors and plain types only)."""
        return None

    @contextlib.contextmanager
    def weight_perturbation(self, model: nn.Module, x: Tensor, y: Tensor, foreground: Tensor | None, epoch: int, *,
                            warmup: bool = False, autocast: Callable[[], Any] = contextlib.nullcontext
                            ) -> Iterator[dict[str, Tensor] | None]:
        """AWP around the training step: enter it before the loss, leave it after the backward pass.

        A no-op yielding None unless ``awp`` is on, ``awp_gamma`` > 0 and ``epoch`` (0-based)
        >= ``awp_warmup``. Then: the method's inputs are prepared on the current weights w
        and yielded (pass them to :meth:`loss` / :meth:`warmup_loss`, so the attack runs
        once, on w, as in the official code); a proxy takes one step on the negative loss
        of the same method (:meth:`warmup_loss` when ``warmup``); the model's weights are
        w + v inside the block and exactly w after it. ``autocast``: the context of the
        training forwards (the proxy's loss runs in it, as the model's does).
        """
        c = self.cfg
        if not (c.awp and c.awp_gamma > 0 and epoch >= c.awp_warmup):
            yield None
            return
        with autocast():
            prepared = self.prepare(model, x, y)

        def proxy_loss(proxy: nn.Module) -> Tensor:
            with autocast():
                out = self.warmup_loss(proxy, x, y, prepared) if warmup else self.loss(proxy, x, y, foreground, prepared)
            return out[0]

        if self._awp is None:
            self._awp = AdversarialWeightPerturbation(c.awp_gamma)
        with self._awp.perturbed(model, proxy_loss):
            yield prepared




class OnBase(TrainingMethod):
    """A method built on another method's loss (``self.base``: UIAT, DHAT, PART, FSR): every
    trainer hook goes to the base (CFA's calibration and weight average, SGLR's labels).
    Subclasses that need a hook themselves extend it and call ``super()``."""

    base: TrainingMethod

    def on_train_data(self, num_samples, batches_per_epoch):
        self.base.on_train_data(num_samples, batches_per_epoch)

    def on_fit_start(self, model, state):
        self.base.on_fit_start(model, state)

    def on_epoch_start(self, model, epoch):
        self.base.on_epoch_start(model, epoch)

    def on_batch_start(self, index):
        self.base.on_batch_start(index)

    def after_step(self, model):
        self.base.after_step(model)

    def on_epoch_end(self, model, epoch, val_x, val_y, device):
        return self.base.on_epoch_end(model, epoch, val_x, val_y, device)

    def evaluation_model(self, model):
        return self.base.evaluation_model(model)

    def state_dict(self):
        return self.base.state_dict()
