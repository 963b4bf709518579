"""The classifier that attention methods such as Grad-CAM read, and building a run's
attention function.

DHAT computes Grad-CAM with a *separate* ResNet-18 trained normally on the same data
and frozen. The authors do not ship it; dhat-seg trains it (``dhat-seg train --method
standard``, or automatically) and keeps it in the cache directory keyed by the data
and settings, so later runs with the same data reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from dhat_seg.attention import AttentionContext, AttentionFn, AttentionSpec, validate_attention
from dhat_seg.run.checkpoint import load_weights, resolve_weights
from dhat_seg.config import TrainConfig
from dhat_seg.errors import UserError
from dhat_seg.models import Classifier
from dhat_seg.attention.plugin_manager import get_attention_spec


def cache_root(override: str | Path | None = None) -> Path:
    """Where dhat-seg keeps attention models and mask caches: ``override`` (``--cache-dir``),
    else ``$DHAT_SEG_CACHE``, else ``$XDG_CACHE_HOME/dhat-seg`` (the XDG base-directory rule:
    an unset, empty or relative ``XDG_CACHE_HOME`` is ignored), else ``~/.cache/dhat-seg``."""
    if override:
        return Path(override)
    if os.environ.get("DHAT_SEG_CACHE"):
        return Path(os.environ["DHAT_SEG_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "dhat-seg"


def attention_model_config(cfg: TrainConfig) -> TrainConfig:
    """Settings of the normally trained attention model for the data of ``cfg``; seeded
    by the data seed (``cfg.dataset_seed``), so runs that differ only in ``seed`` share it."""
    epochs = cfg.attention_model_epochs
    return dataclasses.replace(
        cfg,
        seed=cfg.dataset_seed,
        data_seed=None,
        method="standard",
        model=cfg.attention_model_arch,
        epochs=epochs,
        milestones=[max(1, int(epochs * 0.75))],  # one decay, three quarters of the way
        attention_model=None,
        test_examples=cfg.test_examples,
    )


def attention_model_dir(cfg: TrainConfig, train_fingerprint: str, root: Path) -> Path:
    sub = attention_model_config(cfg)
    keyed = {k: getattr(sub, k) for k in ("data", "image_size", "train_size", "val_size", "rho", "augment", "model",
                                           "epochs", "batch_size", "lr", "momentum", "weight_decay", "seed")}
    keyed["train_fingerprint"] = train_fingerprint
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return root / "attention-models" / f"{cfg.data}-{sub.model}-{digest}"


def find_attention_model(cfg: TrainConfig, train_fingerprint: str, root: Path) -> Path | None:
    """The attention model's weights file: ``cfg.attention_model``, or the one trained
    earlier into the cache; None when there is none yet (training it is the job of
    :func:`dhat_seg.run.experiment.ensure_attention_model`)."""
    if cfg.attention_model:
        return resolve_weights(cfg.attention_model)
    run_dir = attention_model_dir(cfg, train_fingerprint, root)
    return resolve_weights(run_dir) if (run_dir / "summary.json").is_file() else None


def frozen(model: Classifier, device: torch.device) -> Classifier:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class CheckedAttention:
    """Wraps an attention function: validates every result, naming the method."""

    def __init__(self, spec: AttentionSpec, fn: AttentionFn, options: dict, classifier_path: Path | None):
        self.spec, self.fn, self.options, self.classifier_path = spec, fn, options, classifier_path

    def __call__(self, images, labels):
        return validate_attention(self.fn(images, labels), images, self.spec.name)


def resolve_attention_method(cfg: TrainConfig) -> tuple[AttentionSpec, dict]:
    """The attention spec of ``cfg`` and its resolved options; a UserError when the
    method cannot run with them (e.g. a missing checkpoint)."""
    spec = get_attention_spec(cfg.attention)
    options = dict(cfg.attention_options or {})
    if cfg.attention_checkpoint:
        if "checkpoint" not in spec.default_options:
            raise UserError(f"attention method {spec.name!r} takes no checkpoint; drop --attention-checkpoint")
        options["checkpoint"] = cfg.attention_checkpoint
    options = spec.resolve_options(options)
    problem = spec.check_ready(options) if spec.check_ready else None
    if problem:
        raise UserError(f"attention method {spec.name!r} cannot run: {problem}")
    return spec, options


def build_attention(
    cfg: TrainConfig,
    *,
    num_classes: int,
    device: torch.device,
    classifier: Classifier | None = None,
    classifier_path: Path | None = None,
) -> CheckedAttention:
    """Resolve ``cfg.attention`` to a validated per-batch attention function. A method
    that reads a classifier gets ``classifier``, or the frozen weights at
    ``classifier_path``; this function never trains one."""
    spec, options = resolve_attention_method(cfg)
    if spec.needs_classifier(options) and classifier is None:
        if classifier_path is None:
            raise UserError(f"attention method {spec.name!r} reads a classifier and none was given; pass "
                            "--attention-model PATH, or let `dhat-seg train` / `dhat-seg masks build` train one")
        classifier = frozen(load_weights(classifier_path), device)
    ctx = AttentionContext(
        options=options,
        device=device,
        classifier=classifier,
        cam_layer=classifier.cam_layer if classifier is not None else None,
        image_size=(cfg.image_size, cfg.image_size),
        num_classes=num_classes,
        config=cfg,
    )
    return CheckedAttention(spec, spec.build(ctx), options, classifier_path)
