"""The methods UIAT and DHAT can add their terms to (config ``base``), by name.

A base exposes ``adversarial(model, x, y)`` (its attack) and ``base_loss(model, x, y,
x_adv) -> (loss, z_adv, stats)``, and may keep state through the trainer hooks of
:class:`~dhat_seg.training_methods.base.TrainingMethod`, which UIAT and DHAT pass on.
"""

from __future__ import annotations

from typing import Any, Callable

from dhat_seg.training_methods.adversarial import MART, TRADES, MadryAT
from dhat_seg.training_methods.cfa import CFA
from dhat_seg.training_methods.sglr import SGLR

BASE_METHODS: dict[str, Callable[[Any], MadryAT]] = {"at": MadryAT, "trades": TRADES, "mart": MART, "cfa": CFA,
                                                     "sglr": SGLR}
