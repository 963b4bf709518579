"""``dhat-seg eval``: load a trained model, run the requested attacks, write eval.json."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
import yaml

from dhat_seg import __version__, evaluate
from dhat_seg.checkpoint import load_weights, resolve_weights
from dhat_seg.config import TrainConfig
from dhat_seg.data import build_dataset
from dhat_seg.errors import UserError
from dhat_seg.trainer import select_device


def run_config_for(target: Path) -> TrainConfig | None:
    """The config.yaml of the run a target belongs to, if any."""
    for candidate in (target, target.parent, target.parent.parent, target.parent.parent.parent):
        path = candidate / "config.yaml"
        if path.is_file():
            return TrainConfig(**(yaml.safe_load(path.read_text()) or {}))
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


def run_eval(target: str | Path, *, attacks: str, n_examples: int | None, data: str | None, split: str, eps: float,
             batch_size: int, device: str, seed: int) -> dict[str, Any]:
    target = Path(target)
    weights = resolve_weights(target)
    names = evaluate.parse_attacks(attacks)
    if n_examples is not None and n_examples < 1:
        raise UserError(f"--n-examples {n_examples} is invalid; expected a positive integer")
    if eps < 0:
        raise UserError(f"--eps {eps} is invalid; expected a non-negative number (units of 1/255)")
    cfg = run_config_for(target.parent if target.is_file() else target) or TrainConfig()
    if data:
        cfg.data = data
    dev = select_device(device)
    model = load_weights(weights).to(dev).eval()
    dataset = build_dataset(cfg.data, split, root=cfg.data_root, download=cfg.download, seed=cfg.seed,
                            image_size=cfg.image_size, size=cfg.test_size if split.startswith("test") else cfg.train_size,
                            val_size=cfg.val_size, rho=cfg.rho)
    x, y = evaluate.collect(dataset, n_examples)
    out_dir = weights.parent.parent.parent if weights.parent.parent.name == "checkpoints" else weights.parent
    flags = {}
    for name in names:
        flags[name] = evaluate.correct_under_attack(model, x, y, name, eps=eps / 255, batch_size=batch_size, device=dev,
                                                    seed=seed, aa_state_path=out_dir / f"aa_state_{split}.json")
    accuracy = {name: evaluate.percent(f) for name, f in flags.items()}
    attacked = [n for n in names if n != "clean"]
    if len(attacked) > 1:
        accuracy["worst_case"] = evaluate.percent(torch.stack([flags[n] for n in attacked]).all(dim=0))
    report = {
        "weights": str(weights),
        "data": cfg.data,
        "split": split,
        "n_examples": len(y),
        "accuracy": accuracy,
        "attack_settings": {"eps": eps / 255, "step_size": 2 / 255, "random_start": True, "autoattack": "standard"},
        "seed": seed,
        "config_digest": cfg.digest(),
        "versions": package_versions(),
        "dhat_seg_version": __version__,
    }
    path = out_dir / "eval.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    report["path"] = str(path)
    return report
