"""A config value checked against its field's type hint (for :meth:`dhat_seg.config.TrainConfig.validate`)."""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from dhat_seg.errors import UserError

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping KEY: VALUE"}


def typed(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the field's type hint (ints accepted for floats)."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    elif typing.get_origin(hint) in (typing.Union, types.UnionType):  # int | float: either, as given
        if isinstance(value, args) and not isinstance(value, bool):
            return value
        raise UserError(f"config option {name}={value!r} is invalid; expected a number")
    origin = typing.get_origin(hint) or hint
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (list, tuple)) and all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            return list(value)
        raise UserError(f"config option {name}={value!r} is invalid; expected a list of {_TYPE_WORDS[item].split(' ', 1)[1]}s")
    ok = isinstance(value, origin) and not (origin in (int, float) and isinstance(value, bool))
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and ok and math.isnan(value):
        ok = False
    if not ok:
        raise UserError(f"config option {name}={value!r} is invalid; expected {_TYPE_WORDS[origin]}")
    return value
