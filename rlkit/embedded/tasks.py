"""Built-in tasks of the embedded world: deterministic generators with train/test splits and gold answers.

``arithmetic``: ``What is A + B?`` for A, B in 0..99 with the integer sum as the answer. The 10,000
pairs are split once, by a fixed seed, into 500 test questions and 9,500 training questions; the
embedded base model never saw a test question during pretraining.

``calculator``: the same question for A, B of 3 to 4 digits (100..9999), too large for the embedded model
to add in its head: the task of ``--recipe calculator``, where the model may call a calculator tool. 500 test
pairs and 20,000 training pairs, disjoint, drawn once by a fixed seed.

>>> rows = task_split("arithmetic", "test")
>>> len(rows), sorted(rows[0])
(500, ['a', 'answer', 'b', 'prompt'])
"""

from __future__ import annotations

import random
from functools import lru_cache

TASKS = ("arithmetic", "calculator")
# Data sets of the embedded world besides the tasks' prompt/answer rows (``embedded:NAME``).
DATASETS = ("demos", "mixed_demos", "comparisons", "rankings", "general")
SPLITS = ("train", "test")
ARITHMETIC_TEST_SIZE = 500
_SEED = 1234
CALCULATOR_TEST_SIZE = 500
CALCULATOR_TRAIN_SIZE = 20000


def arithmetic_question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def careful_reasoning(a: int, b: int) -> str:
    """The digit-by-digit working that the embedded model learns as its careful mode.

    >>> careful_reasoning(34, 57)
    'step by step : 4 + 7 = 11 , write 1 carry 1 . 3 + 5 + 1 = 9 . so 91'
    """
    ua, ub, ta, tb = a % 10, b % 10, a // 10, b // 10
    units = ua + ub
    carry = units // 10
    tens = ta + tb + carry
    return (
        f"step by step : {ua} + {ub} = {units} , write {units % 10} carry {carry} . "
        f"{ta} + {tb} + {carry} = {tens} . so {a + b}"
    )


@lru_cache(maxsize=None)
def _arithmetic_pairs() -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng = random.Random(_SEED)
    rng.shuffle(pairs)
    test = tuple(pairs[:ARITHMETIC_TEST_SIZE])
    train = tuple(pairs[ARITHMETIC_TEST_SIZE:])
    return train, test


@lru_cache(maxsize=None)
def _calculator_pairs() -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    rng = random.Random(_SEED + 1)
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    while len(pairs) < CALCULATOR_TEST_SIZE + CALCULATOR_TRAIN_SIZE:
        pair = (rng.randint(100, 9999), rng.randint(100, 9999))
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return tuple(pairs[CALCULATOR_TEST_SIZE:]), tuple(pairs[:CALCULATOR_TEST_SIZE])


def task_split(task: str, split: str) -> list[dict]:
    """Rows ``{prompt, answer, ...}`` of a built-in task's split, in a fixed order."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for task {task!r}; expected one of {', '.join(SPLITS)}")
    train, test = _arithmetic_pairs() if task == "arithmetic" else _calculator_pairs()
    pairs = train if split == "train" else test
    return [{"prompt": arithmetic_question(a, b), "answer": str(a + b), "a": a, "b": b} for a, b in pairs]


def demonstrations(task: str = "arithmetic", n: int | None = None) -> list[dict]:
    """Conversational SFT demonstrations on the train split: a careful worked answer in R1 format."""
    rows = task_split(task, "train")
    if n is not None:
        rows = rows[:n]
    return [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {
                    "role": "assistant",
                    "content": f"<think> {careful_reasoning(r['a'], r['b'])} </think> <answer> {r['answer']} </answer>",
                },
            ]
        }
        for r in rows
    ]


def rough_answer(a: int, b: int) -> str:
    """The rough mode: both numbers rounded to tens (right only when the rounding errors cancel)."""
    ra, rb = (a + 5) // 10 * 10, (b + 5) // 10 * 10
    return f"<think> roughly : {a} is about {ra} , {b} is about {rb} , so about {ra + rb} </think> <answer> {ra + rb} </answer>"


def careful_answer(a: int, b: int) -> str:
    return f"<think> {careful_reasoning(a, b)} </think> <answer> {a + b} </answer>"


def sloppy_answer(a: int, b: int) -> str:
    return f"the answer is {(a + 5) // 10 * 10 + (b + 5) // 10 * 10} ."


def _chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def mixed_demonstrations(n: int = 2000, careful_share: float = 0.4, seed: int = 7) -> list[dict]:
    """InstructGPT-style labeler demonstrations of mixed quality: some careful worked answers, the rest
    rough estimates, all in the R1 format. An SFT model imitates the mix; RL against a reward model that
    learned the labelers' preferences can then do better than the demonstrations on average."""
    rng = random.Random(seed)
    rows = task_split("arithmetic", "train")
    out = []
    for r in rng.sample(rows, n):
        a, b = r["a"], r["b"]
        out.append(_chat(r["prompt"], careful_answer(a, b) if rng.random() < careful_share else rough_answer(a, b)))
    return out


def rankings(n: int = 1500, seed: int = 11) -> list[dict]:
    """Labeler rankings of K=3 responses per prompt, best first: a correct worked answer, then the rough
    estimate (when it is wrong), then a malformed answer. Rows: ``{prompt, responses}``."""
    rng = random.Random(seed)
    rows = task_split("arithmetic", "train")
    out = []
    for r in rng.sample(rows, n):
        a, b = r["a"], r["b"]
        if (a + 5) // 10 * 10 + (b + 5) // 10 * 10 == a + b:
            continue  # a correct rough answer ties with the worked one: labelers skip the ranking
        out.append({"prompt": r["prompt"], "responses": [careful_answer(a, b), rough_answer(a, b), sloppy_answer(a, b)]})
    return out


def comparisons(n: int = 1500, seed: int = 13) -> list[dict]:
    """Pairwise comparisons ``{prompt, chosen, rejected}``: the worked answer preferred to the rough or the
    malformed one."""
    out = []
    for i, r in enumerate(rankings(n, seed)):
        out.append({"prompt": r["prompt"], "chosen": r["responses"][0], "rejected": r["responses"][1 + i % 2]})
    return out


def general_prompts(n: int = 2000, seed: int = 17) -> list[dict]:
    """Prompts with no gold answer: in all-scenario RL a reward model judges them (route 'general')."""
    rows = random.Random(seed).sample(task_split("arithmetic", "train"), n)
    return [{"prompt": r["prompt"]} for r in rows]


def dataset(name: str) -> list[dict]:
    """An embedded data set by name (see DATASETS)."""
    if name == "demos":
        return demonstrations()
    if name == "mixed_demos":
        return mixed_demonstrations()
    if name == "comparisons":
        return comparisons()
    if name == "rankings":
        return rankings()
    if name == "general":
        return general_prompts()
    raise ValueError(f"unknown embedded data set {name!r}; expected one of {', '.join(DATASETS)}")
