"""A run's training-method settings as config files and the command line give them (no torch here,
except where a flat 0.1 key needs the registry).

``TrainConfig.method_options`` maps a method's name to its settings (the method's frozen
dataclass, :mod:`dhat_seg.training_methods.settings`). Three spellings reach it, all equal:
nested (``method_options: {trades: {beta: 3.0}}``, what ``config.yaml`` holds), dotted
(``trades.beta: 3.0``, ``--set trades.beta=3``) and flat as dhat-seg 0.1 wrote them
(``trades_beta: 3.0``; :func:`migrate` reads the config files of finished 0.1 runs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dhat_seg.errors import UserError


def resolve_method_options(cfg: Any) -> dict[str, Any]:
    """``cfg.method_options`` as settings dataclasses (types and ranges checked), with the defaults of every
    method whose settings the run reads (its own, its base's), so config.yaml shows them; a method's
    settings the run does not read are kept only where they differ from the defaults (a 0.1 config
    file lists every method's)."""
    from dhat_seg.training_methods import TRAINING_METHODS, settings_class

    if not isinstance(cfg.method_options, dict):
        raise UserError(f"config option method_options={cfg.method_options!r} is invalid; expected a mapping of "
                        "method: {setting: value}")
    out = {owner: settings_class(owner).build(owner, values) for owner, values in cfg.method_options.items()}
    entry = TRAINING_METHODS.get(cfg.method)
    if entry is not None:
        read = entry.settings_read(dataclasses.replace(cfg, method_options=out))
        out = {owner: s for owner, s in out.items() if owner in read or s.changed()}
        for owner in read:
            out.setdefault(owner, settings_class(owner)())
    for owner, settings in out.items():
        settings.validate(owner, cfg)
    return dict(sorted(out.items(), key=lambda item: list(TRAINING_METHODS).index(item[0])))


def migrate(values: dict[str, Any], fields: Any = None) -> dict[str, Any]:
    """Config ``values`` in today's form: a method's setting given flat as in dhat-seg 0.1 (``trades_beta``) or
    dotted (``trades.beta``) moves to ``method_options`` (``{trades: {beta: ...}}``), merged with what is there.
    ``fields``: the shared settings' names (``config.FIELDS``), so that the training-method registry (and
    torch) is imported only when a key outside them needs it; None: every flat key is looked up."""
    out = {k: v for k, v in values.items() if k != "method_options"}
    options: dict[str, dict[str, Any]] = {}
    given = values.get("method_options")
    if given is not None and not isinstance(given, dict):
        raise UserError(f"config option method_options={given!r} is invalid; expected a mapping of method: "
                        "{setting: value}")
    for owner, settings in (given or {}).items():
        if not isinstance(settings, dict):
            raise UserError(f"method_options.{owner} = {settings!r} is invalid; expected a mapping of setting: value")
        options.setdefault(owner, {}).update(settings)
    legacy = None
    for key in list(out):
        if "." in key:
            owner, name = key.split(".", 1)
        elif fields is None or key not in fields:
            if legacy is None:
                from dhat_seg.training_methods import legacy_keys

                legacy = legacy_keys()
            if key not in legacy:
                continue  # load_config names the unknown key
            owner, name = legacy[key]
        else:
            continue
        options.setdefault(owner, {})[name] = out.pop(key)
    if options or given is not None:
        out["method_options"] = options
    return out


def explicit_keys(values: dict[str, Any]) -> set[str]:
    """The keys of migrated ``values``, a method's settings as ``method.setting``."""
    keys = {k for k in values if k != "method_options"}
    keys |= {f"{owner}.{name}" for owner, settings in (values.get("method_options") or {}).items() for name in settings}
    return keys


def flat_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Migrated ``values`` with ``method_options`` spread out as ``method.setting`` keys (to compare two configs)."""
    out = {k: v for k, v in values.items() if k != "method_options"}
    for owner, settings in (values.get("method_options") or {}).items():
        out.update({f"{owner}.{name}": value for name, value in settings.items()})
    return out


def merge(values: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``values`` updated by ``more`` (both migrated), ``method_options`` merged setting by setting."""
    out = {**values, **{k: v for k, v in more.items() if k != "method_options"}}
    if "method_options" in more:
        options = {owner: dict(s) for owner, s in (values.get("method_options") or {}).items()}
        for owner, settings in more["method_options"].items():
            options.setdefault(owner, {}).update(settings)
        out["method_options"] = options
    return out
