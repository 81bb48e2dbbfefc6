"""The engine interface shared by every rollout backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1                      # completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False        # generate exactly max_new_tokens (benchmarks)


@dataclass
class Sample:
    text: str                       # decoded completion, special tokens removed
    token_ids: list[int]            # completion tokens, including the stop token if one was produced
    logprobs: list[float] | None = field(default=None)  # sampler's log-prob of each token in token_ids
    finished: bool = True           # stopped on EOS (False: hit max_new_tokens)


class Engine(Protocol):
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        """``params.n`` samples for each prompt, in prompt order."""
        ...


ENGINES = ("hf",)


def make_engine(name: str, model, tokenizer, **kwargs) -> Engine:
    if name == "hf":
        from rlkit.rollout.hf import HFEngine

        return HFEngine(model, tokenizer, **kwargs)
    raise ValueError(f"unknown rollout engine {name!r}; expected one of {', '.join(ENGINES)}")
