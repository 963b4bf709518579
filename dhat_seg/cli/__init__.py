"""The ``dhat-seg`` command line (typer). Each command is a thin shell over the library:
it parses, calls one library function, and prints.

One module per command group: :mod:`.train`, :mod:`.evaluate` (``eval``), :mod:`.masks`,
:mod:`.ablate`, :mod:`.compare`, :mod:`.methods`, :mod:`.plugins`, :mod:`.datasets`,
:mod:`.report`; shared helpers in :mod:`.common`.
User mistakes surface as one ``error: ...`` line on stderr and exit code 2; no
tracebacks. Messages go through :mod:`logging` to stderr (``-v`` for more, ``-q`` for
warnings only); progress bars go to stderr when it is a terminal; results to stdout.
"""

from __future__ import annotations

import logging
import sys

import typer

from dhat_seg.cli.common import OneLineErrors

app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DHAT adversarial training with pluggable attention (foreground) methods.")


class _Stderr(logging.Handler):
    """One line per message on the current sys.stderr (also when a test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
            print(prefix + record.getMessage(), file=sys.stderr, flush=True)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def configure_logging(verbosity: int) -> None:
    """``dhat_seg`` loggers to stderr: -1 warnings only, 0 info, 1 debug."""
    logger = logging.getLogger("dhat_seg")
    logger.handlers[:] = [_Stderr()]
    logger.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
    logger.propagate = False


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="more messages (debug)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="warnings and errors only; no progress bars"),
) -> None:
    """DHAT adversarial training with pluggable attention (foreground) methods."""
    configure_logging(-1 if quiet else (1 if verbose else 0))


configure_logging(0)

from dhat_seg.cli import ablate, compare, datasets, evaluate, masks, methods, plugins, report, train  # noqa: E402

for _module in (train, evaluate, masks, ablate, compare, methods, plugins, datasets, report):  # commands register on app
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
