"""Math answer accuracy with math-verify: the answer inside the last ``<answer>`` block (or the last
``\\boxed{}``) must equal the gold answer, symbolically.

>>> accuracy(["<think> 4 + 7 = 11 </think> <answer> 11 </answer>", "<answer> 12 </answer>"], answer=["11", "11"])
[1.0, 0.0]
"""

from __future__ import annotations

import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rlkit.rewards import register

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())


def extract_answer(completion: str, mode: str = "tags") -> str | None:
    """The text to check: the last ``<answer>`` block; with mode 'any', fall back to the whole text."""
    blocks = _ANSWER.findall(completion)
    if blocks:
        return blocks[-1].strip()
    if "\\boxed" in completion or mode == "any":
        return completion
    return None


def _timeouts() -> dict:
    # math-verify's own timeouts use SIGALRM, which only works on the main thread.
    main = threading.current_thread() is threading.main_thread()
    return {"parsing_timeout": 5 if main else None}, {"timeout_seconds": 5 if main else None}


def parse_gold(answer: str):
    """Parse a gold answer; an empty parse means the gold answer cannot be checked."""
    p_kw, _ = _timeouts()
    text = answer if "$" in answer or "\\" in answer else f"${answer}$"
    return parse(text, extraction_config=_CONFIG, **p_kw)


def is_correct(completion: str, answer: str, mode: str = "tags") -> bool:
    pred_text = extract_answer(completion, mode)
    if pred_text is None:
        return False
    p_kw, v_kw = _timeouts()
    gold = parse_gold(answer)
    pred = parse(pred_text, extraction_config=_CONFIG, **p_kw)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, **v_kw))


@register("accuracy")
def accuracy(completions: list[str], answer: list[str], mode: str = "tags", **_) -> list[float]:
    """1.0 when the extracted answer verifies against the gold ``answer`` column, else 0.0."""
    return [float(is_correct(c, str(a), mode)) for c, a in zip(completions, answer)]
