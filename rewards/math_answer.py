"""Math answer accuracy with math-verify: the answer inside the last ``<answer>`` block (or the last
``\\boxed{}``) must equal the gold answer, symbolically.

math-verify guards its parser with SIGALRM timeouts, which only work on a process's main thread. So on
the main thread each check runs in-process under a hard per-call timeout; off the main thread (a reward
called from a thread pool, say) the checks go to a small process pool whose workers do the same on their
own main threads. A check that times out or crashes yields NaN, which the reward runner records as a
failure and scores 0. Because the reward bounds its own time this way, it is marked ``self_timed`` and the
reward runner calls it on its own thread, without a time limit of its own.

Gold answers and answer blocks are read as LaTeX math (``$...$`` is added when missing), so ``2\\pi`` is
2π, not 2. Digit groups are one number (``1 000``, ``1\\,000``, ``1{,}000``, a thin or no-break space), in
answers and gold alike; math-verify alone reads ``1 000`` as the product 1 · 000 = 0. ``gold_error`` says
why a gold answer cannot be checked: it must parse, and verify against itself (``12:00`` parses as 12/0,
which verifies against nothing); ``accuracy.check_row`` runs it on each dataset row before training
starts. A completion whose answer makes math-verify raise is a wrong answer (0), not a failure; only a
timeout, or a crash of the check itself, is a failure.

>>> accuracy(["<think> 4 + 7 = 11 </think> <answer> 11 </answer>", "<answer> 12 </answer>"], answer=["11", "11"])
[1.0, 0.0]
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import math
import multiprocessing as mp
import re
import threading
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException  # a BaseException: ``except Exception`` lets it through
from sympy.core.function import AppliedUndef

from rlkit.errors import first_line
from rlkit.rewards import RewardError, register

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
TIMEOUT_S = 5
_pool: cf.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def extract_answer(completion: str, mode: str = "tags") -> str | None:
    """The text to check: the last ``<answer>`` block; with mode 'any', fall back to the whole text.

    >>> extract_answer("<answer> 1 </answer> <answer> 2 </answer>"), extract_answer("2"), extract_answer("2", "any")
    ('2', None, '2')
    """
    blocks = _ANSWER.findall(completion)
    if blocks:
        return blocks[-1].strip()
    if "\\boxed" in completion or mode == "any":
        return completion
    return None


# A digit-group separator: a space (also thin U+2009, narrow no-break U+202F, no-break U+00A0), LaTeX's
# thin or normal space (\, \: \; \  ~), or the {,} that keeps a LaTeX comma from spacing out.
_SEP = r"(?:[ \u2009\u202f\u00a0]|\\[,:; ]|~|\{,\})"
_GROUPED = re.compile(rf"(?<![\d.,])\d{{1,3}}(?:{_SEP}\d{{3}})+(?![\d])")
_SEP_RE = re.compile(_SEP)


def join_digit_groups(text: str) -> str:
    r"""Digit groups as one number: a first group of 1-3 digits, then groups of exactly 3.

    >>> join_digit_groups(r"1 000 and 12\,345\,678 and 1{,}000, not 3 14 or 1 0000")
    '1000 and 12345678 and 1000, not 3 14 or 1 0000'
    """
    return _GROUPED.sub(lambda m: _SEP_RE.sub("", m.group(0)), text)


def _math_text(answer: str) -> str:
    """An answer as math-verify should read it: as LaTeX math, digit groups joined. Without ``$``
    math-verify reads bare LaTeX only in part (``2\\pi`` as 2) or not at all (``\\sqrt{2}``)."""
    answer = join_digit_groups(answer)
    return answer if "$" in answer or "\\boxed" in answer else f"${answer}$"


_PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_LIST = re.compile(r"\[[^\[\],;]*\]|\[\s*['\"].*\]")  # [7], ['7', '8']: a list stored as text
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")    # a word of 3+ letters that is not a LaTeX command


def gold_error(answer) -> str | None:
    r"""Why math-verify cannot check completions against this gold answer, or None when it can.

    >>> [gold_error(a) for a in ["42", r"\frac{1}{2}", r"2\pi", "(1, 2)", "x^2+1"]]
    [None, None, None, None, None]
    >>> gold_error("banana")
    "gold answer 'banana' is read by math-verify as a product of one-letter symbols (a*a*a*b*n*n), not as a word"
    """
    return _gold_error(str(answer).strip())


@lru_cache(maxsize=65536)
def _gold_error(text: str) -> str | None:
    if not text:
        return "empty gold answer"
    if _PLAIN_NUMBER.fullmatch(text):
        return None
    if _LIST.fullmatch(text):
        return f"gold answer {text!r} looks like a list, not an answer (was the 'answer' column a JSON list?)"
    on_main = threading.current_thread() is threading.main_thread()  # math-verify's timeout is SIGALRM
    try:
        parsed = parse(_math_text(text), extraction_config=_CONFIG, parsing_timeout=TIMEOUT_S if on_main else None,
                       raise_on_error=True)
    except (Exception, TimeoutException) as e:  # a timeout, or a sympy failure
        return f"gold answer {text!r} cannot be parsed by math-verify ({type(e).__name__})"
    expr = next((p for p in parsed if not isinstance(p, str)), None)
    if expr is None:
        return f"gold answer {text!r} cannot be parsed by math-verify as a number or expression"
    try:  # an answer that equals nothing (12:00 parses as 12/0, complex infinity) would fail every sample
        itself = verify(parsed, parsed, timeout_seconds=TIMEOUT_S if on_main else None, raise_on_error=True)
    except (Exception, TimeoutException) as e:
        itself, why = False, f"{type(e).__name__}: {first_line(e, 80)}"
    else:
        why = "it is not equal to itself"
    if not itself:
        return (f"gold answer {text!r} is read by math-verify as {expr}, which it cannot compare ({why}); "
                "write the answer as a number or expression")
    names = [str(s) for s in getattr(expr, "free_symbols", ())]
    names += [f.func.__name__ for f in expr.atoms(AppliedUndef)] if hasattr(expr, "atoms") else []  # sin(x): i*s*n(x)
    one_letter = {n.lower() for n in names if len(n) == 1}
    for word in _WORD.findall(text):
        letters = set(word.lower()) - {"e", "i"}  # e and i become Euler's number and the imaginary unit
        if letters and letters <= one_letter:
            return (f"gold answer {text!r} is read by math-verify as a product of one-letter symbols "
                    f"({expr}), not as a word")
    return None


def _check(completion: str, answer: str, mode: str, timeout: int | None) -> float:
    """1.0 / 0.0, or NaN when parsing or verifying timed out or failed."""
    pred_text = extract_answer(completion, mode)
    if pred_text is None:
        return 0.0
    # an <answer> block is read as math; a \boxed{} or whole completion as it is; digit groups joined either way
    pred_text = _math_text(pred_text) if _ANSWER.search(completion) else join_digit_groups(pred_text)
    try:
        gold = parse(_math_text(answer), extraction_config=_CONFIG, parsing_timeout=timeout, raise_on_error=True)
    except (Exception, TimeoutException):  # the gold answer cannot be read: a failure, not a wrong answer
        return math.nan
    try:
        pred = parse(pred_text, extraction_config=_CONFIG, parsing_timeout=timeout, raise_on_error=True)
        if not gold or not pred:
            return 0.0
        return float(verify(gold, pred, timeout_seconds=timeout, raise_on_error=True))
    except TimeoutException:  # the check did not finish: a failure (counted), not a verdict
        return math.nan
    except Exception:  # sympy cannot read or compare this answer (12/0, odd input): a wrong answer
        return 0.0


def _check_batch(items: list[tuple[str, str, str]]) -> list[float]:
    return [_check(c, a, m, TIMEOUT_S) for c, a, m in items]


def _get_pool() -> cf.ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
            atexit.register(_pool.shutdown, wait=False, cancel_futures=True)
        return _pool


def _reset_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
            _pool = None


def is_correct(completion: str, answer: str, mode: str = "tags") -> bool:
    return scores([completion], [answer], mode)[0] == 1.0


def scores(completions: list[str], answers: list[str], mode: str = "tags") -> list[float]:
    items = [(c, str(a), mode) for c, a in zip(completions, answers)]
    if threading.current_thread() is threading.main_thread():
        return _check_batch(items)
    future = _get_pool().submit(_check_batch, items)
    try:
        return future.result(timeout=TIMEOUT_S * 3 * max(1, len(items)) + 30)
    except (cf.TimeoutError, cf.process.BrokenProcessPool):
        _reset_pool()
        return [math.nan] * len(items)


@register("accuracy")
def accuracy(completions: list[str], answer: list[str], mode: str = "tags", **_) -> list[float]:
    r"""1.0 when the extracted answer verifies against the gold ``answer`` column, else 0.0 (NaN: check failed).
    ``mode``: 'tags' reads the last ``<answer>`` block (or ``\boxed{}``); 'any' falls back to the whole text.

    >>> accuracy([r"<answer> $\frac{1}{2}$ </answer>", r"<answer> 2\pi </answer>", "the answer is 2"],
    ...          answer=["0.5", "2", "2"])
    [1.0, 0.0, 0.0]
    """
    return scores(completions, answer, mode)


def _check_row(row: dict) -> str | None:
    return gold_error(row["answer"])


def _prepare(mode: str = "tags", **_) -> None:
    if mode not in ("tags", "any"):
        raise RewardError(f"reward 'accuracy': params.mode {mode!r}; expected tags (the last <answer> block or "
                          "\\boxed{}) or any (else the whole completion)")


accuracy.prepare = _prepare       # the mode is checked when the reward set is built, before training
accuracy.requires = ("answer",)   # columns each applicable row must have (RewardSet.check_rows)
accuracy.check_row = _check_row   # the gold answer must be one math-verify can check against
accuracy.self_timed = True        # bounds its own time (above): the reward runner calls it directly
