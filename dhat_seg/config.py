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
    # the loss UIAT and DHAT add their terms to (ignored by the other methods): "at" =
    # CE(f(x_adv), y) on PGD examples (the paper); "trades" or "mart" = that method's loss
    # with its own x_adv, from which x_inv and x_B are made
    base: str = "at"
    # TRADES (method trades, or base trades): beta of KL(p_nat || p_adv); 6.0 = the
    # authors' CIFAR-10 script (their trades_loss defaults to 1.0)
    trades_beta: float = 6.0
    # MART (method mart, or base mart): beta of the weighted KL; 6.0 = the authors'
    # WRN-34-10 script (their ResNet-18 script uses 5.0)
    mart_beta: float = 6.0
    # adversarial weight perturbation (AWP, Wu et al. 2020) around any method's loss: the
    # weights are perturbed by awp_gamma times each layer's norm for the loss and restored
    # before the step; no AWP in the first awp_warmup epochs (the official scripts' --awp-warmup W
    # against 1-based epochs is W - 1 here). TRADES-AWP: gamma 5e-3, W 10 = 9; AT-AWP: gamma 1e-2, 0 (awp.py)
    awp: bool = False
    awp_gamma: float = 5e-3
    awp_warmup: int = 0
    # CFA (Wei et al., CVPR 2023; method cfa, or base cfa = DHAT-CFA; training_methods/cfa.py):
    # cfa_base "at" = AT+CFA (CCM + FAWA), "trades" = TRADES+CFA (CCM + CCR + FAWA). CCM:
    # class k's radius (cfa_lambda1 + t_k) eps, t_k = its train robust accuracy in the
    # previous epoch (null = the paper's 0.5 for at, 0.3 for trades); CCR: TRADES' beta
    # (cfa_lambda2 + t_k) trades_beta; both from 0-based epoch cfa_begin (official code: 10)
    cfa_base: str = "at"
    cfa_lambda1: float | None = None
    cfa_lambda2: float = 0.5
    cfa_begin: int = 10
    # FAWA: after each epoch from 0-based epoch fawa_begin (paper: 50) whose worst class
    # reaches fawa_threshold (a fraction; paper: 0.2) in validation robust accuracy, the
    # evaluated weights become fawa_decay (paper: 0.85) x themselves + (1 - fawa_decay) x the
    # trained ones (the first such epoch: a copy of the trained ones)
    fawa_decay: float = 0.85
    fawa_threshold: float = 0.2
    fawa_begin: int = 50
    # SGLR (Li et al., CVPR 2024; method sglr, or base sglr; training_methods/sglr.py): from
    # 0-based epoch sglr_start (null = 10 epochs before the first LR milestone, the official
    # script's placement) each training sample's soft label t, one-hot at first, becomes
    # sglr_momentum t + (1 - sglr_momentum) (sglr_clean_weight p(x) + (1 - sglr_clean_weight)
    # p(x_adv)) at each visit and the loss is CE(f(x_adv), t); 0.9 and 0.2: the official code
    sglr_momentum: float = 0.9
    sglr_clean_weight: float = 0.2
    sglr_start: int | None = None
    # FSR (Kim et al., CVPR 2023; method fsr on a model <name>_fsr, with base at | trades | mart;
    # training_methods/fsr.py): L_base + fsr_lambda_sep [CE(aux(f+), y) + CE(aux(f-), y')] +
    # fsr_lambda_rec CE(aux(f~-), y) on x_adv's features, y' the highest-scoring wrong class;
    # the mask is a Gumbel-sigmoid at temperature fsr_tau (saved with the model's weights); the
    # FSR terms are added from 0-based epoch fsr_begin (0 = the paper and code; a later start lets
    # short runs of small models leave chance first, see training_methods/fsr.py)
    fsr_lambda_sep: float = 1.0
    fsr_lambda_rec: float = 1.0
    fsr_tau: float = 0.1
    fsr_begin: int = 0
    # PART (Zhang et al., ICML 2024; method part on base at | trades | mart; training_methods/part.py): the
    # attack's budget is eps on the pixels the foreground mask marks important, part_eps_low elsewhere (units of
    # 1/255; null = eps - 1, the paper's); paper masks: threshold_policy mean_std, attention_source self
    part_eps_low: float | None = None
    # AGAIN (method again): "paper" = the supplementary (training_methods/again.py), "code" = as released
    # (again_code.py; model <name>_again, AWP on unless awp* are given)
    again_form: str = "paper"
    again_alpha: float = 0.6  # y's share of the mixed logit (paper) or of the mixed mask (code); 0.6 in both
    again_fake_label: str = "random"  # paper form's y': a "random" wrong class, or the "highest"-scoring one
    again_hff: bool | None = None  # the official code's HFF on the first stage; null: on for paper, off for code
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
    # speed only, results equal up to float rounding (dhat_seg/speed.py): channels-last model and
    # inputs; torch.compile of the model's forward (opt-in: the first batches compile)
    channels_last: bool = False
    compile: bool = False
    num_workers: int = 0  # DataLoader workers; -1 = none on CPU, min(8, CPUs - 1) on CUDA
    sync_every: int = 0  # batches between reads of the loss statistics (0: 1 on CPU, 50 on CUDA)
    # the training set on the device, cropped and flipped there a batch at a time (dhat_seg/device_data.py):
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
            (self.trades_beta >= 0, "trades_beta", "a non-negative number"),
            (self.mart_beta >= 0, "mart_beta", "a non-negative number"),
            (self.awp_gamma >= 0, "awp_gamma", "a non-negative number (relative size of the weight perturbation)"),
            (0 <= self.awp_warmup < self.epochs or self.awp_warmup == 0, "awp_warmup",
             f"a non-negative integer smaller than epochs ({self.epochs})"),
            (self.cfa_lambda1 is None or self.cfa_lambda1 >= 0, "cfa_lambda1",
             "a non-negative number or null (the paper's value for cfa_base)"),
            (self.cfa_lambda2 >= 0, "cfa_lambda2", "a non-negative number"),
            (self.cfa_begin >= 0, "cfa_begin", "a non-negative integer (0-based epoch)"),
            (0 <= self.fawa_decay < 1, "fawa_decay", "a number in [0, 1)"),
            (0 <= self.fawa_threshold <= 1, "fawa_threshold", "a number in [0, 1] (a fraction of a class's samples)"),
            (self.fawa_begin >= 0, "fawa_begin", "a non-negative integer (0-based epoch)"),
            (0 <= self.sglr_momentum <= 1, "sglr_momentum", "a number in [0, 1]"),
            (0 <= self.sglr_clean_weight <= 1, "sglr_clean_weight", "a number in [0, 1]"),
            (self.fsr_lambda_sep >= 0, "fsr_lambda_sep", "a non-negative number"),
            (self.fsr_lambda_rec >= 0, "fsr_lambda_rec", "a non-negative number"),
            (self.fsr_tau > 0, "fsr_tau", "a positive number (the Gumbel-sigmoid temperature)"),
            (self.fsr_begin >= 0, "fsr_begin", "a non-negative integer (0-based epoch)"),
            (self.part_eps_low is None or 0 <= self.part_eps_low <= self.eps, "part_eps_low",
             f"a number in [0, eps={self.eps:g}] (units of 1/255) or null (eps - 1)"),
            (0 <= self.again_alpha <= 1, "again_alpha", "a number in [0, 1] (the true label's share of the mixed logit)"),
            (self.sglr_start is None or self.sglr_start >= 0, "sglr_start",
             "a non-negative integer (0-based epoch) or null (10 epochs before the first milestone)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise UserError(f"config option {name}={getattr(self, name)!r} is invalid; expected {expected}")
        return self

    def validate(self) -> "TrainConfig":
        """Check types, enumerated settings (against their registries) and ranges.

        Raises a UserError naming the key, the value and what is allowed.
        """
        self.check_ranges()
        for name, allowed in _choices(self).items():
            value = getattr(self, name)
            if value not in allowed:
                raise UserError(f"{name} {value!r} is unknown; expected one of {', '.join(map(str, allowed))}")
        from dhat_seg.training_methods import check_method_config

        check_method_config(self)  # the method's bases and own constraints (the registry's)
        if self.method == "again" or self.model.endswith("_again"):  # AGAIN's code form on <name>_again only
            from dhat_seg.training_methods.again_code import check_config as check_again

            check_again(self)
        if self.attention_source == "self" and self.attention_burn_in == 0 and needs_attention(self.method):
            raise UserError("config option attention_burn_in=0 is invalid with attention_source='self': the first masks "
                            "would come from the randomly initialised model; expected attention_burn_in >= 1 epochs "
                            "(PART uses 20 epochs of plain AT), or attention_source='frozen'")
        return self

    @property
    def dataset_seed(self) -> int:
        """The seed of the data and of the frozen attention model: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Short hash of the settings that change results (for traceability, and to tell
        whether a finished run can be reused). Keys added in a later version are left
        out while they hold the value that reproduces the earlier behaviour
        (``DIGEST_NEUTRAL``), so runs finished before they existed stay reusable."""
        values = self.to_dict()
        # again_hff null is the form's default: on for paper (true, the old default), off for code
        values["again_hff"] = values["again_form"] == "paper" if values["again_hff"] is None else values["again_hff"]
        from dhat_seg.training_methods import attack_mode_of

        values["attack_mode"] = attack_mode_of(self)  # null = the method's: "train" (the old default) for at, uiat, dhat
        values = {k: v for k, v in values.items() if k not in DIGEST_NEUTRAL or v != DIGEST_NEUTRAL[k]}
        if self.method == "again" and values.get("again_hff", True):  # HFF is the released code's, not the earlier MixStyle
            values["again_hff_formula"] = "code"
        from dhat_seg.data.registry import generator_version

        generator = generator_version(self.data)
        if generator is not None:  # built-in data: runs on an older generator's images are never reused
            values["data_generator"] = generator
        blob = json.dumps(values, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


#: Keys added after 0.1.0 + data_seed, at the value under which a run trains exactly as before they existed.
DIGEST_NEUTRAL: dict[str, Any] = {"base": "at", "trades_beta": 6.0, "mart_beta": 6.0, "awp": False, "awp_gamma": 5e-3,
                                  "awp_warmup": 0, "cfa_base": "at", "cfa_lambda1": None, "cfa_lambda2": 0.5,
                                  "cfa_begin": 10, "fawa_decay": 0.85, "fawa_threshold": 0.2, "fawa_begin": 50,
                                  "sglr_momentum": 0.9, "sglr_clean_weight": 0.2, "sglr_start": None,
                                  "fsr_lambda_sep": 1.0, "fsr_lambda_rec": 1.0, "fsr_tau": 0.1,
                                  "fsr_begin": 0, "part_eps_low": None, "again_alpha": 0.6, "again_fake_label": "random",
                                  "again_form": "paper", "again_hff": True, "sync_every": 0, "sync_bn": False, "data_on_device": None, "channels_last": False,
                                  "compile": False}



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
    from dhat_seg.training_methods import AGAIN_FAKE_LABELS, AGAIN_FORMS, BASE_METHODS, TRAINING_METHODS
    from dhat_seg.training_methods.cfa import CFA_BASES
    from dhat_seg.models import MODELS

    choices = {
        "method": tuple(TRAINING_METHODS), "model": tuple(MODELS), "attention_model_arch": tuple(MODELS), "data": tuple(DATASETS),
        "dhlr_form": DHLR_FORMS, "floe_form": FLOE_FORMS, "threshold_policy": THRESHOLD_POLICIES,
        "attack_mode": ("train", "eval", None), "attack_precision": PRECISIONS, "mask_source": ("cache", "online"),
        "attention_source": ("frozen", "self"), "amp_dtype": AMP_DTYPES, "base": tuple(BASE_METHODS),
        "cfa_base": CFA_BASES, "again_fake_label": AGAIN_FAKE_LABELS, "again_form": AGAIN_FORMS,
    }
    if needs_attention(cfg.method):
        from dhat_seg.plugin_manager import get_attention_spec

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
    (the registry's ``settings`` and ``base``) that the user gives (``overrides``, or a YAML file written
    for the same method; not a built-in preset) at a value other than its default, and that the run's
    method does not read, is refused, naming the methods that read it
    (:func:`dhat_seg.training_methods.unread_settings`)."""
    values: dict[str, Any] = {}
    file_keys, file_method = set(), None  # a YAML file's settings: the user's when written for the run's method
    explicit_milestones = False
    if path is not None and str(path) in PRESETS:
        values.update(PRESETS[str(path)])
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
        values.update(loaded)
        explicit_milestones = "milestones" in loaded and not resumed
        file_keys, file_method = set(loaded), loaded.get("method", FIELDS["method"].default)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    base_epochs = values.get("epochs", FIELDS["epochs"].default)
    base_milestones = values.get("milestones", FIELDS["milestones"].default_factory())
    values.update(given)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"config option {unknown[0]!r} is unknown; known options: {', '.join(FIELDS)}")
    explicit_milestones = explicit_milestones or "milestones" in given
    epochs = values.get("epochs", base_epochs)
    if ("epochs" in given and "milestones" not in given and not resumed and isinstance(epochs, int)
            and not isinstance(epochs, bool) and epochs >= 1 and epochs != base_epochs):
        from dhat_seg.method_defaults import scaled_milestones

        values["milestones"] = scaled_milestones(list(base_milestones), base_epochs, epochs)
    from dhat_seg.method_defaults import method_steps

    explicit = (file_keys if file_method == values.get("method", FIELDS["method"].default) else set()) | set(given)
    method_steps(TrainConfig, values, explicit, check_unread and not resumed, notes)
    if values.get("method") == "part":  # PART's mask settings where neither the file nor an override gives them
        from dhat_seg.method_defaults import part_settings

        cfg = TrainConfig(**values)
        values.update(part_settings(cfg.epochs, cfg.attention, cfg.attention_options or {}, values.__contains__))
    if values.get("method") == "again" and values.get("again_form") == "code":  # AWP as released, unless given
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
