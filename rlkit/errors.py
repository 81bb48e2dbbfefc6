"""The exception types the CLI turns into a one-line message and a non-zero exit code."""

from __future__ import annotations


class RlkitError(Exception):
    """Bad input from the user: a file, line, key or value, and what was expected."""

    exit_code = 2
    prefix = "error"


class ConfigError(RlkitError):
    """A config or recipe problem, with a one-line message fit for the user."""


class DataError(RlkitError):
    """A data set that cannot be used: the file, line or row, and what was expected."""


class RunInterrupted(RlkitError):
    """A run stopped on a signal after saving what it had (SIGINT: exit 130, SIGTERM: exit 143)."""

    prefix = "interrupted"

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class Diverged(RlkitError):
    """Training produced a non-finite loss, gradient or weight; nothing after the last good checkpoint is kept."""

    exit_code = 3


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
