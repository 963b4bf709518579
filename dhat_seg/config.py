"""Run configuration: one dataclass, loaded from YAML and overridden from the CLI.

Perturbation sizes (``eps``, ``step_size``, ``inv_eps``, ``inv_step_size``) are in
units of 1/255, as the papers write them (8 means 8/255).

The dataclass defaults are the paper's training recipe (DHAT supplementary 6.1,
REFERENCE section 1) except where a measured defect made dhat-seg choose otherwise
(each such default says so). ``validate`` checks every value's type, every enumerated
setting against its registry and every range when a config is loaded, before any data
is generated or model built. ``paper_differences`` lists the settings of a config that
differ from the paper's, which ``dhat-seg train`` prints at the start of a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dhat_seg.presets import PRESETS  # noqa: F401  (config.PRESETS: load_config's names)
from dhat_seg.config_types import typed as _typed
from dhat_seg.errors import UserError
from dhat_seg.method_options import explicit_keys, merge, migrate, resolve_method_options


@dataclass
class TrainConfig:
    # what to train
    method: str = "dhat"
    model: str = "resnet18"
    # data
    data: str = "synthetic"
    data_root: str | None = None
    download: bool = False
    image_size: int = 32
    train_size: int | None = None
    test_size: int | None = None
    val_size: int | float = 0.1  # a fraction in (0, 1) or a number of samples
    rho: float = 0.9
    # built-in data: the generator's foreground salience (0 = version-1 colours)
    salience: float = 0.4  # = dhat_seg.data.synthetic.DEFAULT_SALIENCE (a test keeps them equal)
    augment: bool = True
    # attention (DHAT)
    attention: str = "gradcam"
    attention_options: dict[str, Any] = field(default_factory=dict)
    attention_checkpoint: str | None = None
    attention_model: str | None = None
    attention_model_arch: str = "resnet18"
    attention_model_epochs: int = 10
    threshold_policy: str = "fixed"
    omega: float = 0.1
    quantile: float = 0.5
    # where DHAT's masks come from: "cache" = computed once per sample on the
    # un-augmented image and augmented with it (dhat_seg.cache); "online" = recomputed
    # every batch on the augmented clean image (the authors' code)
    mask_source: str = "cache"
    # "frozen" = the separate attention model (the paper); "self" = the model being
    # trained, in eval mode (as PART); with mask_source "cache" its masks are rebuilt
    # every mask_refresh_every epochs (0 = computed once, at the first epoch)
    attention_source: str = "frozen"
    mask_refresh_every: int = 0
    # epochs trained without attention terms before masks are first taken (DHAT trains as
    # UIAT meanwhile); required with attention_source "self", whose masks would otherwise
    # come from the randomly initialised model (PART uses 20 epochs of plain AT)
    attention_burn_in: int = 0
    # losses
    lambda1: float = 1.0
    lambda2: float = 1.0
    dhlr_form: str = "code"
    floe_form: str = "paper"
    floe_p: float = 2.0
    # the loss UIAT, DHAT, FSR and PART build on (ignored by the other methods): "at" =
    # CE(f(x_adv), y) on PGD examples (the paper); another method with is_base (trades, mart,
    # cfa, sglr) = that method's loss with its own x_adv, from which x_inv and x_B are made
    base: str = "at"
    # adversarial weight perturbation (AWP, Wu et al. 2020) around any method's loss: the
    # weights are perturbed by awp_gamma times each layer's norm for the loss and restored
    # before the step; no AWP in the first awp_warmup epochs (the official scripts' --awp-warmup W
    # against 1-based epochs is W - 1 here). TRADES-AWP: gamma 5e-3, W 10 = 9; AT-AWP: gamma 1e-2, 0 (awp.py)
    awp: bool = False
    awp_gamma: float = 5e-3
    awp_warmup: int = 0
    # the settings each training method owns, by method name (TRADES' beta, CFA's calibration, ...):
    # YAML ``method_options: {trades: {beta: 3.0}}``, CLI ``--set trades.beta=3``; each method's
    # frozen settings dataclass (its module, e.g. training_methods/cfa.py CFASettings) holds the
    # defaults, types and ranges. A run's config.yaml lists the settings of every method it reads.
    method_options: dict[str, Any] = field(default_factory=dict)
    # attacks used for training
    eps: float = 8.0
    step_size: float = 2.0
    attack_steps: int = 10
    inv_eps: float = 4.0
    inv_step_size: float = 2.0
    inv_steps: int = 10
    # "train" or "eval": the model's mode while the training attacks craft; null = the method's authors' (the
    # registry's: eval for TRADES, MART, CFA, SGLR, FSR, PART, AGAIN; train for AT, UIAT, DHAT on any base)
    attack_mode: str | None = None
    # "fp32": attacks run in full precision inside autocast (input gradients of confident
    # samples underflow in fp16); "autocast": the attacks use the training precision
    attack_precision: str = "fp32"
    # whether attack forwards and DHAT's x_B forward update BatchNorm running statistics
    # (true in the authors' code); false keeps UIAT and DHAT rows' BN statistics
    # comparable: only the forwards of x_adv and x_inv update them (see methods.py)
    attack_bn_update: bool = False
    # optimisation
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [80, 90])
    gamma: float = 0.1
    # validation (checkpoint selection) and final test
    val_examples: int = 500
    val_attack_steps: int = 10
    test_examples: int | None = None
    # running: seed seeds training, attacks and evaluation sampling; data_seed seeds the
    # data (synthetic generation, validation carve-out, size subsets) and the frozen
    # attention model, so it fixes the mask caches (null = seed). `ablate --seeds` keeps
    # data_seed fixed, so every seed of a row shares one attention model and mask cache.
    seed: int = 0
    data_seed: int | None = None
    device: str = "auto"
    # autocast for the training forward/backward passes (never the attacks, see
    # attack_precision); amp_dtype "auto" = bfloat16 where the device supports it (no
    # loss scaling needed), else float16 with a GradScaler
    amp: bool = False
    amp_dtype: str = "auto"
    # speed only, results equal up to float rounding (dhat_seg/run/speed.py): channels-last model and
    # inputs; torch.compile of the model's forward (opt-in: the first batches compile)
    channels_last: bool = False
    compile: bool = False
    num_workers: int = 0  # DataLoader workers; -1 = none on CPU, min(8, CPUs - 1) on CUDA
    sync_every: int = 0  # batches between reads of the loss statistics (0: 1 on CPU, 50 on CUDA)
    # the training set on the device, cropped and flipped there a batch at a time (dhat_seg/run/device_data.py):
    # null = on CUDA for in-memory data (synthetic, CIFAR), true = on any device, false = the DataLoader
    data_on_device: bool | None = None
    sync_bn: bool = False  # torchrun: BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only)
    # divergence guard: training stops with an error (the last good checkpoint kept) when
    # the loss is not finite or a clean or x_B logit exceeds this in absolute value (0 = off)
    max_abs_logit: float = 1e4

    def check_ranges(self) -> "TrainConfig":
        """Types and ranges: no registry needed, so such a refusal comes before torch is imported."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _typed(f.name, getattr(self, f.name), _HINTS[f.name]))
        checks = [
            (self.epochs >= 1, "epochs", "a positive integer"),
            (self.batch_size >= 1, "batch_size", "a positive integer"),
            (self.lr > 0, "lr", "a positive number"),
            (0 <= self.momentum < 1, "momentum", "a number in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", "a non-negative number"),
            (self.gamma > 0, "gamma", "a positive number"),
            (all(m >= 1 for m in self.milestones) and list(self.milestones) == sorted(set(self.milestones)),
             "milestones", "a strictly increasing list of positive epochs"),
            (0 <= self.rho <= 1, "rho", "a number in [0, 1]"),
            (0 <= self.salience < 1, "salience", "a number in [0, 1) (0 = the version-1 colours)"),
            (self.eps >= 0, "eps", "a non-negative number (units of 1/255)"),
            (self.step_size >= 0, "step_size", "a non-negative number (units of 1/255)"),
            (self.inv_eps >= 0, "inv_eps", "a non-negative number (units of 1/255)"),
            (self.inv_step_size >= 0, "inv_step_size", "a non-negative number (units of 1/255)"),
            (self.attack_steps >= 0, "attack_steps", "a non-negative integer"),
            (self.inv_steps >= 0, "inv_steps", "a non-negative integer"),
            (self.val_attack_steps >= 0, "val_attack_steps", "a non-negative integer"),
            (self.lambda1 >= 0, "lambda1", "a non-negative number"),
            (self.lambda2 >= 0, "lambda2", "a non-negative number"),
            (self.floe_p >= 1, "floe_p", "a number >= 1 (the p of a p-norm; inf allowed)"),
            (0 < self.omega < 1, "omega", "a number in (0, 1) (threshold on a [0, 1] attention map)"),
            (0 < self.quantile < 1, "quantile", "a number in (0, 1)"),
            (self.attention_model_epochs >= 1, "attention_model_epochs", "a positive integer"),
            (self.image_size >= 8, "image_size", "an integer >= 8"),
            (self.num_workers >= -1, "num_workers", "a non-negative integer or -1 (automatic: from the CPU count)"),
            (self.sync_every >= 0, "sync_every", "a non-negative integer (0 = automatic)"),
            (self.val_examples >= 1, "val_examples", "a positive integer"),
            (self.val_size > 0, "val_size", "a fraction in (0, 1) or a number of samples >= 1"),
            (self.val_size < 1 or isinstance(self.val_size, int), "val_size", "a fraction in (0, 1) or a whole number of samples"),
            (self.train_size is None or self.train_size >= 1, "train_size", "a positive integer or null (all)"),
            (self.test_size is None or self.test_size >= 1, "test_size", "a positive integer or null (all)"),
            (self.test_examples is None or self.test_examples >= 1, "test_examples", "a positive integer or null (all)"),
            (self.seed >= 0, "seed", "a non-negative integer"),
            (self.data_seed is None or self.data_seed >= 0, "data_seed", "a non-negative integer or null (= seed)"),
            (self.mask_refresh_every >= 0, "mask_refresh_every", "a non-negative integer (epochs; 0 = never)"),
            (0 <= self.attention_burn_in < self.epochs or self.attention_burn_in == 0, "attention_burn_in",
             f"a non-negative integer smaller than epochs ({self.epochs})"),
            (self.max_abs_logit >= 0, "max_abs_logit", "a non-negative number (0 = no logit limit)"),
            (self.awp_gamma >= 0, "awp_gamma", "a non-negative number (relative size of the weight perturbation)"),
            (0 <= self.awp_warmup < self.epochs or self.awp_warmup == 0, "awp_warmup",
             f"a non-negative integer smaller than epochs ({self.epochs})"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise UserError(f"config option {name}={getattr(self, name)!r} is invalid; expected {expected}")
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_validated", False)  # any change: validate again

    @property
    def validated(self) -> bool:
        """Whether :meth:`validate` passed and no setting was assigned since (a run is validated once)."""
        return getattr(self, "_validated", False)

    def validate(self) -> "TrainConfig":
        """Check types, enumerated settings (against their registries) and ranges.

        Raises a UserError naming the key, the value and what is allowed. :attr:`validated` is then true
        until a setting is assigned.
        """
        self.check_ranges()
        for name, allowed in _choices(self).items():
            value = getattr(self, name)
            if value not in allowed:
                raise UserError(f"{name} {value!r} is unknown; expected one of {', '.join(map(str, allowed))}")
        self.method_options = resolve_method_options(self)
        from dhat_seg.training_methods import check_method_config

        check_method_config(self)  # the method's bases and own constraints (the registry's)
        if self.method == "again" or self.model.endswith("_again"):  # AGAIN's code form on <name>_again only
            from dhat_seg.training_methods.again_code import check_config as check_again

            check_again(self)
        if self.attention_source == "self" and self.attention_burn_in == 0 and needs_attention(self.method):
            raise UserError("config option attention_burn_in=0 is invalid with attention_source='self': the first masks "
                            "would come from the randomly initialised model; expected attention_burn_in >= 1 epochs "
                            "(PART uses 20 epochs of plain AT, so the run needs >= 2 epochs), or attention_source='frozen'")
        object.__setattr__(self, "_validated", True)
        return self

    @property
    def dataset_seed(self) -> int:
        """The seed of the data and of the frozen attention model: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    def options(self, method: str) -> Any:
        """The settings of training method ``method`` (its frozen settings dataclass): the run's
        ``method_options[method]``, else the method's defaults."""
        from dhat_seg.training_methods import settings_class

        cls = settings_class(method)
        return cls.build(method, self.method_options.get(method))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Short hash of the settings that change results (for traceability, and to tell
        whether a finished run can be reused). The settings of :data:`ALWAYS_DIGESTED` enter
        it always; every other shared setting, and every method's setting, only where it
        differs from its default, so a setting added later never changes the digest of a run
        that leaves it alone (and runs finished before it existed stay reusable)."""
        from dhat_seg.training_methods import attack_mode_of

        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "method_options" or f.name not in ALWAYS_DIGESTED and value == _default(f):
                continue
            values[f.name] = value
        values["attack_mode"] = attack_mode_of(self)  # null = the method's: "train" (the old default) for at, uiat, dhat
        for owner in sorted(self.method_options):
            values.update(self.options(owner).digest_items(owner, self.method))
        from dhat_seg.data.registry import generator_version

        generator = generator_version(self.data)
        if generator is not None:  # built-in data: runs on an older generator's images are never reused
            values["data_generator"] = generator
        blob = json.dumps(values, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


#: The shared settings of dhat-seg 0.1 that every digest holds, at any value (frozen: a setting added
#: later enters a digest only at a value other than its default, so this list never grows).
ALWAYS_DIGESTED: frozenset[str] = frozenset((
    "method", "model", "data", "data_root", "download", "image_size", "train_size", "test_size", "val_size", "rho",
    "salience", "augment", "attention", "attention_options", "attention_checkpoint", "attention_model",
    "attention_model_arch", "attention_model_epochs", "threshold_policy", "omega", "quantile", "mask_source",
    "attention_source", "mask_refresh_every", "attention_burn_in", "lambda1", "lambda2", "dhlr_form", "floe_form",
    "floe_p", "eps", "step_size", "attack_steps", "inv_eps", "inv_step_size", "inv_steps", "attack_mode",
    "attack_precision", "attack_bn_update", "epochs", "batch_size", "lr", "momentum", "weight_decay", "milestones",
    "gamma", "val_examples", "val_attack_steps", "test_examples", "seed", "data_seed", "device", "amp", "amp_dtype",
    "num_workers", "max_abs_logit"))


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def needs_attention(method: str | None) -> bool:
    """Whether a training method reads attention masks (dhat, part; not uiat, at, ...)."""
    from dhat_seg.training_methods import TRAINING_METHODS

    return method in TRAINING_METHODS and TRAINING_METHODS[method].cls.needs_attention


def _choices(cfg: TrainConfig) -> dict[str, tuple]:
    """Allowed values of every enumerated setting, from the registry that defines it."""
    from dhat_seg.attacks import PRECISIONS
    from dhat_seg.attention import THRESHOLD_POLICIES
    from dhat_seg.data import DATASETS
    from dhat_seg.losses import DHLR_FORMS, FLOE_FORMS
    from dhat_seg.training_methods import TRAINING_METHODS, base_methods
    from dhat_seg.models import MODELS

    choices = {
        "method": tuple(TRAINING_METHODS), "model": tuple(MODELS), "attention_model_arch": tuple(MODELS), "data": tuple(DATASETS),
        "dhlr_form": DHLR_FORMS, "floe_form": FLOE_FORMS, "threshold_policy": THRESHOLD_POLICIES,
        "attack_mode": ("train", "eval", None), "attack_precision": PRECISIONS, "mask_source": ("cache", "online"),
        "attention_source": ("frozen", "self"), "amp_dtype": AMP_DTYPES, "base": base_methods(),
    }
    if needs_attention(cfg.method):
        from dhat_seg.attention.plugin_manager import get_attention_spec

        spec = get_attention_spec(cfg.attention)  # a UserError naming the installed methods
        spec.resolve_options(cfg.attention_options)  # option names and types, before anything is built
    return choices


AMP_DTYPES = ("auto", "bfloat16", "float16")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                resumed: bool = False, check_unread: bool = False, notes: list[str] | None = None) -> TrainConfig:
    """Defaults <- preset name or YAML file <- overrides (None values are ignored); for
    ``method: part``, PART's mask settings where neither gives them
    (:func:`dhat_seg.method_defaults.part_settings`); for AGAIN's code form, AWP as released
    (:func:`dhat_seg.method_defaults.again_code_settings`). Milestones follow ``epochs``
    changed by ``overrides`` (:func:`~dhat_seg.method_defaults.scaled_milestones`; not when
    ``resumed``); explicit ones (overrides, YAML) at or past the last epoch are refused.

    The method's model variant where it needs one (``--method fsr`` on ``small_cnn``: ``small_cnn_fsr``),
    with one line in ``notes``. With ``check_unread`` (``dhat-seg train``), unless ``resumed``: a setting some method owns
    (a method's setting, ``base`` and the registry's ``owns``) that the user gives (``overrides``, or a YAML file written
    for the same method; not a built-in preset) at a value other than its default, and that the run's
    method does not read, is refused, naming the methods that read it
    (:func:`dhat_seg.training_methods.unread_settings`).

    A method's settings are read flat as dhat-seg 0.1 wrote them (``trades_beta``), dotted
    (``trades.beta``) or nested (``method_options: {trades: {beta: ...}}``) (:func:`migrate`)."""
    values: dict[str, Any] = {}
    file_keys, file_method = set(), None  # a YAML file's settings: the user's when written for the run's method
    explicit_milestones = False
    if path is not None and str(path) in PRESETS:
        values.update(migrate(PRESETS[str(path)], FIELDS))
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config {str(path)!r} does not exist; expected a YAML file or a preset ({', '.join(PRESETS)})")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {str(path)!r} must hold a mapping of option: value")
        loaded = migrate(loaded, FIELDS)
        values.update(loaded)
        explicit_milestones = "milestones" in loaded and not resumed
        file_keys, file_method = explicit_keys(loaded), loaded.get("method", FIELDS["method"].default)
    given = migrate({k: v for k, v in (overrides or {}).items() if v is not None}, FIELDS)
    base_epochs = values.get("epochs", FIELDS["epochs"].default)
    base_milestones = values.get("milestones", FIELDS["milestones"].default_factory())
    values = merge(values, given)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"config option {unknown[0]!r} is unknown; known options: {', '.join(FIELDS)}, and a "
                        "training method's settings as METHOD.SETTING (e.g. trades.beta; `dhat-seg methods` lists them)")
    explicit_milestones = explicit_milestones or "milestones" in given
    epochs = values.get("epochs", base_epochs)
    if ("epochs" in given and "milestones" not in given and not resumed and isinstance(epochs, int)
            and not isinstance(epochs, bool) and epochs >= 1 and epochs != base_epochs):
        from dhat_seg.method_defaults import scaled_milestones

        values["milestones"] = scaled_milestones(list(base_milestones), base_epochs, epochs)
    from dhat_seg.method_defaults import method_steps

    explicit = (file_keys if file_method == values.get("method", FIELDS["method"].default) else set()) | explicit_keys(given)
    method_steps(TrainConfig, values, explicit, check_unread and not resumed, notes)
    if values.get("method") == "part":  # PART's mask settings where neither the file nor an override gives them
        from dhat_seg.method_defaults import part_settings

        cfg = TrainConfig(**values)
        values.update(part_settings(cfg.epochs, cfg.attention, cfg.attention_options or {}, values.__contains__))
    if values.get("method") == "again" and (values.get("method_options") or {}).get("again", {}).get("form") == "code":
        # AWP as released, unless given
        from dhat_seg.method_defaults import again_code_settings

        values.update(again_code_settings(TrainConfig(**values).epochs, values.__contains__))
    cfg = TrainConfig(**values).validate()
    late = [m for m in cfg.milestones if m >= cfg.epochs]
    if explicit_milestones and late:
        raise UserError(f"milestones {cfg.milestones} include {late[0]}, at or past the last epoch ({cfg.epochs}): it would "
                        f"never take effect; expected milestones from 1 to {cfg.epochs - 1} (a decay after that many epochs)")
    return cfg


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
