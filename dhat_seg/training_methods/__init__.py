"""Training methods: each turns a batch into a loss. A small registry, timm-style.

A method implements ``prepare(model, x, y) -> prepared`` (its adversarial inputs, made on
the current weights) and ``loss(model, x, y, foreground, prepared=None) -> (loss, stats)``
(``prepared`` None: made now); the trainer owns the optimiser, devices and precision.
Methods that need a foreground mask declare ``needs_attention = True`` and receive a bool
B x 1 x H x W mask of the *clean* images (computed by the attention method, or read from
the mask cache).

Composition:

* **base** (``base: at | trades | mart | cfa | sglr``, read by UIAT and DHAT): the loss that UIAT's
  and DHAT's terms are added to, with that method's own x_adv, from which x_inv (and
  DHAT's x_B) are made. A base method exposes ``adversarial`` (its attack) and
  ``base_loss(model, x, y, x_adv) -> (loss, z_adv, stats)``, used standalone and by UIAT/DHAT;
  a base with state (CFA's calibration and weight average) keeps it through the trainer
  hooks, which UIAT and DHAT pass on (``base: cfa`` = DHAT-CFA). FSR reads ``base`` too
  (``at | trades | mart``) and adds its terms to that loss (:mod:`.fsr`). PART reads it too
  (``at | trades | mart``: PART, PART-T, PART-M) and makes that base's x_adv with a
  per-pixel budget from the foreground mask (:mod:`.part`). AGAIN (:mod:`.again`) is AT whose
  batches switch, with a probability growing over training, to its own loss on AT's x_adv;
  ``again_form: code`` builds the released form instead (:mod:`.again_code`).
* **AWP** (``awp: true``, any method): :meth:`TrainingMethod.weight_perturbation`, a
  context the trainer enters around loss and backward (:mod:`dhat_seg.awp`).

Two rules every method follows, so that methods compare fairly:

* Attacks run in fp32 (``attacks.attack_precision``), also inside the trainer's
  autocast region, unless the config opts in with ``attack_precision: autocast``.
* Auxiliary forwards (every attack step, the clean/adversarial probabilities the
  inverse attack aims at, DHAT's background-only x_B) leave BatchNorm running
  statistics alone unless ``attack_bn_update`` is true (the authors' code, where every
  train-mode forward updates them). Only the forwards of the training inputs that the
  method's loss is about (clean for standard, x_adv for AT, x and x_adv for TRADES and
  MART, plus x_inv for UIAT/DHAT) update them, so UIAT and DHAT rows differ in their
  loss alone.

``stats`` holds detached 0-dim tensors (read by the trainer once per batch), among them
``max_logit_*``: the largest |logit| of a forward, the trainer's divergence signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from dhat_seg import losses  # noqa: F401  (re-exported: tests patch losses through this module)
from dhat_seg.errors import UserError
from dhat_seg.training_methods.adversarial import MART, TRADES, MadryAT, Standard
from dhat_seg.training_methods.again import AGAIN, FAKE_LABELS as AGAIN_FAKE_LABELS, FORMS as AGAIN_FORMS
from dhat_seg.training_methods.bases import BASE_METHODS
from dhat_seg.training_methods.base import TrainingMethod, max_abs
from dhat_seg.training_methods.cfa import CFA
from dhat_seg.training_methods.fsr import FSR, FSR_BASES
from dhat_seg.training_methods.inverse import DHAT, UIAT
from dhat_seg.training_methods.part import PART, PART_BASES
from dhat_seg.training_methods.sglr import SGLR

__all__ = ["AGAIN", "AGAIN_FAKE_LABELS", "AGAIN_FORMS", "BASE_METHODS", "CFA", "DHAT", "FSR", "MART", "TRADES", "TRAINING_METHODS", "MadryAT", "PART", "SGLR", "Standard",
           "OWNED_SETTINGS", "TrainingMethod", "TrainingMethodEntry", "UIAT", "attack_mode_of", "check_method_config",
           "create_training_method", "max_abs", "readers_of", "reads_base", "unread_settings"]


#: Config keys every method reads (attacks, schedule, AWP, data, ...) are not listed; ``settings`` lists the
#: keys a method owns: read by it (and by the methods built on it through ``base``) and by no other method.


@dataclass(frozen=True)
class TrainingMethodEntry:
    """A training method and what a caller needs to know about it.

    ``bases``: the values of ``base`` it accepts (empty: it does not read ``base``); ``stateful``: the
    state it keeps across steps that a multi-process run does not synchronise (None: none);
    ``attack_mode``: the mode its authors' code crafts its training attacks in (``attack_mode: null``
    takes it; every attack of the method, the base's included, runs in it); ``settings``: the config keys
    it owns; ``conditional``: ``cfg -> keys`` it reads only in some configurations (CFA's ``trades_beta``
    with ``cfa_base: trades``); ``model_variant``: ``cfg -> model name`` where the method needs a model
    variant (FSR's module, AGAIN's heads), else None; ``check``: ``cfg -> None``, raising a UserError
    for settings the method cannot train with."""

    name: str
    description: str
    cls: Callable[[Any], TrainingMethod]
    bases: tuple[str, ...] = ()
    stateful: str | None = None
    attack_mode: str = "eval"
    attack_mode_source: str = ""
    settings: tuple[str, ...] = ()
    conditional: Callable[[Any], tuple[str, ...]] | None = None
    model_variant: Callable[[Any], str | None] | None = None
    check: Callable[[Any], None] | None = None

    def reads(self, cfg: Any) -> frozenset[str]:
        """The owned config keys this method reads under ``cfg`` (its base's included)."""
        keys = set(self.settings) | set(self.conditional(cfg) if self.conditional else ())
        if self.bases:
            keys.add("base")
            if cfg.base in self.bases and cfg.base in TRAINING_METHODS:
                keys |= TRAINING_METHODS[cfg.base].reads(cfg)
        return frozenset(keys)


_ATTENTION = ("attention", "attention_options", "attention_checkpoint", "attention_model", "attention_model_arch",
              "attention_model_epochs", "threshold_policy", "omega", "quantile", "mask_source", "attention_source",
              "mask_refresh_every", "attention_burn_in")
_INVERSE = ("lambda1", "inv_eps", "inv_step_size", "inv_steps")
_CFA = ("cfa_base", "cfa_lambda1", "cfa_lambda2", "cfa_begin", "fawa_decay", "fawa_threshold", "fawa_begin")
_AT_CODE = "Madry et al.'s and Rice et al.'s PGD-AT (locuslab/robust_overfitting train_cifar.py: no model.eval() before attack_pgd)"
_DHAT_CODE = "the DHAT authors' code (every pass in train mode), also for DHAT on another base"


def _fsr_model(cfg: Any) -> str:
    from dhat_seg.fsr_module import fsr_model_name

    return fsr_model_name(cfg.model)


def _again_model(cfg: Any) -> str | None:
    from dhat_seg.again_net import again_model_name

    return again_model_name(cfg.model) if cfg.again_form == "code" else None


def _check_fsr(cfg: Any) -> None:
    from dhat_seg.training_methods.fsr import check_config

    check_config(cfg)


TRAINING_METHODS: dict[str, TrainingMethodEntry] = {
    e.name: e
    for e in (
        TrainingMethodEntry("standard", "clean training (also trains the Grad-CAM attention model)", Standard,
                            attack_mode="train", attack_mode_source="no attack"),
        TrainingMethodEntry("at", "PGD adversarial training (Madry et al. 2018)", MadryAT, attack_mode="train",
                            attack_mode_source=_AT_CODE),
        TrainingMethodEntry("uiat", "UIAT: base (at, or --set base=trades|mart|cfa|sglr) + inverse adversarial alignment; "
                                    "the '-' row of Table 10", UIAT, bases=tuple(BASE_METHODS), attack_mode="train",
                            attack_mode_source=_DHAT_CODE, settings=_INVERSE),
        TrainingMethodEntry("dhat", "DHAT: base (at, or --set base=trades|mart|cfa|sglr) + DHLR + FLOE with attention-based "
                                    "background extraction", DHAT, bases=tuple(BASE_METHODS), attack_mode="train",
                            attack_mode_source=_DHAT_CODE,
                            settings=_INVERSE + ("lambda2", "dhlr_form", "floe_form", "floe_p") + _ATTENTION),
        TrainingMethodEntry("trades", "TRADES (Zhang et al. 2019): CE(x) + trades_beta KL(p_nat || p_adv)", TRADES,
                            attack_mode_source="yaodongyu/TRADES trades.py (model.eval() before the attack)",
                            settings=("trades_beta",)),
        TrainingMethodEntry("mart", "MART (Wang et al. 2020): boosted CE + mart_beta weighted KL", MART,
                            attack_mode_source="YisenWang/MART mart.py (model.eval() before the attack)",
                            settings=("mart_beta",)),
        TrainingMethodEntry("cfa", "CFA (Wei et al. 2023): AT (or --set cfa_base=trades) with class-wise calibrated "
                                   "eps (and TRADES beta) and a fairness-aware weight average (FAWA)", CFA,
                            stateful="class-wise statistics of the training batches",
                            attack_mode_source="PKU-ML/CFA (model.eval() before crafting)", settings=_CFA,
                            conditional=lambda cfg: ("trades_beta",) if cfg.cfa_base == "trades" else ()),
        TrainingMethodEntry("sglr", "SGLR (Li et al. 2024): AT on self-refined soft labels, a moving average of each "
                                    "sample's one-hot label and the model's clean and adversarial predictions", SGLR,
                            stateful="per-sample soft labels",
                            attack_mode_source="devicerxx/SGLS (model.eval() before crafting)",
                            settings=("sglr_momentum", "sglr_clean_weight", "sglr_start")),
        TrainingMethodEntry("fsr", "FSR (Kim et al. 2023): base (at, or --set base=trades|mart) + feature separation and "
                                   "recalibration losses, on the model <name>_fsr (picked by itself)", FSR,
                            bases=FSR_BASES, attack_mode_source="wkim97/FSR (model.eval() before crafting)",
                            settings=("fsr_lambda_sep", "fsr_lambda_rec", "fsr_tau", "fsr_begin"),
                            model_variant=_fsr_model, check=_check_fsr),
        TrainingMethodEntry("part", "PART (Zhang et al. 2024): base (at, or --set base=trades|mart) on x_adv whose budget is "
                                    "eps on the pixels the attention marks important, part_eps_low elsewhere", PART,
                            bases=PART_BASES, attack_mode_source="PART's official code (model.eval() before crafting)",
                            settings=("part_eps_low",) + _ATTENTION),
        TrainingMethodEntry("again", "AGAIN (Yin et al. 2023), as specified: PGD-10 AT; with probability i/N (iteration "
                                     "i of N) a batch trains on CE of the class-y logit mixed with a fake label's "
                                     "(again_alpha) instead, with hybrid feature fusion (again_hff); --set "
                                     "again_form=code: as released, on a model <name>_again (picked by itself; auxiliary "
                                     "heads modulating features by 0.6 W[y] + 0.4 W[y'], CE + 2 x auxiliary CE, AWP)", AGAIN,
                            attack_mode_source="InsLin/AGAIN train_awp_again_cifar.py (model.eval() before "
                                               "perturb_input; both forms)",
                            settings=("again_form", "again_alpha", "again_fake_label", "again_hff"),
                            model_variant=_again_model),
    )
}
#: every method takes ``--set awp=true`` (adversarial weight perturbation, :mod:`dhat_seg.awp`)

#: The keys some method owns (``TrainingMethodEntry.settings``, ``base`` and the conditional ones).
OWNED_SETTINGS: frozenset[str] = frozenset(
    {"base", "trades_beta"}.union(*(e.settings for e in TRAINING_METHODS.values())))


def create_training_method(cfg: Any) -> TrainingMethod:
    if cfg.method not in TRAINING_METHODS:
        raise UserError(f"training method {cfg.method!r} is unknown; expected one of {', '.join(TRAINING_METHODS)}")
    return TRAINING_METHODS[cfg.method].cls(cfg)


def reads_base(method: str | None) -> bool:
    """Whether ``method`` builds its loss on ``base`` (uiat, dhat, fsr, part)."""
    return method in TRAINING_METHODS and bool(TRAINING_METHODS[method].bases)


def attack_mode_of(cfg: Any) -> str:
    """The mode the run's training attacks run in: ``attack_mode``, else (null) its method's authors'."""
    if cfg.attack_mode is not None:
        return cfg.attack_mode
    entry = TRAINING_METHODS.get(cfg.method)
    return entry.attack_mode if entry is not None else "train"


def readers_of(key: str, cfg: Any) -> list[str]:
    """The methods that read ``key`` (with their base or variant where only then): 'trades', 'dhat with base=trades'."""
    out = []
    for entry in TRAINING_METHODS.values():
        if key in entry.settings or key == "base" and entry.bases:
            out.append(entry.name)
        elif key == "trades_beta" and entry.name == "cfa":
            out.append("cfa with cfa_base=trades")
        elif entry.bases and any(key in TRAINING_METHODS[b].settings for b in entry.bases if b in TRAINING_METHODS):
            bases = [b for b in entry.bases if b in TRAINING_METHODS and key in TRAINING_METHODS[b].settings]
            out.append(f"{entry.name} with base={'|'.join(bases)}")
    return out


def unread_settings(cfg: Any, explicit: Any) -> None:
    """UserError for a key of ``explicit`` that some method owns, whose value in ``cfg`` is not its default,
    and that ``cfg.method`` (with its base) does not read: the run would ignore it without a word."""
    import dataclasses

    entry = TRAINING_METHODS.get(cfg.method)
    if entry is None:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    reads = entry.reads(cfg)
    for key in sorted(set(explicit) & OWNED_SETTINGS):
        if getattr(cfg, key) != defaults.get(key) and key not in reads:
            raise UserError(f"{key}={getattr(cfg, key)!r} is not read by method {cfg.method!r}"
                            f"{f' with base={cfg.base}' if entry.bases else ''}; it is read by "
                            f"{', '.join(readers_of(key, cfg))}")


def check_method_config(cfg: Any) -> None:
    """The method's own constraints: ``base`` among its bases, and its ``check``."""
    entry = TRAINING_METHODS.get(cfg.method)
    if entry is None:
        return
    if entry.bases and cfg.base not in entry.bases:
        raise UserError(f"base {cfg.base!r} is not available with method {cfg.method!r}; expected one of "
                        f"{', '.join(entry.bases)}")
    if entry.check is not None:
        entry.check(cfg)
