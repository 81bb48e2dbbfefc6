"""The engine interface shared by every rollout backend.

An engine takes prompt **token ids** (the caller tokenises once) and returns, for each prompt, ``n``
samples with their token ids, the sampler's log-prob of every token and the finish reason:

    engine.generate(prompt_ids, params)  -> list[list[Sample]]   params.n samples per prompt, in order
    engine.sync_weights(model)           the engine samples from ``model``'s current weights from now on
    engine.sleep() / engine.wake()       free / take back the engine's memory around a training update
    engine.close()                       release it for good

The ``hf`` engine samples from the training model itself (sync is a no-op); ``vllm`` runs vLLM in the
training process (``mode: colocate``) or talks to a ``rlkit vllm-serve`` server (``mode: server``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1                      # completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None         # None: draw from torch's global RNG (restored on resume)
    ignore_eos: bool = False        # generate exactly max_new_tokens (benchmarks)


@dataclass
class Sample:
    text: str                       # decoded completion, special tokens removed
    token_ids: list[int]            # completion tokens, including the stop token if one was produced
    logprobs: list[float] | None = field(default=None)  # sampler's log-prob of each token in token_ids
    finish_reason: str = "stop"     # "stop": ended on EOS; "length": hit max_new_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason == "stop"


class Engine(Protocol):
    returns_logprobs: bool  # whether samples carry the sampler's log-probs

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, progress=None) -> list[list[Sample]]:
        """``params.n`` samples for each prompt (token ids, no special tokens added), in prompt order;
        ``progress(k)`` is called as ``k`` more sequences finish."""
        ...

    def sync_weights(self, model) -> None:
        """Sample from ``model``'s current weights from now on (a LoRA model: its merged weights)."""
        ...

    def sleep(self) -> None:
        """Release memory (KV cache, weights) until ``wake``: the training update gets it back."""
        ...

    def wake(self) -> None:
        ...

    def close(self) -> None:
        """Release the engine for good."""
        ...


ENGINES = ("hf", "vllm")


def make_engine(cfg, tokenizer, *, model=None, model_path: str | None = None, max_batch: int = 64,
                max_len: int | None = None, seed: int = 0, dtype: str = "auto", return_logprobs: bool = False,
                max_prompt_len: int | None = None) -> Engine:
    """The engine a ``rollout:`` config section (``rlkit.config.RolloutConfig``) describes.

    ``model``: the in-memory model (hf samples from it; vllm syncs it when given); ``model_path``: the
    directory vllm loads (its architecture and first weights); ``max_batch``: sequences generated at
    once; ``max_len``: the longest prompt plus completion (vllm sizes its KV cache from these);
    ``max_prompt_len``: the longest prompt (vllm refuses one that cannot fit before it starts)."""
    if cfg.engine == "hf":
        from rlkit.rollout.hf import HFEngine

        if model is None:
            from rlkit.models import load_causal_lm

            model = load_causal_lm(model_path, dtype)
        return HFEngine(model, tokenizer, batch_size=max_batch, cache=cfg.hf_cache, return_logprobs=return_logprobs)
    if cfg.engine == "vllm":
        from rlkit.rollout.vllm import make_vllm_engine

        return make_vllm_engine(cfg, tokenizer, model=model, model_path=model_path, max_batch=max_batch,
                                max_len=max_len, seed=seed, dtype=dtype, max_prompt_len=max_prompt_len)
    raise ValueError(f"unknown rollout engine {cfg.engine!r}; expected one of {', '.join(ENGINES)}")
