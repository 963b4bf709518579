"""AGAIN as the authors released it (``--method again --set again.form=code``; compare row
``again-code``, "AT+AGAIN (as released)"): the training method. The model side (auxiliary
heads, channel-wise modulation) is :mod:`dhat_seg.models.again_net`, the paper's form
:mod:`.again`.

Source: github.com/InsLin/AGAIN (the only training script, ``AGAIN_with_AWP/
train_awp_again_cifar.py``; its model ``AGAIN_with_AWP/models/wideresnet_AGAIN_woHFF.py``;
``AGAIN_with_AWP/utils_awp.py``; the evaluation ``AGAIN_with_AWP/attack_generator.py``). It
produced the authors' numbers, and it departs from the supplementary's Algorithm 1:

* No i / N schedule: every batch trains with the mechanism.
* The mechanism is not a mix of the last layer's logits but the channel-wise modulation of
  two feature maps by 0.6 W[y] + 0.4 W[y'] of auxiliary linear heads (W[pred] in eval mode;
  :class:`dhat_seg.models.again_net.AgainGate`), y' = y[randperm(B)] (it can equal y).
* Loss (:func:`code_loss`), on the train-mode forward of x_adv with the labels:

      L = CE(f(x_adv), y) + 2 x mean over the sites of CE(h_site(x_adv), y)

* The attack (:meth:`AGAINCode.adversarial`): ``model.eval()``; start x + 0.001 N(0, 1) (not
  clamped before the first step); ``attack_steps`` signed steps of ``step_size`` up the same
  L of the eval-mode forward (so with W[pred] masks), projected onto the eps-ball and [0, 1].
* AWP always on: ``--awp-gamma 0.005``, ``--awp-warmup 10``, the proxy's loss the negated L in
  train mode with the labels. The script compares its 1-based epoch with the warm-up
  (``if epoch >= args.awp_warmup``), so AWP starts in its 10th epoch, after 9 without.
  dhat-seg's trainer compares 0-based epochs with ``awp_warmup``, so the release's start is
  ``awp_warmup: 9`` at its 200 epochs; ``dhat-seg train`` and the compare row fill in
  ``awp: true``, ``awp_gamma: 0.005`` and that warm-up scaled to the run's epochs (9 of 200,
  :func:`dhat_seg.method_defaults.again_code_settings`) wherever the user leaves them out.
* HFF is defined in the model file and never called: the released results are without it,
  and so is this form by default (``again.hff`` null); ``--set again.hff=true`` adds it
  (:func:`~dhat_seg.training_methods.again_hff.fused_first_stage`) to the training forward.

Where dhat-seg departs from the release: the heads exist on every registry model
(``<name>_again``; sites in :mod:`dhat_seg.models.again_net`) and have one output per class (the
release's are fixed at 10); the mask's alpha is ``again.alpha`` (default 0.6, the release's
constant); the attack runs in eval mode as released (AGAIN's registry default; ``attack_mode`` overrides it); the
training recipe is the run's (the release: 200 epochs, lr 0.1 decayed x0.1 at 100 and 150,
batch 128, SGD momentum 0.9, weight decay 5e-4, no validation split; dhat-seg selects the
checkpoint on its validation split); the evaluation attacks (PGD, C&W, AutoAttack) read the
main logits only, while the release's ``attack_generator.py`` adds the auxiliary term to its
PGD and C&W objectives.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from dhat_seg import attacks
from dhat_seg.models.again_net import AgainOutputs, again_model_name, is_again_model, labelled, recording, require_again
from dhat_seg.errors import UserError
from dhat_seg.training_methods.adversarial import MadryAT
from dhat_seg.training_methods.again_hff import fused_first_stage
from dhat_seg.training_methods.base import max_abs

#: Weight of the mean auxiliary CE (the release's ``loss + 2 * channel_reg_loss``).
AUX_WEIGHT = 2.0
#: The attack's start: x + START_NOISE N(0, 1) (the release's ``0.001 * torch.randn``).
START_NOISE = 0.001


def check_config(cfg) -> None:
    """The code form needs a model with the auxiliary heads and draws its own y'; the paper form and every
    other method need a model without them."""
    if cfg.method != "again":
        raise UserError(f"model {cfg.model!r} carries the auxiliary heads of AGAIN's code form; expected method=again "
                        f"with again.form=code, or model={cfg.model[:-len('_again')]!r}")
    settings = cfg.options("again")
    if settings.form == "code":
        if not is_again_model(cfg.model):
            raise UserError(f"model {cfg.model!r} has no AGAIN auxiliary heads, which again.form=code trains; expected "
                            f"model={again_model_name(cfg.model)!r} (any model name + '_again')")
        if settings.fake_label != "random":
            raise UserError(f"again.fake_label={settings.fake_label!r} is read by again.form=paper only: the code form "
                            "draws y' = y[randperm(B)], as released; expected again.fake_label=random")
    elif is_again_model(cfg.model):
        raise UserError(f"model {cfg.model!r} carries the auxiliary heads of AGAIN's code form; expected "
                        f"again.form=code, or model={cfg.model[:-len('_again')]!r} for the paper form")


def code_loss(out: AgainOutputs, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(L, CE(logits, y), mean auxiliary CE) with L = CE + 2 x mean auxiliary CE (fp32, batch means)."""
    ce = F.cross_entropy(out.logits.float(), y)
    aux = sum(F.cross_entropy(a.float(), y) for a in out.aux) / len(out.aux)
    return ce + AUX_WEIGHT * aux, ce, aux


class AGAINCode(MadryAT):
    """AGAIN as released: every batch, L = CE + 2 mean auxiliary CE on the labelled forward of
    x_adv, x_adv from an eval-mode attack on L (see the module doc)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.settings = cfg.options("again")  # read once, not per step

    def on_fit_start(self, model, state):
        require_again(model)

    def adversarial(self, model, x, y, eps=None):
        """The release's ``perturb_input``: eval mode, from x + 0.001 N(0, 1), signed steps up L."""

        def objective(x_adv: Tensor) -> Tensor:
            with recording(model) as outputs:
                model(x_adv)
            return code_loss(outputs[-1], y)[0]

        start = x.detach() + START_NOISE * torch.randn_like(x)
        with self.auxiliary(model):
            return attacks.signed_ascent(model, objective, x, start, self.eps if eps is None else eps, self.alpha,
                                         self.cfg.attack_steps, mode=self.attack_mode, precision=self.cfg.attack_precision)

    def loss(self, model, x, y, foreground=None, prepared=None):
        prepared = self.prepare(model, x, y) if prepared is None else prepared
        fusion = fused_first_stage(model) if self.settings.hff_on else contextlib.nullcontext()
        with labelled(model, y, self.settings.alpha), recording(model) as outputs, fusion:
            model(prepared["x_adv"])
        out = outputs[-1]
        loss, ce, aux = code_loss(out, y)
        return loss, {"ce_adv": ce.detach(), "again_aux_ce": aux.detach(), "max_logit_adv": max_abs(out.logits)}
