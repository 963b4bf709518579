"""The methods other methods build their loss on (config ``base``): UIAT, DHAT, FSR and PART.

A base exposes ``adversarial(model, x, y)`` (its attack) and ``base_loss(model, x, y,
x_adv) -> (loss, z_adv, stats)``, and may keep state through the trainer hooks of
:class:`~dhat_seg.training_methods.base.TrainingMethod`, which the methods on it pass on.
A registry entry with ``is_base=True`` is one (at, trades, mart, cfa, sglr, and any method
registered so); :func:`build_base` makes the run's.
"""

from __future__ import annotations

from typing import Any


def base_methods() -> tuple[str, ...]:
    """The registered methods that can be a base (``is_base``), in registry order."""
    from dhat_seg.training_methods import TRAINING_METHODS

    return tuple(name for name, entry in TRAINING_METHODS.items() if entry.is_base)


def build_base(cfg: Any) -> Any:
    """The base method ``cfg.base``, built on ``cfg`` (its settings from ``cfg.method_options``)."""
    from dhat_seg.training_methods import TRAINING_METHODS

    return TRAINING_METHODS[cfg.base].cls(cfg)
