"""Helpers shared by the ``dhat-seg`` commands: error handling, ``KEY=VALUE`` parsing,
tables, and where a run's settings start."""

from __future__ import annotations

import errno
import functools
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from dhat_seg.errors import Interrupted, UserError, write_error


#: errno values of a disk that cannot take a write: one ``error:`` line wherever they surface
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def user_errors(fn):
    """Turn UserError (and a full or read-only disk) into one ``error:`` line and exit code 2;
    a stop asked by SIGINT/SIGTERM (:class:`~dhat_seg.errors.Interrupted`) into one
    ``interrupted:`` line and exit code 130/143, as a shell reports a process killed by them."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except Interrupted as exc:
            again = "" if exc.resume else "; run the same command again to continue"
            typer.echo(f"interrupted: {exc}{again}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished epochs are checkpointed; continue with --resume --out RUN_DIR", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:
            if exc.errno not in _DISK_ERRNOS:
                raise
            kept = "what was finished is kept (checkpoints and cache chunks are written atomically)"
            typer.echo(f"error: {write_error(exc.filename or 'a file', exc, kept)}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def parse_key_values(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a pair without ``=`` is an error naming ``flag``."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"{flag} {pair!r} is invalid; expected KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` with YAML-typed values (``--set milestones=[6,7]``)."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in parse_key_values(pairs, "--set").items()}


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Rows as an aligned text table with a header and a rule; None -> '-'."""
    cells = [[h for _, h in columns]] + [[("-" if r.get(k) is None else str(r.get(k))) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    typer.echo(format_table(rows, columns))


def config_base(config: str | None, *, resume: bool, out: Path | None, data: str | None = None) -> str | Path | None:
    """Where a run's settings start, before the options given on the command line.

    ``--config`` if given; for ``--resume``, the run's own saved config; otherwise the
    data's own recipe: the ``quick`` preset (calibrated for them) on the built-in data
    (``data`` None means the default, ``synthetic``), the paper's recipe (the config
    defaults) on CIFAR and image folders. So ``dhat-seg train --epochs 3`` on the
    built-in data stays a small run, and ``--data cifar10`` gets the paper schedule.
    """
    from dhat_seg.config import FIELDS
    from dhat_seg.presets import BUILT_IN_DATA

    if config is not None:
        return config
    if resume and out is not None and (out / "config.yaml").is_file():
        return out / "config.yaml"
    return "quick" if (data or FIELDS["data"].default) in BUILT_IN_DATA else None


def describe_base(base: str | Path | None, given: list[str], data: str | None = None) -> str:
    """The first line ``train`` prints: where the settings start and what the command line
    adds, e.g. "settings: quick recipe of the built-in data, plus --epochs 3"."""
    if base is None:
        text = "the paper's recipe (CIFAR and image folders)"
    elif str(base) == "quick" and not isinstance(base, Path):
        text = "quick recipe of the built-in data"
    elif str(base) == "paper" and not isinstance(base, Path):
        text = "the paper preset"
    elif isinstance(base, Path) and base.name == "config.yaml":
        text = f"the run's own {base}"
    else:
        text = f"{'preset' if not Path(str(base)).suffix else 'config file'} {base}"
    return f"settings: {text}" + (f", plus {' '.join(given)}" if given else "")


def log(message: str) -> None:
    """A message for the user (stderr, through logging: ``-q`` silences it)."""
    import logging

    logging.getLogger("dhat_seg.cli").info(message)


def show_progress() -> bool:
    """Progress bars unless ``-q`` (they also stay off when stderr is not a terminal)."""
    import logging

    return logging.getLogger("dhat_seg").getEffectiveLevel() <= logging.INFO


def _usage_message(exc: Exception) -> str:
    """A click usage error (bad option value, unknown option, missing argument) as one line."""
    from typer._click.exceptions import BadParameter, MissingParameter

    if isinstance(exc, BadParameter) and not isinstance(exc, MissingParameter) and exc.param is not None:
        hint = exc.param_hint or exc.param.get_error_hint()
        hint = hint if isinstance(hint, str) else " / ".join(hint)
        hint = hint.replace("'", "")
        errors = getattr(exc.__cause__, "errors", None)  # typer checks values with pydantic
        if callable(errors) and errors() and "input" in errors()[0]:
            first = errors()[0]
            expected = first.get("msg", "").split(",")[0].replace("Input should be ", "")
            expected = expected.replace("a valid integer", "an integer").replace("a valid ", "a ")
            message = f"{hint} {first['input']!r} is invalid; expected {expected}"
        else:
            message = f"{hint} is invalid: {exc.message.rstrip('.')}"
    else:
        message = exc.format_message().rstrip(".")
    message = " ".join(message.split())
    message = message[:1].lower() + message[1:]
    command = getattr(getattr(exc, "ctx", None), "command_path", None)
    return f"{message} (see `{command} --help`)" if command else message


def _one_line(call):
    """Runs ``call``; a usage error (not a request for help) becomes ``error: ...`` and exit code 2."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    try:
        return call()
    except NoArgsIsHelpError:
        raise
    except ClickException as exc:
        typer.echo(f"error: {_usage_message(exc)}", err=True)
        raise typer.Exit(2) from None


class OneLineErrors(TyperGroup):
    """The root command group: errors found while parsing the command line (``--epochs abc``,
    an unknown option, a missing argument) print the one-line ``error:`` form with exit
    code 2, as every other user mistake does, instead of click's usage box."""

    def make_context(self, info_name, args, parent=None, **extra):
        return _one_line(lambda: super(OneLineErrors, self).make_context(info_name, args, parent=parent, **extra))

    def invoke(self, ctx):
        return _one_line(lambda: super(OneLineErrors, self).invoke(ctx))
