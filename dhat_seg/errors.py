"""User-facing errors.

Anything a user can get wrong (a bad option, a missing file, a corrupt checkpoint)
raises :class:`UserError`, and so does a file that cannot be written (:class:`WriteError`:
a full disk, a read-only file system). The CLI prints its message as one line and exits
with a non-zero code, without a traceback. Library users can catch it like any exception.
A stop requested by SIGINT/SIGTERM ends in :class:`Interrupted` (exit code 130/143).
"""


class UserError(Exception):
    """A problem with the user's input: the message names the bad value and what is
    expected, and says how to fix it where that is known."""


class PluginError(UserError):
    """An attention plugin returned something invalid or failed to load."""


class DivergenceError(UserError):
    """Training diverged (a loss that is not finite, or exploding logits); the message
    names where, the last good checkpoint that was kept, and what to change."""


class WriteError(UserError):
    """A file could not be written (a full disk, a read-only file system, no permission):
    the message names the file and the system's reason, says what was kept intact and
    how to continue."""


def os_reason(exc: OSError) -> str:
    """The system's reason for ``exc``: ``no space left on device (ENOSPC)``."""
    import errno

    reason = exc.strerror or str(exc) or type(exc).__name__
    code = errno.errorcode.get(exc.errno) if isinstance(exc.errno, int) else None
    return reason[:1].lower() + reason[1:] + (f" ({code})" if code else "")


def write_error(path, exc: OSError, kept: str) -> WriteError:
    """``cannot write 'PATH': no space left on device (ENOSPC); KEPT``."""
    return WriteError(f"cannot write {str(path)!r}: {os_reason(exc)}; {kept}")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the work at a safe point (a KeyboardInterrupt, so that
    ``except Exception`` does not swallow it). ``message`` says what was kept;
    ``resume``, when set, the command that continues; ``exit_code`` is 128 + the
    signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports it."""

    def __init__(self, signum: int, message: str, resume: str | None = None):
        super().__init__(message)
        self.signum, self.message, self.resume = int(signum), message, resume

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return self.message + (f"; resume with {self.resume}" if self.resume else "")
