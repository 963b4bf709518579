"""Training methods: each turns a batch into a loss. A small registry, timm-style.

A method implements ``prepare(model, x, y) -> prepared`` (its adversarial inputs, made on
the current weights) and ``loss(model, x, y, foreground, prepared=None) -> (loss, stats)``
(``prepared`` None: made now); the trainer owns the optimiser, devices and precision.
Methods that need a foreground mask declare ``needs_attention = True`` and receive a bool
B x 1 x H x W mask of the *clean* images (computed by the attention method, or read from
the mask cache).

Adding a method: one module (its class, and its settings as a frozen
:class:`~dhat_seg.training_methods.settings.MethodSettings` dataclass) plus one
:class:`TrainingMethodEntry` in :data:`TRAINING_METHODS`, or :func:`register_training_method`
from outside the package (the test suite registers one so). ``dhat-seg train --method``,
``dhat-seg compare`` (a row of the method's name) and ``base`` (with ``is_base``) pick it up.

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
  ``again.form: code`` builds the released form instead (:mod:`.again_code`).
* **AWP** (``awp: true``, any method): :meth:`TrainingMethod.weight_perturbation`, a
  context the trainer enters around loss and backward (:mod:`dhat_seg.training_methods.awp`).

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
from dhat_seg.training_methods.adversarial import MART, TRADES, MadryAT, MartSettings, Standard, TradesSettings
from dhat_seg.training_methods.again import (AGAIN, AGAINSettings, FAKE_LABELS as AGAIN_FAKE_LABELS,
                                             FORMS as AGAIN_FORMS)
from dhat_seg.training_methods.bases import base_methods
from dhat_seg.training_methods.base import TrainingMethod, max_abs
from dhat_seg.training_methods.cfa import CFA, CFASettings
from dhat_seg.training_methods.fsr import FSR, FSR_BASES, FSRSettings
from dhat_seg.training_methods.inverse import DHAT, UIAT
from dhat_seg.training_methods.part import PART, PART_BASES, PARTSettings
from dhat_seg.training_methods.settings import MethodSettings
from dhat_seg.training_methods.sglr import SGLR, SGLRSettings

__all__ = ["AGAIN", "AGAIN_FAKE_LABELS", "AGAIN_FORMS", "CFA", "DHAT", "FSR", "MART", "TRADES", "TRAINING_METHODS",
           "MadryAT", "MethodSettings", "PART", "SGLR", "Standard", "TrainingMethod", "TrainingMethodEntry", "UIAT",
           "attack_mode_of", "base_methods", "check_method_config", "create_training_method", "legacy_keys", "max_abs",
           "owned_keys", "readers_of", "reads_base", "register_training_method", "settings_class", "unread_settings"]

#: ``bases="any"``: every registered method with ``is_base`` (:func:`~.bases.base_methods`).
ANY_BASE = "any"


@dataclass(frozen=True)
class Reads:
    """Another method's settings that a method reads in some configurations only: ``owner``'s, when
    ``when(cfg)``; ``described``: that configuration in words (``cfa.base=trades``)."""

    owner: str
    described: str
    when: Callable[[Any], bool]


@dataclass(frozen=True)
class TrainingMethodEntry:
    """A training method and what a caller needs to know about it.

    ``settings``: its frozen settings dataclass (:class:`MethodSettings`; None: it has none), held in a
    run's ``method_options[name]``; ``owns``: the shared config keys that only it (and the methods on it)
    reads (DHAT's attention and inverse settings); ``also_reads``: other methods' settings it reads in
    some configurations (CFA reads TRADES' beta with ``cfa.base: trades``); ``bases``: the values of
    ``base`` it accepts (empty: it does not read ``base``; ``"any"``: every method with ``is_base``);
    ``is_base``: whether other methods can be built on it (it has ``adversarial`` and ``base_loss``);
    ``stateful``: the state it keeps across steps that a multi-process run does not synchronise (None:
    none); ``attack_mode``: the mode its authors' code crafts its training attacks in (``attack_mode:
    null`` takes it; every attack of the method, the base's included, runs in it); ``model_variant``:
    ``cfg -> model name`` where the method needs a model variant (FSR's module, AGAIN's heads), else None;
    ``check``: ``cfg -> None``, raising a UserError for settings the method cannot train with."""

    name: str
    description: str
    cls: Callable[[Any], TrainingMethod]
    settings: type[MethodSettings] | None = None
    owns: tuple[str, ...] = ()
    also_reads: tuple[Reads, ...] = ()
    bases: tuple[str, ...] | str = ()
    is_base: bool = False
    stateful: str | None = None
    attack_mode: str = "eval"
    attack_mode_source: str = ""
    model_variant: Callable[[Any], str | None] | None = None
    check: Callable[[Any], None] | None = None

    def allowed_bases(self) -> tuple[str, ...]:
        return base_methods() if self.bases == ANY_BASE else tuple(self.bases)

    def settings_read(self, cfg: Any) -> tuple[str, ...]:
        """The methods whose settings this one reads under ``cfg`` (its own, its base's, the conditional ones)."""
        owners = [self.name] if self.settings is not None else []
        owners += [r.owner for r in self.also_reads if r.when(cfg)]
        if self.bases and cfg.base in self.allowed_bases() and cfg.base in TRAINING_METHODS:
            owners += TRAINING_METHODS[cfg.base].settings_read(cfg)
        return tuple(dict.fromkeys(owners))

    def shared_read(self, cfg: Any) -> frozenset[str]:
        """The owned shared keys (``owns``, ``base``) this method reads under ``cfg``, its base's included."""
        keys = set(self.owns)
        if self.bases:
            keys.add("base")
            if cfg.base in self.allowed_bases() and cfg.base in TRAINING_METHODS:
                keys |= TRAINING_METHODS[cfg.base].shared_read(cfg)
        return frozenset(keys)


_ATTENTION = ("attention", "attention_options", "attention_checkpoint", "attention_model", "attention_model_arch",
              "attention_model_epochs", "threshold_policy", "omega", "quantile", "mask_source", "attention_source",
              "mask_refresh_every", "attention_burn_in")
_INVERSE = ("lambda1", "inv_eps", "inv_step_size", "inv_steps")
_AT_CODE = "Madry et al.'s and Rice et al.'s PGD-AT (locuslab/robust_overfitting train_cifar.py: no model.eval() before attack_pgd)"
_DHAT_CODE = "the DHAT authors' code (every pass in train mode), also for DHAT on another base"


def _fsr_model(cfg: Any) -> str:
    from dhat_seg.models.fsr_module import fsr_model_name

    return fsr_model_name(cfg.model)


def _again_model(cfg: Any) -> str | None:
    from dhat_seg.models.again_net import again_model_name

    return again_model_name(cfg.model) if cfg.options("again").form == "code" else None


def _check_fsr(cfg: Any) -> None:
    from dhat_seg.training_methods.fsr import check_config

    check_config(cfg)


TRAINING_METHODS: dict[str, TrainingMethodEntry] = {
    e.name: e
    for e in (
        TrainingMethodEntry("standard", "clean training (also trains the Grad-CAM attention model)", Standard,
                            attack_mode="train", attack_mode_source="no attack"),
        TrainingMethodEntry("at", "PGD adversarial training (Madry et al. 2018)", MadryAT, is_base=True,
                            attack_mode="train", attack_mode_source=_AT_CODE),
        TrainingMethodEntry("uiat", "UIAT: base (at, or --set base=trades|mart|cfa|sglr) + inverse adversarial alignment; "
                                    "the '-' row of Table 10", UIAT, bases=ANY_BASE, attack_mode="train",
                            attack_mode_source=_DHAT_CODE, owns=_INVERSE),
        TrainingMethodEntry("dhat", "DHAT: base (at, or --set base=trades|mart|cfa|sglr) + DHLR + FLOE with attention-based "
                                    "background extraction", DHAT, bases=ANY_BASE, attack_mode="train",
                            attack_mode_source=_DHAT_CODE,
                            owns=_INVERSE + ("lambda2", "dhlr_form", "floe_form", "floe_p") + _ATTENTION),
        TrainingMethodEntry("trades", "TRADES (Zhang et al. 2019): CE(x) + trades.beta KL(p_nat || p_adv)", TRADES,
                            settings=TradesSettings, is_base=True,
                            attack_mode_source="yaodongyu/TRADES trades.py (model.eval() before the attack)"),
        TrainingMethodEntry("mart", "MART (Wang et al. 2020): boosted CE + mart.beta weighted KL", MART,
                            settings=MartSettings, is_base=True,
                            attack_mode_source="YisenWang/MART mart.py (model.eval() before the attack)"),
        TrainingMethodEntry("cfa", "CFA (Wei et al. 2023): AT (or --set cfa.base=trades) with class-wise calibrated "
                                   "eps (and TRADES beta) and a fairness-aware weight average (FAWA)", CFA,
                            settings=CFASettings, is_base=True,
                            also_reads=(Reads("trades", "cfa.base=trades", lambda cfg: cfg.options("cfa").base == "trades"),),
                            stateful="class-wise statistics of the training batches",
                            attack_mode_source="PKU-ML/CFA (model.eval() before crafting)"),
        TrainingMethodEntry("sglr", "SGLR (Li et al. 2024): AT on self-refined soft labels, a moving average of each "
                                    "sample's one-hot label and the model's clean and adversarial predictions", SGLR,
                            settings=SGLRSettings, is_base=True, stateful="per-sample soft labels",
                            attack_mode_source="devicerxx/SGLS (model.eval() before crafting)"),
        TrainingMethodEntry("fsr", "FSR (Kim et al. 2023): base (at, or --set base=trades|mart) + feature separation and "
                                   "recalibration losses, on the model <name>_fsr (picked by itself)", FSR,
                            settings=FSRSettings, bases=FSR_BASES,
                            attack_mode_source="wkim97/FSR (model.eval() before crafting)",
                            model_variant=_fsr_model, check=_check_fsr),
        TrainingMethodEntry("part", "PART (Zhang et al. 2024): base (at, or --set base=trades|mart) on x_adv whose budget is "
                                    "eps on the pixels the attention marks important, part.eps_low elsewhere", PART,
                            settings=PARTSettings, bases=PART_BASES, owns=_ATTENTION,
                            attack_mode_source="PART's official code (model.eval() before crafting)"),
        TrainingMethodEntry("again", "AGAIN (Yin et al. 2023), as specified: PGD-10 AT; with probability i/N (iteration "
                                     "i of N) a batch trains on CE of the class-y logit mixed with a fake label's "
                                     "(again.alpha) instead, with hybrid feature fusion (again.hff); --set "
                                     "again.form=code: as released, on a model <name>_again (picked by itself; auxiliary "
                                     "heads modulating features by 0.6 W[y] + 0.4 W[y'], CE + 2 x auxiliary CE, AWP)", AGAIN,
                            settings=AGAINSettings,
                            attack_mode_source="InsLin/AGAIN train_awp_again_cifar.py (model.eval() before "
                                               "perturb_input; both forms)",
                            model_variant=_again_model),
    )
}
#: every method takes ``--set awp=true`` (adversarial weight perturbation, :mod:`dhat_seg.training_methods.awp`)


def register_training_method(entry: TrainingMethodEntry, *, replace: bool = False) -> TrainingMethodEntry:
    """Add ``entry`` to the registry (a method defined outside this package); ``replace`` to override one."""
    if not isinstance(entry, TrainingMethodEntry):
        raise TypeError(f"expected a TrainingMethodEntry, got {type(entry).__name__}")
    if entry.name in TRAINING_METHODS and not replace:
        raise UserError(f"training method {entry.name!r} is already registered; pass replace=True to override it")
    if "." in entry.name or not entry.name:
        raise UserError(f"training method name {entry.name!r} is invalid; expected a non-empty name without '.'")
    TRAINING_METHODS[entry.name] = entry
    return entry


def settings_class(owner: str) -> type[MethodSettings]:
    """The settings dataclass of method ``owner`` (a UserError naming the methods that have settings)."""
    entry = TRAINING_METHODS.get(owner)
    if entry is None or entry.settings is None:
        with_settings = [n for n, e in TRAINING_METHODS.items() if e.settings is not None]
        what = "is unknown" if entry is None else "has no settings"
        raise UserError(f"method_options for {owner!r}: method {owner!r} {what}; methods with settings: "
                        f"{', '.join(with_settings)}")
    return entry.settings


def legacy_keys() -> dict[str, tuple[str, str]]:
    """The flat keys of dhat-seg 0.1 config files (``trades_beta``) -> (method, setting) (``trades``, ``beta``)."""
    return {cls.legacy_key(name, f): (name, f) for name, e in TRAINING_METHODS.items() if (cls := e.settings) is not None
            for f in cls.field_names()}


def owned_keys() -> frozenset[str]:
    """The shared config keys some method owns (``owns``, and ``base``)."""
    return frozenset({"base"}.union(*(e.owns for e in TRAINING_METHODS.values())))


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


def readers_of(key: str) -> list[str]:
    """The methods that read ``key``, a shared key (``lambda2``) or a method's setting (``trades.beta``), with
    the configuration where only then: 'trades', 'dhat with base=trades', 'cfa with cfa.base=trades'."""
    owner = key.split(".", 1)[0] if "." in key else None
    out = [owner] if owner in TRAINING_METHODS else []
    for entry in TRAINING_METHODS.values():
        if owner == entry.name:
            continue
        if owner is None and (key in entry.owns or key == "base" and entry.bases):
            out.append(entry.name)
            continue
        out += [f"{entry.name} with {r.described}" for r in entry.also_reads if r.owner == owner]
        if entry.bases:
            bases = [b for b in entry.allowed_bases() if b in TRAINING_METHODS and b != entry.name
                     and (owner == b or owner is None and key in TRAINING_METHODS[b].owns
                          or any(r.owner == owner for r in TRAINING_METHODS[b].also_reads))]
            if bases:
                out.append(f"{entry.name} with base={'|'.join(bases)}")
    return out


def unread_settings(cfg: Any, explicit: Any) -> None:
    """UserError for a key of ``explicit`` (shared, or ``method.setting``) that some method owns, whose value in
    ``cfg`` is not its default, and that ``cfg.method`` (with its base) does not read: the run would ignore it
    without a word."""
    import dataclasses

    entry = TRAINING_METHODS.get(cfg.method)
    if entry is None:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    shared, owners = entry.shared_read(cfg), entry.settings_read(cfg)
    where = f" with base={cfg.base}" if entry.bases else ""
    for key in sorted(explicit):
        if "." in key:
            owner, name = key.split(".", 1)
            settings = cfg.options(owner) if owner in cfg.method_options else None
            if owner in owners or settings is None or name not in settings.changed():
                continue
            value = getattr(settings, name)
        elif key in owned_keys() and key not in shared and getattr(cfg, key) != defaults.get(key):
            value = getattr(cfg, key)
        else:
            continue
        raise UserError(f"{key}={value!r} is not read by method {cfg.method!r}{where}; it is read by "
                        f"{', '.join(readers_of(key))}")


def check_method_config(cfg: Any) -> None:
    """The method's own constraints: ``base`` among its bases, its settings' ranges, and its ``check``."""
    entry = TRAINING_METHODS.get(cfg.method)
    if entry is None:
        return
    if entry.bases and cfg.base not in entry.allowed_bases():
        raise UserError(f"base {cfg.base!r} is not available with method {cfg.method!r}; expected one of "
                        f"{', '.join(entry.allowed_bases())}")
    if entry.check is not None:
        entry.check(cfg)
