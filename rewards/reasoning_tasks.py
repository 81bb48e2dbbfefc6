"""reasoning-gym: each task's own checker (``score_answer``) as a reward.

Rows from a ``reasoning_gym:NAME?...`` data spec carry the task's ``metadata`` (its ``source_dataset`` names
the task); the reward scores the text inside the last ``<answer>`` block, or the whole completion when
there is none (a chat-template run that answers plainly). Scores are the task's own, in [0, 1] (some tasks
give partial credit). Needs the ``reasoning-gym`` package (``pip install 'rlkit[reasoning-gym]'``).

>>> rows = [{"answer": "2", "metadata": {"source_dataset": "basic_arithmetic"}}] * 2
>>> reasoning_gym_score(["<think> 5 - 3 </think> <answer> 2 </answer>", "<answer> 3 </answer>"],
...                     answer=[r["answer"] for r in rows], metadata=[r["metadata"] for r in rows])
[1.0, 0.0]
"""

from __future__ import annotations

from rlkit.rewards import register
from rlkit.rewards.math_answer import extract_answer


def _scorer(task: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


@register("reasoning_gym")
def reasoning_gym_score(completions: list[str], answer: list[str], metadata: list[dict], prompts: list | None = None,
                        prompt: list | None = None, **_) -> list[float]:
    questions = prompt or [None] * len(completions)
    out = []
    for c, gold, meta, q in zip(completions, answer, metadata, questions):
        text = extract_answer(c, "any").strip()
        entry = {"question": q, "answer": gold, "metadata": meta}
        out.append(float(_scorer(meta["source_dataset"])(text, entry)))
    return out


def _check_row(row: dict) -> str | None:
    meta = row.get("metadata")
    if not isinstance(meta, dict) or "source_dataset" not in meta:
        return "has no reasoning-gym metadata (use a reasoning_gym:NAME data spec)"
    try:
        _scorer(meta["source_dataset"])
    except ImportError:
        return "needs the reasoning-gym package: pip install 'rlkit[reasoning-gym]'"
    except Exception as e:  # an unknown task name
        return f"no reasoning-gym scorer for '{meta['source_dataset']}' ({e})"
    return None


reasoning_gym_score.requires = ("answer", "metadata")
reasoning_gym_score.check_row = _check_row
