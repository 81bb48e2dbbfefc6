"""Math answer accuracy with math-verify: the answer inside the last ``<answer>`` block (or the last
``\\boxed{}``) must equal the gold answer, symbolically.

math-verify guards its parser with SIGALRM timeouts, which only work on a process's main thread. So on
the main thread each check runs in-process under a hard per-call timeout; off the main thread (a reward
called from a thread pool, say) the checks go to a small process pool whose workers do the same on their
own main threads. A check that times out or crashes yields NaN, which the reward runner records as a
failure and scores 0.

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

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rlkit.rewards import register

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
TIMEOUT_S = 5
_pool: cf.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def extract_answer(completion: str, mode: str = "tags") -> str | None:
    """The text to check: the last ``<answer>`` block; with mode 'any', fall back to the whole text."""
    blocks = _ANSWER.findall(completion)
    if blocks:
        return blocks[-1].strip()
    if "\\boxed" in completion or mode == "any":
        return completion
    return None


def _gold_text(answer: str) -> str:
    return answer if "$" in answer or "\\" in answer else f"${answer}$"


def parse_gold(answer: str, timeout: int | None = TIMEOUT_S):
    """Parse a gold answer; an empty result means math-verify cannot check against it."""
    return parse(_gold_text(answer), extraction_config=_CONFIG, parsing_timeout=timeout)


def _check(completion: str, answer: str, mode: str, timeout: int | None) -> float:
    """1.0 / 0.0, or NaN when parsing or verifying timed out or failed."""
    pred_text = extract_answer(completion, mode)
    if pred_text is None:
        return 0.0
    try:
        gold = parse(_gold_text(answer), extraction_config=_CONFIG, parsing_timeout=timeout, raise_on_error=True)
        pred = parse(pred_text, extraction_config=_CONFIG, parsing_timeout=timeout, raise_on_error=True)
        if not gold or not pred:
            return 0.0
        return float(verify(gold, pred, timeout_seconds=timeout, raise_on_error=True))
    except Exception:  # math-verify's TimeoutException, or a sympy failure on odd input
        return math.nan


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
    """1.0 when the extracted answer verifies against the gold ``answer`` column, else 0.0 (NaN: check failed)."""
    return scores(completions, answer, mode)
