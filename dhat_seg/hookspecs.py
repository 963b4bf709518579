"""The dhat-seg plugin contract (pluggy hook specifications).

Plugins are modules or objects with functions decorated by ``dhat_seg.hookimpl``.
Built-in plugins live in ``plugins/`` (importable as ``dhat_seg.plugins.*``); third
party plugins are found through the entry-point group ``dhat_seg`` (:data:`PROJECT_NAME`;
``[project.entry-points.dhat_seg]`` in a ``pyproject.toml``, one ``name = "module"`` or
``name = "module:object"`` line per plugin). ``docs/plugins.md`` walks through writing,
packaging, unit-testing and calibrating one.

Hooks are always called with keyword arguments; implementations may accept any subset
of the arguments, by name, and must not rely on default values. pluggy's markers apply
(``@hookimpl(specname=..., tryfirst=True, trylast=True)``). A ``@hookimpl`` function
whose name (or ``specname``) is not one of the hooks below is reported when the plugin
loads, and that plugin is skipped.

The training loop never calls pluggy per batch: plugins hand over plain
:class:`dhat_seg.attention.AttentionSpec` objects once, through ``register``, and the
trainer calls the function the spec builds.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "dhat_seg"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_attention_methods(register):
    """Register attention methods (ways to find the foreground of an image).

    When: once, the first time dhat-seg needs the list of attention methods (for
    ``dhat-seg plugins``, ``train --attention NAME``, ``masks build``, ``ablate``).

    Receives: ``register``, a callable taking one
    :class:`dhat_seg.attention.AttentionSpec`. Call it once per method the plugin
    provides. Built-in plugins register first; registering a name that is already
    taken is reported with a warning that names both plugins, and that registration is
    ignored (the plugin's other methods still count). So a third-party plugin cannot
    replace a built-in method such as ``gradcam``: give yours another name.

    Returns: nothing (the return value is ignored).

    Example::

        from dhat_seg import hookimpl
        from dhat_seg.attention import AttentionSpec

        @hookimpl
        def register_attention_methods(register):
            register(AttentionSpec(name="centre", description="a centred disc",
                                   factory=build_centre, version="1"))
    """
