"""Loads attention plugins once and turns them into a name -> AttentionSpec table.

Built-in plugins (``plugins/``, importable as ``dhat_seg.plugins``) are always
registered. Third-party plugins come from the entry-point group ``dhat_seg``
(``importlib.metadata.entry_points(group="dhat_seg")``; each entry point's object, a
module or any object with ``@hookimpl`` functions, is registered under the entry
point's name) and are loaded once, lazily. Whatever goes wrong with one plugin produces
a one-line warning naming it and that plugin is skipped (its methods are missing); the
CLI and the other plugins keep working:

* it fails to import or to register with pluggy;
* it has a ``@hookimpl`` function whose name is not a dhat-seg hook (a typo such as
  ``register_attention_method``: pluggy would otherwise never call it, silently);
* its entry point has the name of a built-in plugin (``sam``, ``gradcam``, ...).

The method table is built from pluggy's hook implementations (so ``@hookimpl``
markers such as ``specname``, ``tryfirst`` and ``trylast`` apply), one at a time so
that one failing implementation does not hide the others. Built-in plugins go first:
a third-party plugin registering a built-in's method name (``gradcam``) is warned
about and ignored, so a name always means the same method in reported numbers.

Warnings go through the :mod:`logging` logger ``dhat_seg.plugins`` (:data:`logger`),
not :mod:`warnings`, each message once per process (:func:`reset` forgets what was
reported). Every command prints them the same way, as one line on stderr without a
source line, e.g. ::

    warning: attention plugin 'broken' (entry point broken = dhat_seg_broken, dhat-seg-broken 0.1.0) failed to load: ImportError: boom

The records propagate as usual (the CLI's handler on ``dhat_seg``, or an
application's logging configuration, prints them); when no logger above has a
handler, a fallback handler of this logger prints that line itself, so a plain
library user sees it too. Asking for a method of a plugin that failed to load
(``--attention broken``, :func:`get_attention_spec`) is an error that repeats why it
failed, not "unknown".

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
import logging
import os
import sys
from dataclasses import dataclass, field

import pluggy

from dhat_seg import hookspecs
from dhat_seg.attention import AttentionSpec
from dhat_seg.errors import PluginError, UserError

BUILTIN_PLUGINS = ("gradcam", "ig", "solo", "sam", "u2net", "oracle")
ALLOW_ENV = "DHAT_SEG_PLUGINS"
BLOCK_ENV = "DHAT_SEG_BLOCK_PLUGINS"

#: Where plugin problems are reported (see the module docstring).
logger = logging.getLogger("dhat_seg.plugins")


def _handled_above(start: logging.Logger) -> bool:
    """Whether a logger above ``start`` has a handler that its records reach (the
    dhat-seg CLI's on ``dhat_seg``, an application's logging configuration)."""
    current: logging.Logger | None = start
    while current is not None and current.propagate:
        current = current.parent
        if current is not None and current.handlers:
            return True
    return False


class _FallbackStderr(logging.Handler):
    """Writes ``warning: MESSAGE`` as one line to the current ``sys.stderr`` (looked up
    at every record, so that redirections such as the CLI test runner's see it), unless
    a handler above will (then the record is left to it: no line twice)."""

    def emit(self, record: logging.LogRecord) -> None:
        if _handled_above(logger):
            return
        try:
            sys.stderr.write(f"{record.levelname.lower()}: {' '.join(record.getMessage().split())}\n")
            sys.stderr.flush()
        except Exception:  # never let reporting break plugin loading
            self.handleError(record)


if not any(isinstance(h, _FallbackStderr) for h in logger.handlers):
    logger.addHandler(_FallbackStderr())

_reported: set[str] = set()


def _warn(message: str) -> None:
    """Report a plugin problem once per process (one line on stderr by default)."""
    if message in _reported:
        return
    _reported.add(message)
    logger.warning(message)


def _names_from_env(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _not_allowed(name: str) -> str | None:
    """None when plugin ``name`` may be loaded, else which environment variable says no."""
    allow, block = _names_from_env(ALLOW_ENV), _names_from_env(BLOCK_ENV)
    if block and name in block:
        return f"{BLOCK_ENV} names it"
    if allow is not None and name not in allow and name not in BUILTIN_PLUGINS:
        return f"{ALLOW_ENV}={os.environ.get(ALLOW_ENV, '')!r} does not name it"
    return None


def _dist_label(dist) -> str:
    if dist is None:
        return "?"
    return f"{dist.metadata['Name']} {dist.version}"


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (pluggy's validation messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _reason(exc: BaseException) -> str:
    """Why something failed, on one line: dhat-seg's own messages as they are, other
    exceptions with their type (``ModuleNotFoundError: No module named 'x'``)."""
    message = _one_line(exc)
    if isinstance(exc, PluginError) or message == type(exc).__name__:
        return message
    return f"{type(exc).__name__}: {message}"


def _entry_point_label(ep) -> str:
    """``entry point NAME = VALUE[, DISTRIBUTION VERSION]`` for messages."""
    dist = getattr(ep, "dist", None)
    return f"entry point {ep.name} = {ep.value}" + (f", {_dist_label(dist)}" if dist is not None else "")


@dataclass
class LoadedPlugins:
    """The process-wide plugin manager and, per registered plugin name, the label
    ``dhat-seg plugins`` shows (distribution and version) and whether it is built in.

    Kept beside the manager rather than on it: pluggy owns its attributes.
    """

    pm: pluggy.PluginManager
    labels: dict[str, str] = field(default_factory=dict)
    builtins: set[str] = field(default_factory=set)
    #: plugin name -> the one-line report of why it failed to load or to register
    failures: dict[str, str] = field(default_factory=dict)
    #: plugin name -> why it was not loaded (blocked, not allowed, name taken)
    skipped: dict[str, str] = field(default_factory=dict)

    def fail(self, name: str, message: str) -> None:
        """Record that plugin ``name`` failed and report ``message`` (once)."""
        self.failures[name] = message
        _warn(message)

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
        why_not = _not_allowed(name)
        if why_not:
            loaded.skipped[name] = f"attention plugin {name!r} (built-in) is not loaded: {why_not}"
            continue
        try:
            module = importlib.import_module(f"dhat_seg.plugins.{name}")
            loaded.register(module, name, f"dhat-seg {dhat_seg.__version__} (built-in)", builtin=True)
        except (ImportError, PluginError) as exc:  # e.g. an optional dependency is missing
            loaded.fail(name, f"attention plugin {name!r} (built-in, dhat_seg.plugins.{name}) failed to load: "
                              f"{_reason(exc)}")
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME):
        where = f"attention plugin {ep.name!r} ({_entry_point_label(ep)})"
        why_not = _not_allowed(ep.name)
        if why_not:
            loaded.skipped.setdefault(ep.name, f"{where} is not loaded: {why_not}")
            continue
        if ep.name in BUILTIN_PLUGINS or pm.has_plugin(ep.name):
            owner = "a built-in plugin" if ep.name in BUILTIN_PLUGINS else loaded.labels[ep.name]
            message = f"{where} is skipped: its entry-point name is taken by {owner}; rename the entry point"
            _warn(message)
            continue
        try:
            loaded.register(ep.load(), ep.name, _dist_label(getattr(ep, "dist", None)))
        except Exception as exc:  # one broken third-party plugin must not kill the CLI
            loaded.fail(ep.name, f"{where} failed to load: {_reason(exc)}")
    return loaded


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and entry points loaded once."""
    return _loaded().pm


@functools.lru_cache(maxsize=1)
def attention_methods() -> dict[str, AttentionSpec]:
    """All registered attention methods by name (computed once per process).

    Every implementation of ``register_attention_methods`` is called on its own (a
    failing one is reported naming its plugin, and recorded so that asking for its
    method says why; the rest still register), built-in
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
                _warn(f"attention method {spec.name!r} from plugin {_plugin!r} is ignored: it is already registered by "
                      f"plugin {owner!r} ({methods[spec.name].plugin})")
                return
            methods[spec.name] = spec.with_plugin(_label)
            owners[spec.name] = _plugin

        try:
            hook_args = {"register": register}
            impl.function(**{arg: hook_args[arg] for arg in impl.argnames})  # by keyword, as hookspecs.py says
        except Exception as exc:
            loaded.fail(plugin_name, f"attention plugin {plugin_name!r} ({label}) failed to register its attention "
                                     f"methods: {_reason(exc)}")
    return dict(sorted(methods.items()))


def get_attention_spec(name: str) -> AttentionSpec:
    """The spec registered under ``name``.

    Otherwise a UserError: when a plugin of that name failed to load (or to register),
    or was not loaded because of ``DHAT_SEG_PLUGINS`` / ``DHAT_SEG_BLOCK_PLUGINS``, it
    says so and why; else it lists the installed methods and any plugins that failed
    to load (one of them may have provided ``name``).
    """
    methods = attention_methods()
    if name in methods:
        return methods[name]
    loaded = _loaded()
    if name in loaded.failures:
        raise UserError(f"attention method {name!r} is unavailable: {loaded.failures[name]}")
    if name in loaded.skipped:
        raise UserError(f"attention method {name!r} is unavailable: {loaded.skipped[name]}")
    known = ", ".join(methods) or "none"
    failed = ""
    if loaded.failures:
        failed = "; plugins that failed to load: " + ", ".join(sorted(loaded.failures))
    raise UserError(f"attention method {name!r} is unknown; installed methods: {known}{failed} (see `dhat-seg plugins`)")


def register_plugin(plugin: object, name: str, label: str | None = None) -> None:
    """Register a plugin object or module in-process (notebooks, tests).

    It is added to the process-wide manager, with the same checks as an entry point
    but raising a PluginError (e.g. for a misspelt hook) instead of warning, since the
    caller is right there; the method table is rebuilt on next use.
    """
    _loaded().register(plugin, name, label or f"{name} (registered in-process)")
    attention_methods.cache_clear()


def reset() -> None:
    """Forget loaded plugins and the warnings already reported (tests, or after
    installing a plugin in-process): the next use loads and reports as a new process."""
    attention_methods.cache_clear()
    _loaded.cache_clear()
    _reported.clear()
