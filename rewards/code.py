"""Code execution (Codex, Chen et al. 2021): the last fenced Python block of a completion, run with the row's
tests in the sandbox (:mod:`rlkit.sandbox`); 1.0 when every test passes, else 0.0.

The ``tests`` column is Python that raises when the code is wrong: a string of asserts, or a list of them
(MBPP's ``test_list``). HumanEval rows (``test`` defining ``check(candidate)``, and ``entry_point``) map onto
it with :func:`humaneval_tests`; MBPP rows with :func:`mbpp_tests`. The program is the completion's code, then
the tests, then a line printing a random token: a completion that exits early (``os._exit(0)``, ``sys.exit``)
or prints what it guesses never passes.

    >>> code(["```python\\ndef add(a, b):\\n    return a + b\\n```"], tests=["assert add(2, 3) == 5"])
    [1.0]
"""

from __future__ import annotations

import os
import re
import secrets

from rlkit.rewards import register

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.S)


def last_code_block(text: str) -> str | None:
    """The last fenced code block (```python, ```py or a bare ```), or None."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else None


def mbpp_tests(row: dict) -> str:
    """MBPP: ``test_setup_code`` (if any) and the ``test_list`` asserts."""
    return "\n".join([row.get("test_setup_code") or "", *row["test_list"]]).strip()


def humaneval_tests(row: dict) -> str:
    """HumanEval: the ``test`` code (defines ``check(candidate)``) called on ``entry_point``."""
    return f"{row['test']}\n\ncheck({row['entry_point']})"


def _as_tests(tests) -> str:
    if isinstance(tests, (list, tuple)):
        return "\n".join(str(t) for t in tests)
    return str(tests)


@register("code")
def code(completions: list[str], tests: list, timeout: float = 5.0, memory_mb: int = 512, **_) -> list[float]:
    """1.0 for a completion whose last Python block passes its row's tests in the sandbox, else 0.0.
    ``timeout``: wall seconds per completion (the runs go in parallel, one per core); the reward's own
    ``timeout`` (rewards[].timeout) bounds the whole call."""
    from concurrent.futures import ThreadPoolExecutor

    from rlkit.sandbox import run_python

    def one(completion: str, t) -> float:
        program = last_code_block(completion)
        if program is None:
            return 0.0
        token = secrets.token_hex(16)
        result = run_python(f"{program}\n\n{_as_tests(t)}\n\nprint({token!r})\n", timeout=timeout,
                            memory_mb=memory_mb)
        return 1.0 if result.ok and result.stdout.rstrip().endswith(token) else 0.0

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, completions, tests))


def _check_row(row: dict) -> str | None:
    t = row.get("tests")
    if not (isinstance(t, str) and t.strip()) and not (isinstance(t, (list, tuple)) and t):
        return "expected a 'tests' column: Python asserts (a string, or a list of them as MBPP's test_list)"
    return None


code.requires = ("tests",)
code.check_row = _check_row
