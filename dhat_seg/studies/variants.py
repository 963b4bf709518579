"""Rows with options of their own: ``METHOD[KEY=VALUE,...]`` in a study's row list
(``ablate --attention "-,oracle,oracle[dilate=2]"``, ``compare --methods "dhat[attention=u2net]"``).
Parsing only; what the options mean is the study's (:mod:`dhat_seg.studies.rows`,
:mod:`dhat_seg.studies.compare`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from dhat_seg.errors import UserError


def split_rows(value: str) -> list[str]:
    """A comma list whose items may hold commas inside brackets: ``-,oracle[dilate=1,flip=0.1]``."""
    parts, depth, current = [], 0, []
    for ch in value:
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        depth += {"[": 1, "]": -1}.get(ch, 0)
        current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


_VARIANT = re.compile(r"^([A-Za-z0-9_.-]+)\[(.*)\]$")
_OPTION_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_variant(part: str) -> tuple[str, dict[str, str]]:
    """``"oracle[dilate=2,flip=0.1]"`` -> ("oracle", {"dilate": "2", "flip": "0.1"}); a plain
    method name -> (name, {}). Values are strings, as ``--attention-opt`` gives them (the
    plugin checks and converts them)."""
    if "[" not in part and "]" not in part:
        return part, {}
    match = _VARIANT.match(part)
    example = "oracle[dilate=2,flip=0.1]"
    if not match:
        raise UserError(f"--attention row {part!r} is invalid; expected METHOD or METHOD[KEY=VALUE,...], e.g. {example}")
    method, body = match.group(1), match.group(2)
    options: dict[str, str] = {}
    for item in (i.strip() for i in body.split(",")):
        key, sep, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not _OPTION_KEY.match(key) or not _SAFE_VALUE.match(val):
            raise UserError(f"--attention row {part!r} has an invalid option {item!r}; expected KEY=VALUE with a "
                            f"plain value (letters, digits, '.', '+', '-', '_'), e.g. {example}")
        if key in options:
            raise UserError(f"--attention row {part!r} sets {key!r} twice; expected each option once, e.g. {example}")
        options[key] = val
    if not options:
        raise UserError(f"--attention row {part!r} has empty brackets; expected METHOD[KEY=VALUE,...], e.g. {example}")
    return method, options


def variant_name(method: str, options: Mapping[str, Any]) -> str:
    """The canonical row name of a method with row-specific options (keys sorted)."""
    if not options:
        return method
    return f"{method}[" + ",".join(f"{k}={options[k]}" for k in sorted(options)) + "]"
