"""The one exception type the CLI turns into a one-line message and a non-zero exit code."""

from __future__ import annotations


class RlkitError(Exception):
    """Bad input from the user: a file, line, key or value, and what was expected."""
