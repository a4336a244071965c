"""One-line errors on the command line: no traceback unless asked for.

Every `n2n` command runs under `FriendlyGroup` / `FriendlyCommand`: an exception that
reaches the command line is printed as one line, `Error: ...`, naming the file, row or
option, and the command exits with the error's status (`pipeline.errors`: 2 for a
command that cannot run as given, 1 otherwise). `--debug` (on `n2n` or on a command)
or the environment variable N2N_DEBUG=1 shows the full traceback instead. Click's own
usage errors (an unknown option, a value out of range) keep click's format and status 2.
"""
from __future__ import annotations

import os

import click

from pipeline.errors import UserError

DEBUG_ENV = "N2N_DEBUG"
_META_KEY = "n2n.debug"


def debug_requested(ctx: click.Context | None = None) -> bool:
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        return True
    return bool(ctx is not None and ctx.meta.get(_META_KEY))


def _set_debug(ctx: click.Context, _param, value: bool) -> None:
    if value:
        ctx.meta[_META_KEY] = True


def debug_option(function):
    """`--debug`: show the full traceback of an error (also N2N_DEBUG=1)."""
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help=f"Show the full traceback of an error (also {DEBUG_ENV}=1).")(function)


def one_line(error: BaseException) -> str:
    """The error as one line: its message's first line, with the type when it is not a user error."""
    text = " ".join(str(error).split("\n")[0].split()) if str(error).strip() else ""
    if isinstance(error, UserError):
        return text
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def error_line(error: BaseException) -> str:
    """What n2n prints for an error that reaches the command line: `Error: ...`, one line."""
    hint = "" if isinstance(error, UserError) else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
    return f"Error: {one_line(error)}{hint}"


def exit_status(error: BaseException) -> int:
    return getattr(error, "exit_code", 1) if isinstance(error, UserError) else 1


class _Friendly:
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt):
            raise
        except Exception as error:
            if debug_requested(ctx):
                raise
            click.echo(error_line(error), err=True)
            ctx.exit(exit_status(error))


class FriendlyCommand(_Friendly, click.Command):
    """A click command whose errors are one line (see the module docstring)."""


class FriendlyGroup(_Friendly, click.Group):
    """A click group whose subcommands' errors are one line (see the module docstring)."""
