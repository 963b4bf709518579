"""Loads attention plugins once and turns them into a name -> AttentionSpec table.

Built-in plugins (``plugins/``, importable as ``dhat_seg.plugins``) are always
registered. Third-party plugins come from the entry-point group ``dhat_seg`` and are
loaded once, lazily; a plugin that fails to import or to register produces a warning
naming it, not a dead CLI.

Environment variables (comma-separated plugin names, i.e. entry-point names or
built-in module names such as ``sam``):

* ``DHAT_SEG_PLUGINS``: load only these (an allow-list). Empty string: no third-party
  plugins at all.
* ``DHAT_SEG_BLOCK_PLUGINS``: never load these.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import warnings

import pluggy

from dhat_seg import hookspecs
from dhat_seg.attention import AttentionSpec
from dhat_seg.errors import PluginError, UserError

BUILTIN_PLUGINS = ("gradcam", "ig", "solo", "sam")
ALLOW_ENV = "DHAT_SEG_PLUGINS"
BLOCK_ENV = "DHAT_SEG_BLOCK_PLUGINS"


def _names_from_env(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _allowed(name: str) -> bool:
    allow, block = _names_from_env(ALLOW_ENV), _names_from_env(BLOCK_ENV)
    if block and name in block:
        return False
    if allow is not None and name not in allow and name not in BUILTIN_PLUGINS:
        return False
    return True


def _dist_label(dist) -> str:
    if dist is None:
        return "?"
    return f"{dist.metadata['Name']} {dist.version}"


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and entry points loaded once."""
    import dhat_seg

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    labels: dict[str, str] = {}
    for name in BUILTIN_PLUGINS:
        if not _allowed(name):
            continue
        try:
            module = importlib.import_module(f"dhat_seg.plugins.{name}")
        except ImportError as exc:  # e.g. an optional dependency is missing
            warnings.warn(f"built-in dhat-seg plugin {name!r} is unavailable: {exc}", stacklevel=2)
            continue
        pm.register(module, name=name)
        labels[name] = f"dhat-seg {dhat_seg.__version__} (built-in)"
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME):
        if not _allowed(ep.name) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # one broken third-party plugin must not kill the CLI
            warnings.warn(f"dhat-seg plugin {ep.name!r} ({ep.value}) failed to load and is skipped: {exc}", stacklevel=2)
            continue
        labels[ep.name] = _dist_label(getattr(ep, "dist", None))
    pm._dhat_labels = labels
    return pm


@functools.lru_cache(maxsize=1)
def attention_methods() -> dict[str, AttentionSpec]:
    """All registered attention methods by name (computed once per process)."""
    pm = get_plugin_manager()
    labels = getattr(pm, "_dhat_labels", {})
    methods: dict[str, AttentionSpec] = {}
    for plugin_name, plugin in pm.list_name_plugin():
        hook = getattr(plugin, "register_attention_methods", None)
        if hook is None:
            continue
        label = labels.get(plugin_name, plugin_name)

        def register(spec: AttentionSpec, _label=label, _plugin=plugin_name) -> None:
            if not isinstance(spec, AttentionSpec):
                raise PluginError(f"plugin {_plugin!r} registered {type(spec).__name__}; expected an AttentionSpec")
            if spec.name in methods:
                raise PluginError(
                    f"attention method {spec.name!r} from plugin {_plugin!r} is already registered by {methods[spec.name].plugin!r}"
                )
            methods[spec.name] = spec.with_plugin(_label)

        try:
            hook(register=register)
        except PluginError as exc:
            warnings.warn(str(exc), stacklevel=2)
        except Exception as exc:
            warnings.warn(f"dhat-seg plugin {plugin_name!r} failed to register its attention methods: {exc}", stacklevel=2)
    return dict(sorted(methods.items()))


def get_attention_spec(name: str) -> AttentionSpec:
    """The spec registered under ``name``; a UserError listing the known names otherwise."""
    methods = attention_methods()
    if name not in methods:
        known = ", ".join(methods) or "none"
        raise UserError(f"attention method {name!r} is unknown; installed methods: {known} (see `dhat-seg plugins`)")
    return methods[name]


def register_plugin(plugin: object, name: str, label: str | None = None) -> None:
    """Register a plugin object or module in-process (notebooks, tests).

    It is added to the process-wide manager; the method table is rebuilt on next use.
    """
    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    pm._dhat_labels[name] = label or f"{name} (registered in-process)"
    attention_methods.cache_clear()


def reset() -> None:
    """Forget loaded plugins (tests, or after installing a plugin in-process)."""
    attention_methods.cache_clear()
    get_plugin_manager.cache_clear()
