"""``dhat-seg eval``: load a trained model, run the evaluation protocol, write eval.json.

What is measured (DHAT evaluation protocol, REFERENCE section 1):

* accuracy under each requested attack (clean, FGSM, PGD-10/20/50, C&W-inf, AutoAttack)
  on the first ``n_examples`` samples of the test split, and the per-sample worst case;
* the Robust Gap: the same attack (``gap_attack``, default PGD-10) on the first
  ``gap_examples`` samples of the *un-augmented training split* minus on the test set;
* on datasets with a background-shifted test set (the built-in data, an image folder
  with ``test-mixed-rand/``): the BG-gap,
  clean and PGD-10 accuracy on ``test`` (training-like backgrounds) minus
  ``test-mixed-rand`` (random backgrounds), on the same objects; and the
  Backgrounds-Challenge accuracies ``background_challenge``: ``same``, ``mixed_rand``,
  ``only_fg`` and ``no_fg_bg_class`` (percent, see :func:`_bg_gap`);
* for runs trained with an attention method: the IoU of its foreground (after the run's
  threshold policy) with the ground-truth masks, where the dataset has them;
* optionally (``sanity=True``) the gradient-masking checks of :mod:`dhat_seg.evaluation.sanity`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from dhat_seg import __version__
from dhat_seg.evaluation import evaluate
from dhat_seg.run.checkpoint import load_weights, resolve_weights
from dhat_seg.config import FIELDS, TrainConfig
from dhat_seg.method_options import migrate
from dhat_seg.data import DATASETS, split_for
from dhat_seg.data.registry import BACKGROUND_CHALLENGE_SPLITS, available_splits
from dhat_seg.errors import UserError
from dhat_seg.run.devices import select_device

EVAL_FILE = "eval.json"
MIXED_RAND_SPLIT = "test-mixed-rand"


def run_config_for(target: Path) -> TrainConfig | None:
    """The config.yaml of the run a target belongs to, if any (unknown keys ignored)."""
    for candidate in (target, target.parent, target.parent.parent, target.parent.parent.parent):
        path = candidate / "config.yaml"
        if path.is_file():
            values = migrate(yaml.safe_load(path.read_text()) or {})  # a 0.1 run's flat method settings too
            return TrainConfig(**{k: v for k, v in values.items() if k in FIELDS})
    return None


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("dhat-seg", "torch", "torchvision", "captum", "pyautoattack"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_count(value: str | None, flag: str, allow_zero: bool = False) -> int | None:
    """A sample count given on the command line ("all" or empty: None)."""
    if value is None or value.strip().lower() in ("", "all"):
        return None
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < (0 if allow_zero else 1):
        expected = "a non-negative integer (0 = off) or 'all'" if allow_zero else "a positive integer or 'all'"
        raise UserError(f"{flag} {value!r} is invalid; expected {expected}")
    return n


@dataclass
class EvalOptions:
    """Settings of one evaluation. Counts: None = all samples; 0 disables that part.

    Attributes:
        attacks: comma list of :data:`dhat_seg.evaluation.evaluate.EVAL_ATTACKS` names.
        n_examples: the first N samples of ``split``.
        aa_examples: AutoAttack on the first N of those only (it is the slow one).
        gap_attack: attack of the Robust Gap ("none" disables it).
        gap_examples: first N samples of the un-augmented training split for the Robust
            Gap (None: as many as test examples evaluated).
        bg_gap: measure the BG-gap where the dataset has a ``test-mixed-rand`` split.
        iou_examples: attention IoU on the first N test images (0: off).
        sanity: run the gradient-masking checks.
        sanity_examples: the sanity checks use the first N samples of ``split``, more than
            ``n_examples`` if asked (the noise check's power needs enough PGD-robust samples).
        eps: L_inf budget in 1/255 units.
        robust_accuracy: "any-iterate" (default: a sample is broken once the clean input or
            any point an attack visits is misclassified; AutoAttack then runs only on the
            samples every other attack left unbroken and reports the union) or
            "last-iterate" (each attack judged on its last iterate, AutoAttack alone on all
            samples, as many papers report). See :data:`dhat_seg.evaluation.evaluate.ROBUST_ACCURACY`.
    """

    attacks: str = ",".join(evaluate.DEFAULT_ATTACKS)
    n_examples: int | None = None
    aa_examples: int | None = None
    gap_attack: str = "pgd10"
    gap_examples: int | None = None
    bg_gap: bool = True
    iou_examples: int | None = 500
    sanity: bool = False
    sanity_examples: int | None = 500
    data: str | None = None
    split: str = "test"
    eps: float = 8.0
    robust_accuracy: str = "any-iterate"
    batch_size: int = 256
    device: str = "auto"
    seed: int = 0
    cache_dir: str | None = None
    output: str | None = None
    show_progress: bool = True

    def validate(self) -> "EvalOptions":
        self.attack_names = evaluate.parse_attacks(self.attacks)
        for flag, value, minimum in (("--n-examples", self.n_examples, 1), ("--aa-examples", self.aa_examples, 1),
                                     ("--gap-examples", self.gap_examples, 0), ("--iou-examples", self.iou_examples, 0),
                                     ("--sanity-examples", self.sanity_examples, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                what = "a positive integer" if minimum else "a non-negative integer (0 = off)"
                raise UserError(f"{flag} {value!r} is invalid; expected {what}")
        gap = (self.gap_attack or "none").strip()
        if gap not in ("none", "") and gap not in evaluate.EVAL_ATTACKS:
            raise UserError(f"--gap-attack {gap!r} is unknown; expected one of {', '.join(evaluate.EVAL_ATTACKS)} or 'none'")
        self.gap_attack = "none" if gap == "" else gap
        evaluate.check_counted(self.robust_accuracy)
        if self.eps < 0:
            raise UserError(f"--eps {self.eps} is invalid; expected a non-negative number (units of 1/255)")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} is invalid; expected a positive integer")
        return self

    def result_settings(self) -> dict[str, Any]:
        """The settings that change the numbers (compared by ``dhat-seg ablate`` to reuse a row)."""
        keys = ("attacks", "n_examples", "aa_examples", "gap_attack", "gap_examples", "bg_gap", "iou_examples",
                "sanity", "sanity_examples", "data", "split", "eps", "robust_accuracy", "seed")
        out = {k: getattr(self, k) for k in keys}
        out["attacks"] = list(evaluate.parse_attacks(self.attacks))
        return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _dataset(cfg: TrainConfig, split: str):
    """A split as the trainer builds it, un-augmented."""
    return split_for(cfg, split)


def run_eval(target: str | Path, options: EvalOptions | None = None, *, log: Callable[[str], None] = _log,
             **kwargs: Any) -> dict[str, Any]:
    """Evaluate the model at ``target`` (run dir, checkpoint dir or weights file) and
    write the report (default: RUN/eval.json). Keyword arguments set :class:`EvalOptions`."""
    opts = dataclasses.replace(options or EvalOptions(), **kwargs).validate()
    if "aa" in opts.attack_names or opts.gap_attack == "aa":
        evaluate.check_autoattack_version()  # before any attack runs
    target = Path(target)
    weights = resolve_weights(target)
    cfg = run_config_for(target.parent if target.is_file() else target) or TrainConfig()
    if opts.data:
        cfg.data = opts.data
    if cfg.data not in DATASETS:
        raise UserError(f"dataset {cfg.data!r} is unknown; known datasets: {', '.join(DATASETS)}")
    dev = select_device(opts.device)
    model = load_weights(weights).to(dev).eval()
    for p in model.parameters():  # attacks need input gradients only
        p.requires_grad_(False)
    out_dir = weights.parent.parent.parent if weights.parent.parent.name == "checkpoints" else weights.parent
    weights_sha = sha256_of_file(weights)
    t_start = time.time()

    test_ds = _dataset(cfg, opts.split)
    x, y = evaluate.collect(test_ds, opts.n_examples)
    n_aa = len(x) if opts.aa_examples is None else min(opts.aa_examples, len(x))
    common = dict(eps=opts.eps / 255, batch_size=opts.batch_size, device=dev, seed=opts.seed, show_progress=opts.show_progress,
                  counted=opts.robust_accuracy)

    def aa_state(split: str) -> Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor], Path]:
        def state(subset: torch.Tensor | None, xs: torch.Tensor, ys: torch.Tensor) -> Path:
            # named by the weights, the exact samples attacked (and their indices) and the settings:
            # a stale state, or one of another subset, is never continued
            path = evaluate.autoattack_state_file(out_dir / "aa_state", split, xs, ys, eps=opts.eps / 255, seed=opts.seed,
                                                  weights_sha=weights_sha, subset=subset)
            what = "all samples" if subset is None else f"the {len(xs)} samples no other attack broke"
            log(f"AutoAttack on {split} ({what}): "
                f"{'continuing' if path.exists() else 'starting afresh (no state for these samples and settings)'}"
                f" with state {path}")
            return path
        return state

    seconds: dict[str, float] = {}
    aa_warnings: list[str] = []
    # clean once, then every attack; AutoAttack last (any-iterate: on what the others left)
    flags = evaluate.flags_for_attacks(model, x, y, opts.attack_names, aa_examples=n_aa, aa_state_path=aa_state(opts.split),
                                       aa_warnings=aa_warnings, seconds=seconds, **common)
    accuracy = {name: evaluate.percent(f) for name, f in flags.items()}
    examples = {name: len(f) for name, f in flags.items()}
    worst, n_worst = evaluate.worst_case(flags)
    if len(flags) > 1:
        accuracy["worst_case"] = evaluate.percent(worst)
        examples["worst_case"] = n_worst

    report: dict[str, Any] = {
        "weights": str(weights),
        "weights_sha256": weights_sha,
        "data": cfg.data,
        "split": opts.split,
        "n_examples": len(y),
        "accuracy": accuracy,
        "examples": examples,
        # per-sample worst case on the samples every attack saw, with each attack on those same samples
        "worst_case": {"accuracy": evaluate.percent(worst), "n": n_worst, "over": list(flags),
                       "each_on_same_samples": {k: evaluate.percent(f[:n_worst]) for k, f in flags.items()}},
    }

    # ---- Robust Gap: same attack on training samples minus on test samples
    report["robust_gap"] = None
    if opts.gap_attack != "none" and opts.gap_examples != 0:
        t0 = time.time()
        gap = opts.gap_attack
        # the same attacks on both sides: AutoAttack (any-iterate) after the evaluation's other attacks
        chain = opts.attack_names if gap == "aa" and gap in flags and opts.robust_accuracy == "any-iterate" else [gap]
        if gap in flags:
            test_flags = flags[gap]
        else:
            n_test = n_aa if gap == "aa" else len(x)
            test_flags = evaluate.flags_for_attacks(model, x[:n_test], y[:n_test], chain, aa_state_path=aa_state(opts.split),
                                                    label="gap test ", aa_warnings=aa_warnings, **common)[gap]
        train_ds = _dataset(cfg, "train")
        n_train = opts.gap_examples if opts.gap_examples is not None else len(test_flags)
        xt, yt = evaluate.collect(train_ds, n_train)
        train_flags = evaluate.flags_for_attacks(model, xt, yt, chain, aa_state_path=aa_state("train"), label="gap train ",
                                                 aa_warnings=aa_warnings, **common)[gap]
        report["robust_gap"] = {"attack": gap, **evaluate.robust_gap(train_flags, test_flags),
                                "train_split": f"train (un-augmented), first {len(xt)} samples",
                                "test_split": f"{opts.split}, first {len(test_flags)} samples"}
        seconds["robust_gap"] = round(time.time() - t0, 2)

    # ---- BG-gap and the Backgrounds-Challenge accuracies (built-in data, folders holding the splits)
    report["bg_gap"] = None
    report["background_challenge"] = None
    if opts.bg_gap and MIXED_RAND_SPLIT in available_splits(cfg.data, cfg.data_root):
        t0 = time.time()
        report["bg_gap"], report["background_challenge"] = _bg_gap(
            model, cfg, opts, flags if opts.split == "test" else {}, len(x), common)
        seconds["bg_gap"] = round(time.time() - t0, 2)

    # ---- attention quality
    report["attention_iou"] = None
    from dhat_seg.training_methods import TRAINING_METHODS

    uses_attention = TRAINING_METHODS[cfg.method].cls.needs_attention  # dhat, part
    if uses_attention and opts.iou_examples != 0:
        t0 = time.time()
        report["attention_iou"] = _attention_iou(cfg, opts, model, dev, log)
        seconds["attention_iou"] = round(time.time() - t0, 2)

    if opts.sanity:
        from dhat_seg.evaluation import sanity

        t0 = time.time()
        n_s = opts.sanity_examples or len(x)
        if n_s > len(x) and opts.n_examples is not None:  # more samples than the attacks': collect them
            xs, ys = evaluate.collect(test_ds, n_s)
        else:
            xs, ys = x[:n_s], y[:n_s]
        surrogate, surrogate_desc = sanity.surrogate_for(cfg, model, dev, cache_dir=opts.cache_dir, log=log)
        results = sanity.run_checks(model, xs, ys, surrogate=surrogate, num_classes=test_ds.num_classes,
                                    eps=opts.eps / 255, batch_size=opts.batch_size, device=dev, seed=opts.seed,
                                    show_progress=opts.show_progress, counted=opts.robust_accuracy)
        # alpha marks results of the statistical rules: `ablate` evaluates older ones again
        report["sanity"] = {"n": len(ys), "surrogate": surrogate_desc, "passed": all(r.passed for r in results),
                            "alpha": sanity.ALPHA, "rule": sanity.RULE, "checks": [r.to_dict() for r in results]}
        seconds["sanity"] = round(time.time() - t0, 2)

    report.update({
        "attack_settings": evaluate.attack_settings(opts.attack_names, opts.eps / 255, counted=opts.robust_accuracy),
        "robust_accuracy": opts.robust_accuracy,
        "eval_settings": opts.result_settings(),
        "autoattack_warnings": sorted(set(aa_warnings)),
        "seed": opts.seed,
        "method": cfg.method,
        "attention": cfg.attention if uses_attention else None,
        "config_digest": cfg.digest(),
        "device": str(dev),
        "seconds": {**seconds, "total": round(time.time() - t_start, 2)},
        "versions": package_versions(),
        "dhat_seg_version": __version__,
    })
    path = Path(opts.output) if opts.output else out_dir / EVAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    report["path"] = str(path)
    return report


def _bg_gap(model, cfg: TrainConfig, opts: EvalOptions, test_flags: dict, n: int,
            common: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(BG-gap, Backgrounds-Challenge accuracies) on the first n samples of each test split.

    BG-gap: clean and PGD-10 accuracy on ``test`` minus on ``test-mixed-rand``. The
    challenge (Xiao et al., ICLR 2021): clean accuracy in percent on ``same`` (test),
    ``mixed_rand``, ``only_fg`` (objects on black) and ``no_fg_bg_class`` (objects
    blacked out on random backgrounds, scored against the *background's* class: how much
    the model reads the background), with PGD-10 accuracy on the first three.
    """
    names = ("clean", "pgd10")
    same = {k: v for k, v in test_flags.items() if k in names and len(v) == n}
    missing = [k for k in names if k not in same]
    if missing:
        xs, ys = evaluate.collect(_dataset(cfg, "test"), n)
        same.update(evaluate.flags_for_attacks(model, xs, ys, missing, label="bg same ", **common))
    xm, ym = evaluate.collect(_dataset(cfg, MIXED_RAND_SPLIT), n)
    mixed = evaluate.flags_for_attacks(model, xm, ym, names, label="bg mixed-rand ", **common)
    gap = {k: evaluate.background_gap(same[k], mixed[k]) for k in names} | {"n": min(n, len(ym))}
    splits = available_splits(cfg.data, cfg.data_root)
    if not all(split in splits for split in BACKGROUND_CHALLENGE_SPLITS.values()):
        return gap, None
    xf, yf = evaluate.collect(_dataset(cfg, BACKGROUND_CHALLENGE_SPLITS["only_fg"]), n)
    only_fg = evaluate.flags_for_attacks(model, xf, yf, names, label="bg only-fg ", **common)
    no_fg_ds = _dataset(cfg, BACKGROUND_CHALLENGE_SPLITS["no_fg_bg_class"])
    xn, _ = evaluate.collect(no_fg_ds, n)
    bg_class = no_fg_ds.backgrounds[: len(xn)].clone()
    no_fg = evaluate.flags_for_attacks(model, xn, bg_class, ["clean"], label="bg no-fg ", **common)["clean"]
    challenge = {
        "same": evaluate.percent(same["clean"]),
        "mixed_rand": evaluate.percent(mixed["clean"]),
        "only_fg": evaluate.percent(only_fg["clean"]),
        "no_fg_bg_class": evaluate.percent(no_fg),
        "pgd10": {"same": evaluate.percent(same["pgd10"]), "mixed_rand": evaluate.percent(mixed["pgd10"]),
                  "only_fg": evaluate.percent(only_fg["pgd10"])},
        "n": min(len(same["clean"]), len(ym), len(yf), len(xn)),
        "splits": dict(BACKGROUND_CHALLENGE_SPLITS),
        "chance": round(100.0 / no_fg_ds.num_classes, 2),
    }
    return gap, challenge


def _attention_iou(cfg: TrainConfig, opts: EvalOptions, model, device, log) -> dict[str, Any]:
    """Mean IoU of the run's attention foreground with the ground truth on test images.

    The attention function is built exactly as for training (``build_attention`` with
    the run's config); the frozen attention model is taken from the cache, never
    trained here. Returns a dict with ``mean_iou`` or a ``note`` saying why not.
    """
    from dhat_seg.attention.model import build_attention, cache_root, find_attention_model, frozen

    test_ds = _dataset(cfg, "test")
    base = {"method": cfg.attention, "threshold_policy": cfg.threshold_policy, "omega": cfg.omega, "quantile": cfg.quantile}
    if test_ds.gt_masks is None:
        return base | {"mean_iou": None, "note": f"dataset {cfg.data!r} has no ground-truth masks"}
    root = cache_root(opts.cache_dir)
    train_ds = _dataset(cfg, "train")
    try:
        from dhat_seg.attention.plugin_manager import get_attention_spec

        spec = get_attention_spec(cfg.attention)
        options = dict(cfg.attention_options or {})
        if cfg.attention_checkpoint:
            options["checkpoint"] = cfg.attention_checkpoint
        options = spec.resolve_options(options)
        classifier = None
        if spec.needs_classifier(options):
            if getattr(cfg, "attention_source", "frozen") == "self":
                classifier = model  # PART-style: the evaluated model itself, in eval mode
            elif cfg.attention_model:
                classifier = frozen(load_weights(resolve_weights(cfg.attention_model)), device)
            else:
                path = find_attention_model(cfg, train_ds.fingerprint(), root)
                if path is None:
                    return base | {"mean_iou": None, "note": f"the run's attention model is not in the cache {root} "
                                                             f"(pass --cache-dir, the one used for training)"}
                classifier = frozen(load_weights(path), device)
        fn = build_attention(cfg, num_classes=test_ds.num_classes, device=device, classifier=classifier)
    except UserError as exc:
        return base | {"mean_iou": None, "note": str(exc)}
    n = min(opts.iou_examples or len(test_ds), len(test_ds))
    x, y = evaluate.collect(test_ds, n)
    with evaluate.progress_bar("attention IoU", n, opts.show_progress) as bar:
        iou = evaluate.attention_iou(fn, x, y, test_ds.gt_masks[:n], policy=cfg.threshold_policy, omega=cfg.omega,
                                     quantile=cfg.quantile, batch_size=min(opts.batch_size, 128), device=device,
                                     progress=bar.update)
    return base | {"mean_iou": round(iou.mean().item(), 4), "median_iou": round(iou.median().item(), 4), "n": n}
