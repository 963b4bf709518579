"""AGAIN: Adversarial training with Attribution span enlargement and hybrid feature fusIoN
(Yin, Yao, Shi, Du, Xiao, CVPR 2023), as specified (``again.form: paper``, the default).

Two forms (``again.form``): ``paper`` (this module) follows the supplementary, the
specification; ``code`` follows the authors' released code (github.com/InsLin/AGAIN), which
produced their numbers and does something else: :mod:`.again_code` (the model side:
:mod:`dhat_seg.models.again_net`). ``AGAIN(cfg)`` builds the form ``cfg`` names. HFF is shared.

Sources of the paper form: the supplementary (``seeds/004``: Algorithm 1, Theorem 1 with its
proof in section 3, section 4.1 on alpha, section 4.2 on HFF; REFERENCE section 4) and the
abstract of the main paper; HFF's formula from the official code
(``AGAIN_with_AWP/models/wideresnet_AGAIN_woHFF.py``: ``func1``, ``calc_mean_std``, ``adain``,
``HFF``).

Schedule (Algorithm 1). Iteration i of N = epochs x batches per epoch (i 0-based); x_adv =
PGD-10 on the CE for every batch (AT's attack, :meth:`MadryAT.adversarial`); then, with
probability i / N, the batch trains with AGAIN, otherwise with plain AT, CE(f(x_adv), y).
The draw is ``torch.rand(()) < i / N`` from torch's global CPU generator, once per batch in
:meth:`AGAIN.on_batch_start` (the trainer reseeds it per epoch, so a run repeats and a resumed
epoch is redone exactly; AWP's proxy loss and the loss see the same decision). Iteration 0
never trains with AGAIN; the last does with probability (N - 1) / N.

Attribution span enlargement (Theorem 1, Eq. (1)): with A the penultimate features of x_adv,
W the last linear layer (bias b; the paper writes A^T W^k, dhat-seg's z_k = A^T W^k + b_k),

    L_AGAIN = -log( exp(alpha z_y + (1 - alpha) z_y') / sum_k exp(z_k) )
            = logsumexp(z) - alpha z_y - (1 - alpha) z_y'
            = alpha CE(z, y) + (1 - alpha) CE(z, y')                  (:func:`again_loss`)

batch mean, alpha = ``again.alpha`` = 0.6 (section 4.1). How the logits of the other classes
enter: the proof of Theorem 1 (supplementary section 3, second line) writes the normaliser as
sum_{j=0}^{K} exp(A^T W^j) over every class's own, unmixed logit (z_y included), and only the
class-y term of the numerator mixed; its gradient in X = z_y - z_y', -alpha + e^X / (c + e^X),
and the stationary point X = log(alpha c / (1 - alpha)) hold for that form only. So the
"mixed logits" are: class y's is alpha z_y + (1 - alpha) z_y', every other class keeps z_k,
and the softmax's denominator is that of the plain logits; equivalently a soft label of mass
alpha on y and 1 - alpha on y'.

The fake label y' (the paper: "a fake label", nothing more): ``again.fake_label: random``
(default) draws it uniformly from the K - 1 wrong classes per sample, (y + r) mod K with
r ~ U{1..K-1} from torch's global CPU generator, so that over the data set every wrong class
is enlarged (the paper's discussion of property 1 ranges over all pairs i != j);
``highest`` takes the highest-scoring wrong class of the x_adv forward (detached; FSR's y').

HFF (hybrid feature fusion; the abstract: "hybrid feature statistics for feature fusion";
section 4.2: with HFF the model attends more to the structure of the image). The
supplementary has no formula; the official code defines ``HFF(content, style)`` and never
calls it (its released results are "without HFF"). :func:`.again_hff.hybrid_feature_fusion` is that
definition: with mu, sigma the per sample and channel mean and std over H x W (unbiased
variance + 1e-5, as ``calc_mean_std``; not detached) and AdaIN(a, b) = (a - mu_a) / sigma_a
sigma_b + mu_b,

    o1 = AdaIN(content, style),  o2 = AdaIN(style, content)
    lam = (lam_1, .., lam_4) uniform on the simplex (``func1(1, 4)``: spacings of 3 sorted U(0, 1)), one draw per call
    mu_mix = lam_1 mu_content + lam_2 mu_style + lam_3 mu_o1 + lam_4 mu_o2,   sigma_mix likewise
    HFF = (content - mu_content) / sigma_content sigma_mix + mu_mix

(o1 carries the style's statistics and o2 the content's, up to the 1e-5, so the four-way mix
is close to a random two-way one). What the code leaves open, dhat-seg chooses: content is the
output f of the model's first stage (:func:`dhat_seg.models.feature_split.first_stage`, where the
statistics carry an image's style) in the training forward of x_adv, style = f[perm] for a
random permutation of the batch; lam and perm from torch's global CPU generator
(:func:`.again_hff.fused_first_stage`). ``again.hff`` (null = the form's default, :func:`hff_on`): on in
the paper form (the paper's method; ``false`` is its "W/O HFF" ablation), off in the code form
(as released). Until this version the paper form's HFF was a guess (MixStyle: per-sample
Beta(0.1, 0.1) weights, detached statistics, another sample's mean and std only). HFF changes
nothing else: plain-AT batches, attacks and every evaluation forward run the model without it
(the hook lives only inside the loss).

Choices where the sources are silent (dhat-seg's): the bias is part of z; the loss is on the
x_adv forward only (Algorithm 1 makes x_adv for both branches); y' and HFF's draws come from
the global generator in each loss call (AWP's proxy draws its own); ``ce_adv`` records
CE(z, y) of the training forward (with HFF in AGAIN batches), ``again`` whether the batch used
AGAIN (its epoch mean: the share of AGAIN batches) and ``again_prob`` i / N.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg.errors import UserError
from dhat_seg.models.feature_split import penultimate_and_head
from dhat_seg.training_methods.adversarial import MadryAT
from dhat_seg.training_methods.again_code import AGAINCode
from dhat_seg.training_methods.again_hff import (HFF_EPS, adain, channel_statistics, fused_first_stage,  # noqa: F401
                                                 hff_on, hybrid_feature_fusion, simplex_weights)
from dhat_seg.training_methods.base import max_abs
from dhat_seg.training_methods.fsr import highest_wrong_class
from dhat_seg.training_methods.settings import MethodSettings

#: How y' is chosen (``again.fake_label``; the paper form's).
FAKE_LABELS = ("random", "highest")
#: The two forms (``again.form``): the supplementary's, the released code's.
FORMS = ("paper", "code")


@dataclass(frozen=True)
class AGAINSettings(MethodSettings):
    """AGAIN's settings (``--set again.KEY=VALUE``; see the module doc): ``form`` paper (the
    supplementary) or code (as released); ``alpha``: y's share of the mixed logit (paper) or mask (code);
    ``fake_label``: the paper form's y'; ``hff``: hybrid feature fusion (null: on for paper, off for code)."""

    form: str = "paper"
    alpha: float = 0.6
    fake_label: str = "random"
    hff: bool | None = None

    @property
    def hff_on(self) -> bool:
        """Whether a run uses HFF: ``hff``, or (null) the form's default: on for paper, off for code."""
        return self.form == "paper" if self.hff is None else bool(self.hff)

    def checks(self, cfg):
        return [(self.form in FORMS, "form", f"one of {', '.join(FORMS)}"),
                (0 <= self.alpha <= 1, "alpha", "a number in [0, 1] (the true label's share of the mixed logit)"),
                (self.fake_label in FAKE_LABELS, "fake_label", f"one of {', '.join(FAKE_LABELS)}")]

    def digest_items(self, owner, method):
        """As 0.1 hashed them: ``again_hff`` resolved (left out when on), and with method again and HFF on,
        the HFF formula (the released code's, not the earlier MixStyle)."""
        items = super().digest_items(owner, method)
        items.pop("again_hff", None)
        if not self.hff_on:
            items["again_hff"] = False
        if method == "again" and self.hff_on:
            items["again_hff_formula"] = "code"
        return items


