"""Format rewards for the R1 output format ``<think> ... </think> <answer> ... </answer>``.

>>> think_answer_format(["<think> 4 + 7 = 11 </think> <answer> 11 </answer>", "11"])
[1.0, 0.0]
>>> tag_count(["<think> a </think> <answer> 1 </answer>", "<think> a </think><think> b </think> <answer> 1 </answer>"])
[1.0, 0.5]
"""

from __future__ import annotations

import re

from rlkit.rewards import RewardError, register

_STRICT = re.compile(
    r"\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?think>|</?answer>).)*</answer>\s*", re.S
)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def _opened_by_prompt(completion: str, prompt: str | None) -> str:
    """If the prompt already opened ``<think>`` (as some chat templates do), the completion starts inside it."""
    if prompt is not None and prompt.rstrip().endswith("<think>") and not completion.lstrip().startswith("<think>"):
        return "<think>" + completion
    return completion


def is_well_formed(completion: str, prompt: str | None = None) -> bool:
    """One think block then one answer block and nothing else."""
    return _STRICT.fullmatch(_opened_by_prompt(completion, prompt)) is not None


@register("think_format")
def think_answer_format(completions: list[str], prompts: list[str] | None = None, **_) -> list[float]:
    """1.0 for a strictly well-formed ``<think>…</think><answer>…</answer>`` completion, else 0.0.
    A prompt that already opened ``<think>`` counts as the completion's opening tag.

    >>> think_answer_format(["<think> a </think> <answer> 1 </answer> <answer> 2 </answer>", " a </think> <answer> 1 </answer>"],
    ...                     prompts=["Assistant:", "Assistant: <think>"])
    [0.0, 1.0]
    """
    prompts = prompts or [None] * len(completions)
    return [float(is_well_formed(c, p)) for c, p in zip(completions, prompts)]


@register("tag_count")
def tag_count(completions: list[str], prompts: list[str] | None = None, **_) -> list[float]:
    """0.25 for each of the four tags that occurs exactly once: a dense signal that penalises repeated blocks.

    >>> tag_count(["<think> a </think> <answer> 1 </answer>", "<think> a </think> <answer> 1 </answer> <answer> 2 </answer>", "7"])
    [1.0, 0.5, 0.0]
    """
    prompts = prompts or [None] * len(completions)
    out = []
    for c, p in zip(completions, prompts):
        text = _opened_by_prompt(c, p)
        out.append(0.25 * sum(text.count(t) == 1 for t in TAGS))
    return out


_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.S)
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_SCRIPTS = {
    "en": lambda ch: ch.isascii(),
    "zh": lambda ch: "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf",
}


@register("language")
def language_consistency(completions: list[str], prompts: list[str] | None = None, language: str = "en",
                         **_) -> list[float | None]:
    """DeepSeek-R1's language-consistency reward: the share of words in the reasoning (the ``<think>``
    block, or the whole completion without one) written in the target language's script.
    None when the reasoning has no words. ``language``: en or zh.

    >>> language_consistency(["<think> add the digits </think> <answer> 3 </answer>", "<think> 先 add 数字 </think>", "<think> 1 + 2 </think>"])
    [1.0, 0.3333333333333333, None]
    """
    if language not in _SCRIPTS:
        raise ValueError(f"language reward: unknown language {language!r}; expected one of {', '.join(_SCRIPTS)}")
    in_script = _SCRIPTS[language]
    prompts = prompts or [None] * len(completions)
    out: list[float | None] = []
    for c, p in zip(completions, prompts):
        text = _opened_by_prompt(c, p)
        m = _THINK.search(text)
        words = _WORD.findall(m.group(1) if m else text)
        if not words:
            out.append(None)
            continue
        out.append(sum(all(in_script(ch) for ch in w) for w in words) / len(words))
    return out


def _prepare_language(language: str = "en", **_) -> None:
    if language not in _SCRIPTS:
        raise RewardError(f"reward 'language': params.language {language!r}; expected one of {', '.join(_SCRIPTS)}")


language_consistency.prepare = _prepare_language

