"""The DHAT paper's settings and how a run's settings differ from them (``train`` prints
the differences at its start)."""

from __future__ import annotations

from typing import Any

from dhat_seg.config import TrainConfig, needs_attention

#: The DHAT paper's settings (CIFAR-10, REFERENCE section 1; where paper and code differ,
#: the code's, as REFERENCE takes them). ``paper_differences`` compares against these.
PAPER_SETTINGS: dict[str, Any] = {
    "method": "dhat", "attention": "gradcam", "data": "cifar10", "model": ("wrn28_10", "resnet18"),
    "attention_model_arch": "resnet18", "image_size": 32, "augment": True,
    "threshold_policy": "fixed", "omega": 0.1, "mask_source": "online", "attention_source": "frozen",
    "lambda1": 1.0, "lambda2": 1.0, "dhlr_form": "code", "floe_form": "paper", "floe_p": 2.0,
    "eps": 8.0, "step_size": 2.0, "attack_steps": 10, "inv_eps": 4.0, "inv_step_size": 2.0, "inv_steps": 10,
    "attack_mode": "train", "attack_bn_update": True, "attack_precision": "fp32",
    "epochs": 100, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "milestones": [80, 90],
    "gamma": 0.1,
}


def paper_differences(cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, value, the paper's value) for every setting of ``cfg`` that differs from the paper
    (``attack_mode`` null: the method's own mode, e.g. eval for TRADES, from the registry)."""
    from dhat_seg.training_methods import attack_mode_of

    out = []
    for key, paper in PAPER_SETTINGS.items():
        value = attack_mode_of(cfg) if key == "attack_mode" else getattr(cfg, key)
        if key == "attention" and not needs_attention(cfg.method):
            continue
        same = value in paper if isinstance(paper, tuple) else value == paper
        if not same:
            out.append((key, value, " or ".join(paper) if isinstance(paper, tuple) else paper))
    return out
