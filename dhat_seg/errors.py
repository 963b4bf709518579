"""User-facing errors.

Anything a user can get wrong (a bad option, a missing file, a corrupt checkpoint)
raises :class:`UserError`. The CLI prints its message as one line and exits with a
non-zero code, without a traceback. Library users can catch it like any exception.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the bad value and what is
    expected, and says how to fix it where that is known."""


class PluginError(UserError):
    """An attention plugin returned something invalid or failed to load."""


class DivergenceError(UserError):
    """Training diverged (a loss that is not finite, or exploding logits); the message
    names where, the last good checkpoint that was kept, and what to change."""