# ------------------------------------------------------------------ the math (pure)
def again_probability(iteration: int, total: int) -> float:
    """i / N: the probability that 0-based iteration ``iteration`` of ``total`` trains with AGAIN."""
    if total < 1:
        raise UserError(f"AGAIN's schedule needs at least one iteration; got N={total}")
    return min(max(iteration, 0), total) / total


def random_wrong_class(y: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """y' = (y + r) mod K, r ~ U{1, ..., K-1} per sample (drawn on the CPU, then moved to y's device)."""
    r = torch.randint(1, num_classes, tuple(y.shape), generator=generator)
    return (y + r.to(y.device)) % num_classes


def again_loss(logits: Tensor, y: Tensor, y_fake: Tensor, alpha: float) -> Tensor:
    """Batch mean of logsumexp(z) - alpha z_y - (1 - alpha) z_y' (fp32): Eq. (1) of the supplementary,
    CE of the mixed class-y logit against the plain logits' softmax normaliser (see the module doc)."""
    z = logits.float()
    mixed = alpha * z.gather(1, y[:, None]) + (1 - alpha) * z.gather(1, y_fake[:, None])
    return (torch.logsumexp(z, dim=1) - mixed[:, 0]).mean()


# ------------------------------------------------------------------ the method
class AGAIN(MadryAT):
    """PGD-10 AT; with probability i / N a batch trains with AGAIN's loss and HFF instead (see the
    module doc). With ``again.form: code`` the constructor returns the released form
    (:class:`~dhat_seg.training_methods.again_code.AGAINCode`)."""

    def __new__(cls, cfg):
        if cls is AGAIN and cfg.options("again").form == "code":
            return AGAINCode(cfg)
        return super().__new__(cls)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.settings: AGAINSettings = cfg.options("again")
        self.batches_per_epoch: int | None = None
        self._epoch, self._batch = 0, 0
        #: whether the current batch trains with AGAIN (drawn in :meth:`on_batch_start`)
        self.again_now = False
        self.probability = 0.0

    def on_train_data(self, num_samples: int, batches_per_epoch: int) -> None:
        self.batches_per_epoch = batches_per_epoch

    def on_epoch_start(self, model, epoch):
        self._epoch, self._batch = epoch, 0

    def on_batch_start(self, index):
        if not self.batches_per_epoch:
            raise UserError("method 'again' needs the number of batches per epoch before training (its schedule is "
                            "i / N); expected on_train_data(...) to be called, as dhat_seg.run.experiment.build_parts does")
        i = self._epoch * self.batches_per_epoch + self._batch
        self._batch += 1
        self.probability = again_probability(i, self.cfg.epochs * self.batches_per_epoch)
        self.again_now = bool(torch.rand(()) < self.probability)

    def fake_labels(self, logits: Tensor, y: Tensor) -> Tensor:
        """y' per ``again.fake_label``: a uniformly random wrong class, or the highest-scoring one."""
        if self.settings.fake_label == "highest":
            return highest_wrong_class(logits, y)
        return random_wrong_class(y, logits.shape[1])

    def again_terms(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(L_AGAIN, z) on x_adv, HFF in the forward unless it is off (:func:`hff_on`)."""
        fusion = fused_first_stage(model) if self.settings.hff_on else contextlib.nullcontext()
        with fusion:
            features, head = penultimate_and_head(model, x_adv, "method 'again'")
        z = head(features)
        return again_loss(z, y, self.fake_labels(z, y), self.settings.alpha), z

    def loss(self, model, x, y, foreground=None, prepared=None):
        prepared = self.prepare(model, x, y) if prepared is None else prepared
        if not self.again_now:
            loss, z_adv, stats = self.base_loss(model, x, y, prepared["x_adv"])
        else:
            loss, z_adv = self.again_terms(model, prepared["x_adv"], y)
            stats = {"ce_adv": F.cross_entropy(z_adv.detach().float(), y), "max_logit_adv": max_abs(z_adv)}
        flag = torch.tensor(float(self.again_now), device=loss.device)
        return loss, {**stats, "again": flag, "again_prob": torch.tensor(self.probability, device=loss.device)}
