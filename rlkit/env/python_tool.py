"""``python``: the code sandbox (:mod:`rlkit.sandbox`) as a tool for multi-turn environments
(``env.tools: [rlkit.env.python_tool:python]``). The model's code runs in a fresh sandboxed interpreter;
the tool answers with what it printed, its error, or that it ran out of time.

    >>> python("print(6 * 7)")
    '42'
"""

from __future__ import annotations

import signal

from rlkit.sandbox import run_python

_LIMIT = 2000  # characters of output the model reads back


def python(code: str) -> str:
    """Run Python code in a sandbox and return what it printed.

    Args:
        code: A Python program (standard library only); print what you want to see.
    """
    result = run_python(code, timeout=5.0)
    # the wall-clock kill, or the CPU-time limit's (SIGXCPU, then SIGKILL) on a busy machine
    if result.timed_out or result.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "error: the program did not finish within 5 s"
    out = result.stdout.strip()
    if result.returncode != 0:
        err = result.stderr.strip().splitlines()
        out = (out + "\n" if out else "") + "error: " + (err[-1] if err else f"exit code {result.returncode}")
    return out[:_LIMIT] if out else "(no output)"
