"""How the command line fails: every bad input, usage error included, is one ``error:`` line and a non-zero
exit code, never a traceback or click's usage box."""

from __future__ import annotations

import functools
import sys

import typer
from typer.core import TyperGroup

try:  # typer >= 0.22 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

from rlkit.errors import RlkitError


class OneLineErrors(TyperGroup):
    """Usage errors (a bad option value, a missing argument) in the same one-line ``error:`` form and with
    the same exit code 2 as every other bad input, instead of click's usage box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as e:
            e.show()
            sys.exit(0)
        except click_errors.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.secho(f"error: {' '.join(e.format_message().split())}{where}", fg="red", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.secho("interrupted", fg="yellow", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


def friendly_errors(fn):
    """Bad input: one red line on stderr, exit code 2, no traceback. A run stopped by a signal: one yellow
    line and 130 (SIGINT) or 143 (SIGTERM); a diverged run: one line and 3."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RlkitError as e:
            text = " ".join(str(e).split("\n"))
            typer.secho(f"{e.prefix}: {text}", fg="yellow" if e.prefix == "interrupted" else "red", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("interrupted: stopped at once; the last checkpoint is kept", fg="yellow", err=True)
            raise typer.Exit(130) from None

    return wrapper
