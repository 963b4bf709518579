"""The settings a training method owns: one frozen dataclass per method (no torch here).

A method that has settings of its own (TRADES' beta, CFA's calibration, AGAIN's form, ...)
declares them next to its loss, as a frozen dataclass derived from :class:`MethodSettings`
with a default for every field, and names it in its registry entry
(:class:`~dhat_seg.training_methods.TrainingMethodEntry` ``settings``). A run's config holds
one instance per method whose settings it reads (``TrainConfig.method_options``, keyed by the
method's name): in YAML ``method_options: {trades: {beta: 3.0}}``, on the command line
``--set trades.beta=3``.

* Types come from the field annotations (``float | None``, ``str``, ...) and are checked like
  every other config value; :meth:`MethodSettings.checks` adds the ranges.
* The digest of a run (:meth:`dhat_seg.config.TrainConfig.digest`) holds only the values that
  differ from these defaults, so adding a setting never changes the digest of a run that does
  not change it.
* ``LEGACY`` names the flat keys of dhat-seg 0.1 config files (``trades_beta``), which
  :func:`dhat_seg.config.migrate` still reads; a new setting needs none.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from dhat_seg.config_types import typed
from dhat_seg.errors import UserError


@dataclass(frozen=True)
class MethodSettings:
    """Base of a method's settings dataclass (frozen; every field with a default)."""

    #: field -> its flat key in dhat-seg 0.1 config files, where it differs from ``<method>_<field>``
    LEGACY: ClassVar[dict[str, str]] = {}

    @classmethod
    def build(cls, owner: str, values: Mapping[str, Any] | "MethodSettings" | None) -> "MethodSettings":
        """An instance from a mapping of ``field: value`` (types checked, unknown keys refused)."""
        if isinstance(values, cls):
            return values
        if isinstance(values, MethodSettings):
            values = dataclasses.asdict(values)
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise UserError(f"method_options.{owner} = {values!r} is invalid; expected a mapping of setting: value "
                            f"({', '.join(cls.field_names()) or 'method ' + owner + ' has no settings'})")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            known = ", ".join(f"{owner}.{k}" for k in cls.field_names()) or "none"
            raise UserError(f"config option {owner}.{unknown[0]} is unknown; method {owner!r} has the settings {known}")
        return cls(**{k: typed(f"{owner}.{k}", v, hints[k]) for k, v in values.items()})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def legacy_key(cls, owner: str, name: str) -> str:
        """The flat 0.1 key of field ``name`` (``trades_beta``)."""
        return cls.LEGACY.get(name, f"{owner}_{name}")

    def checks(self, cfg: Any) -> list[tuple[bool, str, str]]:
        """``(ok, field, expected)`` range checks; ``cfg``: the run's config (for limits such as eps)."""
        return []

    def validate(self, owner: str, cfg: Any) -> "MethodSettings":
        for ok, name, expected in self.checks(cfg):
            if not ok:
                raise UserError(f"config option {owner}.{name}={getattr(self, name)!r} is invalid; expected {expected}")
        return self

    def changed(self) -> dict[str, Any]:
        """The fields whose value differs from the default."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    def digest_items(self, owner: str, method: str) -> dict[str, Any]:
        """What this method's settings add to a run's digest (``method``: the run's method): the
        changed fields, by their 0.1 names (so runs of 0.1 keep their digests)."""
        return {self.legacy_key(owner, k): v for k, v in self.changed().items()}
