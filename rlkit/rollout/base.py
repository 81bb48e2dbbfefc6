"""The engine interface shared by every rollout backend.

An engine takes prompt **token ids** (the caller tokenises once) and returns, for each prompt, ``n``
samples with their token ids, the sampler's log-prob of every token and the finish reason:

    engine.generate(prompt_ids, params)  -> list[list[Sample]]   params.n samples per prompt, in order
    engine.sync_weights(model)           the engine samples from ``model``'s current weights from now on
    engine.sleep() / engine.wake()       free / take back the engine's memory around a training update
    engine.close()                       release it for good

The ``hf`` engine samples from the training model itself (sync is a no-op); ``vllm`` runs vLLM in the
training process (``mode: colocate``) or talks to a ``rlkit vllm-serve`` server (``mode: server``).

``ENGINES`` is the registry: each entry has its config schema (:mod:`rlkit.rollout.schema`), its builder and
the capability flags callers ask (``engine_spec(cfg).samples_itself``, ...) instead of comparing names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from rlkit.rollout.schema import HFRollout, VLLMColocateRollout, VLLMServerRollout


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
    """One completion. A multi-turn episode (rlkit.env.episodes) is one Sample too: ``token_ids`` are every token
    after its prompt, the model's turns and the tools' replies as the chat template renders them, and ``mask``
    says which are the model's."""

    text: str                       # decoded completion, special tokens removed (multi-turn: the last model turn)
    token_ids: list[int]            # completion tokens, including the stop token if one was produced
    logprobs: list[float] | None = field(default=None)  # sampler's log-prob of each token in token_ids (0.0 on
    #                                                     environment tokens)
    finish_reason: str = "stop"     # "stop": ended on EOS; "length": hit max_new_tokens
    mask: list[int] | None = None   # per token of token_ids: 1 the model's, 0 the environment's; None: all 1
    prompt_ids: list[int] | None = None  # its own prompt when it differs from its group's (an environment's reset)
    episode: object | None = None   # the multi-turn episode (rlkit.env.episodes.Episode): messages, counts

    @property
    def finished(self) -> bool:
        return self.finish_reason == "stop"


class Engine(Protocol):
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


@dataclass(frozen=True)
class EngineSpec:
    """A registry entry: what an engine is configured by, how it is built, and what it can do."""

    name: str                       # the registry key: hf, vllm-colocate, vllm-server
    schema: type                    # its ``rollout:`` config section (rlkit.rollout.schema)
    build: Callable[..., Engine]    # build(cfg, tokenizer, **make_engine's keywords) -> Engine
    # The caller's in-memory model samples (the caller loads it; the engine has no weights of its own). In
    # training the sampler is the trainer: no off-policy correction. Otherwise old log-probs are recomputed
    # and truncated importance sampling (rl.tis_cap) corrects the sampler/trainer mismatch.
    samples_itself: bool
    # generate runs forwards of the training model, so an FSDP2-sharded policy is gathered around it
    # (rlkit.weights.gathered); otherwise its weights are exported one tensor at a time by sync_weights
    needs_gathered_weights: bool
    # one engine serves every process of a run: only the main process pushes weights (the others join the
    # collective gathers of the export); otherwise each process syncs its own engine
    shared_across_processes: bool
    # every Sample carries the sampler's log-probs (hf: only when built with return_logprobs=True)
    returns_logprobs: bool
    # the engine loads the weights at model_path itself (an in-memory model with those weights need not be
    # pushed); otherwise it samples the caller's model (samples_itself) or the server's own weights until a
    # model is pushed with sync_weights
    loads_model_path: bool


def _build_hf(cfg, tokenizer, *, model=None, model_path=None, max_batch=64, dtype="auto", return_logprobs=False,
              **_) -> Engine:
    from rlkit.rollout.hf import HFEngine

    if model is None:
        import torch

        from rlkit.models import load_causal_lm

        model = load_causal_lm(model_path, dtype)
        model = model.to("cuda") if torch.cuda.is_available() else model
    return HFEngine(model, tokenizer, batch_size=max_batch, cache=cfg.hf_cache, return_logprobs=return_logprobs)


def _build_vllm_colocate(cfg, tokenizer, **kw) -> Engine:
    from rlkit.rollout.vllm import make_colocate_engine

    return make_colocate_engine(cfg, tokenizer, **kw)


def _build_vllm_server(cfg, tokenizer, **kw) -> Engine:
    from rlkit.rollout.vllm_server import make_server_engine

    return make_server_engine(cfg, tokenizer, **kw)


ENGINES: dict[str, EngineSpec] = {s.name: s for s in (
    EngineSpec("hf", HFRollout, _build_hf, samples_itself=True, needs_gathered_weights=True,
               shared_across_processes=False, returns_logprobs=False, loads_model_path=False),
    EngineSpec("vllm-colocate", VLLMColocateRollout, _build_vllm_colocate, samples_itself=False,
               needs_gathered_weights=False, shared_across_processes=False, returns_logprobs=True, loads_model_path=True),
    EngineSpec("vllm-server", VLLMServerRollout, _build_vllm_server, samples_itself=False,
               needs_gathered_weights=False, shared_across_processes=True, returns_logprobs=True, loads_model_path=False),
)}


def engine_spec(cfg) -> EngineSpec:
    """The registry entry of a ``rollout:`` section (a variant of ``rlkit.rollout.schema.Rollout``)."""
    # the section's own engine and mode name its entry (a validated variant: both are known)
    return ENGINES["hf" if cfg.engine == "hf" else f"{cfg.engine}-{cfg.mode}"]


def make_engine(cfg, tokenizer, *, model=None, model_path: str | None = None, max_batch: int = 64,
                max_len: int | None = None, seed: int = 0, dtype: str = "auto", return_logprobs: bool = False,
                max_prompt_len: int | None = None) -> Engine:
    """The engine a ``rollout:`` config section (``rlkit.rollout.schema.Rollout``) describes.

    ``model``: the in-memory model (hf samples from it, loading ``model_path`` when none is given; vllm syncs
    it when given); ``model_path``: the directory vllm loads (its architecture and first weights);
    ``max_batch``: sequences generated at once; ``max_len``: the longest prompt plus completion (vllm sizes
    its KV cache from these); ``max_prompt_len``: the longest prompt (vllm refuses one that cannot fit before
    it starts); ``return_logprobs``: hf computes the sampler's log-probs (vllm always reports them)."""
    return engine_spec(cfg).build(cfg, tokenizer, model=model, model_path=model_path, max_batch=max_batch,
                                  max_len=max_len, seed=seed, dtype=dtype, return_logprobs=return_logprobs,
                                  max_prompt_len=max_prompt_len)
