"""Loads attention plugins once and turns them into a name -> AttentionSpec table.

Built-in plugins (``plugins/``, importable as ``dhat_seg.plugins``) are always
registered. Third-party plugins come from the entry-point group ``dhat_seg`` and are
loaded once, lazily. Whatever goes wrong with one plugin produces a one-line warning
naming it and that plugin is skipped; the CLI and the other plugins keep working:

* it fails to import or to register with pluggy;
* it has a ``@hookimpl`` function whose name is not a dhat-seg hook (a typo such as
  ``register_attention_method``: pluggy would otherwise never call it, silently);
* its entry point has the name of a built-in plugin (``sam``, ``gradcam``, ...).

The method table is built from pluggy's hook implementations (so ``@hookimpl``
markers such as ``specname``, ``tryfirst`` and ``trylast`` apply), one at a time so
that one failing implementation does not hide the others. Built-in plugins go first:
a third-party plugin registering a built-in's method name (``gradcam``) is warned
about and ignored, so a name always means the same method in reported numbers.

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
from dataclasses import dataclass, field

import pluggy

from dhat_seg import hookspecs
from dhat_seg.attention import AttentionSpec
from dhat_seg.errors import PluginError, UserError

BUILTIN_PLUGINS = ("gradcam", "ig", "solo", "sam", "u2net", "oracle")
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


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (pluggy's validation messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass
class LoadedPlugins:
    """The process-wide plugin manager and, per registered plugin name, the label
    ``dhat-seg plugins`` shows (distribution and version) and whether it is built in.

    Kept beside the manager rather than on it: pluggy owns its attributes.
    """

    pm: pluggy.PluginManager
    labels: dict[str, str] = field(default_factory=dict)
    builtins: set[str] = field(default_factory=set)

    def register(self, plugin: object, name: str, label: str, builtin: bool = False) -> None:
        """``pm.register`` followed by ``pm.check_pending``.

        All hookspecs are added before any plugin, so a pending (spec-less) hook
        implementation after this registration can only be this plugin's misspelt hook.
        The plugin is then unregistered again and a PluginError names it and the
        function; pluggy's own errors (e.g. an argument the hook does not have) become
        PluginErrors too.
        """
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"plugin {name!r} cannot be registered: {_one_line(exc)}") from None
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            hooks = ", ".join(sorted(n for n, caller in vars(self.pm.hook).items() if caller.has_spec()))
            raise PluginError(f"{_one_line(exc)} (a @hookimpl function must be named after a dhat-seg hook: {hooks})") from None
        self.labels[name] = label
        if builtin:
            self.builtins.add(name)


@functools.lru_cache(maxsize=1)
def _loaded() -> LoadedPlugins:
    """Built-ins and entry points, loaded once per process (see the module docstring)."""
    import dhat_seg

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    loaded = LoadedPlugins(pm)
    for name in BUILTIN_PLUGINS:
        if not _allowed(name):
            continue
        try:
            module = importlib.import_module(f"dhat_seg.plugins.{name}")
            loaded.register(module, name, f"dhat-seg {dhat_seg.__version__} (built-in)", builtin=True)
        except (ImportError, PluginError) as exc:  # e.g. an optional dependency is missing
            warnings.warn(f"built-in dhat-seg plugin {name!r} is unavailable: {exc}", stacklevel=2)
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME):
        if not _allowed(ep.name):
            continue
        where = f"dhat-seg plugin {ep.name!r} ({ep.value})"
        if ep.name in BUILTIN_PLUGINS or pm.has_plugin(ep.name):
            owner = "a built-in plugin" if ep.name in BUILTIN_PLUGINS else loaded.labels[ep.name]
            warnings.warn(f"{where} is skipped: its entry-point name is taken by {owner}; rename the entry point",
                          stacklevel=2)
            continue
        try:
            loaded.register(ep.load(), ep.name, _dist_label(getattr(ep, "dist", None)))
        except Exception as exc:  # one broken third-party plugin must not kill the CLI
            warnings.warn(f"{where} failed to load and is skipped: {_one_line(exc)}", stacklevel=2)
    return loaded


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and entry points loaded once."""
    return _loaded().pm


@functools.lru_cache(maxsize=1)
def attention_methods() -> dict[str, AttentionSpec]:
    """All registered attention methods by name (computed once per process).

    Every implementation of ``register_attention_methods`` is called on its own (a
    failing one gives a warning naming its plugin; the rest still register), built-in
    plugins first, then the others in pluggy's call order (``tryfirst`` ones first,
    ``trylast`` ones last, otherwise the most recently registered first).

    A name that is already taken keeps its first registration: the later one is
    dropped with a warning naming both plugins (the plugin's other methods still
    register). Built-ins going first means a third-party plugin can never change
    what ``gradcam`` means; a warning rather than an error, because one bad plugin
    must not make every ``dhat-seg`` command fail.
    """
    loaded = _loaded()
    impls = loaded.pm.hook.register_attention_methods.get_hookimpls()[::-1]  # pluggy's call order
    # Wrappers would only wrap the call of the other implementations; nothing to call here.
    impls = [i for i in impls if not (i.hookwrapper or i.wrapper)]
    impls.sort(key=lambda i: i.plugin_name not in loaded.builtins)  # stable: built-ins first
    methods: dict[str, AttentionSpec] = {}
    owners: dict[str, str] = {}
    for impl in impls:
        plugin_name = impl.plugin_name
        label = loaded.labels.get(plugin_name, plugin_name)

        def register(spec: AttentionSpec, _label=label, _plugin=plugin_name) -> None:
            if not isinstance(spec, AttentionSpec):
                raise PluginError(f"plugin {_plugin!r} registered {type(spec).__name__}; expected an AttentionSpec")
            if spec.name in methods:
                owner = owners[spec.name]
                warnings.warn(
                    f"attention method {spec.name!r} from plugin {_plugin!r} is ignored: it is already registered by "
                    f"plugin {owner!r} ({methods[spec.name].plugin})",
                    stacklevel=2,
                )
                return
            methods[spec.name] = spec.with_plugin(_label)
            owners[spec.name] = _plugin

        try:
            hook_args = {"register": register}
            impl.function(**{arg: hook_args[arg] for arg in impl.argnames})  # by keyword, as hookspecs.py says
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

    It is added to the process-wide manager, with the same checks as an entry point
    but raising a PluginError (e.g. for a misspelt hook) instead of warning, since the
    caller is right there; the method table is rebuilt on next use.
    """
    _loaded().register(plugin, name, label or f"{name} (registered in-process)")
    attention_methods.cache_clear()


def reset() -> None:
    """Forget loaded plugins (tests, or after installing a plugin in-process)."""
    attention_methods.cache_clear()
    _loaded.cache_clear()
