"""AGAIN: Adversarial training with Attribution span enlargement and hybrid feature fusIoN
(Yin, Yao, Shi, Du, Xiao, CVPR 2023).

Sources: the supplementary (``seeds/004``: Algorithm 1, Theorem 1 with its proof in section
3, section 4.1 on alpha, section 4.2 on HFF; REFERENCE section 4) and the abstract of the main
paper. The main paper's body (its Eqs. 3 and 7, and its definition of HFF) and the official
code (README only: ``AGAIN_with_AWP/train_awp_again_cifar.py``) could not be found in the
sources this project searched, so HFF below is dhat-seg's reading of the abstract and of
section 4.2, not a transcription (see "HFF").

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

batch mean, alpha = ``again_alpha`` = 0.6 (section 4.1). How the logits of the other classes
enter: the proof of Theorem 1 (supplementary section 3, second line) writes the normaliser as
sum_{j=0}^{K} exp(A^T W^j) over every class's own, unmixed logit (z_y included), and only the
class-y term of the numerator mixed; its gradient in X = z_y - z_y', -alpha + e^X / (c + e^X),
and the stationary point X = log(alpha c / (1 - alpha)) hold for that form only. So the
"mixed logits" are: class y's is alpha z_y + (1 - alpha) z_y', every other class keeps z_k,
and the softmax's denominator is that of the plain logits; equivalently a soft label of mass
alpha on y and 1 - alpha on y'.

The fake label y' (the paper: "a fake label", nothing more): ``again_fake_label: random``
(default) draws it uniformly from the K - 1 wrong classes per sample, (y + r) mod K with
r ~ U{1..K-1} from torch's global CPU generator, so that over the data set every wrong class
is enlarged (the paper's discussion of property 1 ranges over all pairs i != j);
``highest`` takes the highest-scoring wrong class of the x_adv forward (detached; FSR's y').

HFF (hybrid feature fusion). The abstract: "we use hybrid feature statistics for feature
fusion to enrich the diversity of features"; section 4.2: with HFF the model attends more to
the structure of the image (SmoothGrad maps). No formula was found. dhat-seg's HFF mixes
instance-level feature statistics across the batch, as MixStyle (Zhou et al., ICLR 2021):
on the output f (B x C x H x W) of the model's first stage (:func:`dhat_seg.feature_split.first_stage`)
in the x_adv forward of an AGAIN batch,

    mu, sigma = per sample and channel mean and std of f over H x W (detached; sigma = sqrt(var + 1e-6), biased var)
    f_hff = sigma_mix (f - mu) / sigma + mu_mix,  mu_mix = lam mu + (1 - lam) mu[perm],  sigma_mix likewise
                                                                       (:func:`hybrid_feature_fusion`)

perm a random permutation of the batch, lam ~ Beta(0.1, 0.1) per sample (:data:`HFF_BETA`,
MixStyle's), both from torch's global CPU generator. The first stage, as MixStyle's early
layers: there the statistics carry an image's style; on the last map, which is average-pooled
into A, mixing statistics would only mix the pooled features (mu is A). ``again_hff: false`` leaves it out (the
paper's "W/O HFF" ablation). The official code defines its HFF but never calls it (a known
defect); dhat-seg calls it in every AGAIN batch. HFF changes nothing else: plain-AT batches,
attacks and every evaluation forward run the model without it (the hook lives only inside
:meth:`AGAIN.loss`), and the evaluated model is the trained one, unchanged.

Choices where the sources are silent (dhat-seg's): the bias is part of z; the loss is on the
x_adv forward only (Algorithm 1 makes x_adv for both branches); y' and HFF's draws come from
the global generator in each loss call (AWP's proxy draws its own); ``ce_adv`` records
CE(z, y) of the training forward (with HFF in AGAIN batches), ``again`` whether the batch used
AGAIN (its epoch mean: the share of AGAIN batches) and ``again_prob`` i / N.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg.errors import UserError
from dhat_seg.feature_split import first_stage, penultimate_and_head
from dhat_seg.training_methods.adversarial import MadryAT
from dhat_seg.training_methods.base import max_abs
from dhat_seg.training_methods.fsr import highest_wrong_class

#: How y' is chosen (``again_fake_label``).
FAKE_LABELS = ("random", "highest")
#: Added to the variance before the square root (MixStyle's eps).
HFF_EPS = 1e-6
#: HFF's mixing weights lam ~ Beta(HFF_BETA, HFF_BETA) (MixStyle's alpha: mostly near 0 or 1).
HFF_BETA = 0.1


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


def channel_statistics(f: Tensor, eps: float = HFF_EPS) -> tuple[Tensor, Tensor]:
    """(mu, sigma) of a B x C x H x W map per sample and channel over H x W (biased variance), B x C x 1 x 1."""
    mu = f.mean(dim=(2, 3), keepdim=True)
    return mu, (f.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()


def hybrid_feature_fusion(f: Tensor, perm: Tensor, lam: Tensor, eps: float = HFF_EPS) -> Tensor:
    """sigma_mix (f - mu) / sigma + mu_mix with mu_mix = lam mu + (1 - lam) mu[perm] (sigma_mix
    likewise); statistics detached, computed in fp32; ``lam``: B values; output in f's dtype."""
    if f.dim() != 4:
        raise UserError(f"HFF needs a B x C x H x W feature map; got shape {tuple(f.shape)}")
    x = f.float()
    mu, sigma = (s.detach() for s in channel_statistics(x, eps))
    lam = lam.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    perm = perm.to(x.device)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
    return ((x - mu) / sigma * sigma_mix + mu_mix).to(f.dtype)


