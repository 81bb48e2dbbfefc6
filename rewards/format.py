"""Format rewards for the R1 output format ``<think> ... </think> <answer> ... </answer>``.

>>> think_answer_format(["<think> 4 + 7 = 11 </think> <answer> 11 </answer>", "11"])
[1.0, 0.0]
"""

from __future__ import annotations

import re

from rlkit.rewards import register

_STRICT = re.compile(r"\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?think>|</?answer>).)*</answer>\s*", re.S)


def is_well_formed(completion: str, prompt: str | None = None) -> bool:
    """One think block then one answer block and nothing else; if the prompt already opened
    ``<think>`` (as some chat templates do), the completion starts inside the think block."""
    if prompt is not None and prompt.rstrip().endswith("<think>") and not completion.lstrip().startswith("<think>"):
        completion = "<think>" + completion
    return _STRICT.fullmatch(completion) is not None


@register("think_format")
def think_answer_format(completions: list[str], prompts: list[str] | None = None, **_) -> list[float]:
    """1.0 for a strictly well-formed ``<think>…</think><answer>…</answer>`` completion, else 0.0."""
    prompts = prompts or [None] * len(completions)
    return [float(is_well_formed(c, p)) for c, p in zip(completions, prompts)]