@contextlib.contextmanager
def fused_first_stage(model: nn.Module, beta: float = HFF_BETA) -> Iterator[nn.Module]:
    """Forwards of ``model`` in the block pass the first stage's output through HFF, with a
    fresh permutation and lam ~ Beta(beta, beta) per forward (global CPU generator)."""

    def hook(module, inputs, output):
        b = output.shape[0]
        perm = torch.randperm(b)
        lam = torch.distributions.Beta(torch.tensor(float(beta)), torch.tensor(float(beta))).sample((b,))
        return hybrid_feature_fusion(output, perm, lam)

    handle = first_stage(model, "AGAIN's HFF").register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


# ------------------------------------------------------------------ the method
class AGAIN(MadryAT):
    """PGD-10 AT; with probability i / N a batch trains with AGAIN's loss and HFF instead (see the module doc)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.again_fake_label not in FAKE_LABELS:
            raise UserError(f"again_fake_label {cfg.again_fake_label!r} is unknown; expected one of {', '.join(FAKE_LABELS)}")
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
                            "i / N); expected on_train_data(...) to be called, as dhat_seg.experiment.build_parts does")
        i = self._epoch * self.batches_per_epoch + self._batch
        self._batch += 1
        self.probability = again_probability(i, self.cfg.epochs * self.batches_per_epoch)
        self.again_now = bool(torch.rand(()) < self.probability)

    def fake_labels(self, logits: Tensor, y: Tensor) -> Tensor:
        """y' per ``again_fake_label``: a uniformly random wrong class, or the highest-scoring one."""
        if self.cfg.again_fake_label == "highest":
            return highest_wrong_class(logits, y)
        return random_wrong_class(y, logits.shape[1])

    def again_terms(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(L_AGAIN, z) on x_adv, HFF in the forward unless ``again_hff`` is off."""
        fusion = fused_first_stage(model) if self.cfg.again_hff else contextlib.nullcontext()
        with fusion:
            features, head = penultimate_and_head(model, x_adv, "method 'again'")
        z = head(features)
        return again_loss(z, y, self.fake_labels(z, y), self.cfg.again_alpha), z

    def loss(self, model, x, y, foreground=None, prepared=None):
        prepared = self.prepare(model, x, y) if prepared is None else prepared
        if not self.again_now:
            loss, z_adv, stats = self.base_loss(model, x, y, prepared["x_adv"])
        else:
            loss, z_adv = self.again_terms(model, prepared["x_adv"], y)
            stats = {"ce_adv": F.cross_entropy(z_adv.detach().float(), y), "max_logit_adv": max_abs(z_adv)}
        flag = torch.tensor(float(self.again_now), device=loss.device)
        return loss, {**stats, "again": flag, "again_prob": torch.tensor(self.probability, device=loss.device)}
