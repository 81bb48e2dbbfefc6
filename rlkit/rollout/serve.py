"""``rlkit vllm-serve``: vLLM's own OpenAI-compatible server, set up for rollouts.

What rlkit adds to ``vllm serve``: the model name resolved (``embedded``, ``smollm2``, a directory);
log-probs after temperature and top-p (``--logprobs-mode processed_logprobs``, what the trainer compares
with its own); vLLM's dev endpoints (``VLLM_SERVER_DEV_MODE=1``: ``/collective_rpc`` for the weight reload
after each update, ``/reset_prefix_cache``, ``/sleep``, ``/wake_up``); on CPU an explicit KV-cache size
and eager mode. The process becomes the vLLM server (signals reach it directly).

    rlkit vllm-serve --model outputs/sft --port 8000          # then, in another shell:
    rlkit grpo --set rollout.engine=vllm --set rollout.mode=server --set rollout.server_url=http://127.0.0.1:8000

The dev endpoints let anyone who can reach the port run worker methods: bind to loopback or a private
network (the default host is 127.0.0.1).
"""

from __future__ import annotations

import os
import sys

import torch


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
                  max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                  kv_cache_gib: float | None = None, extra: list[str] | None = None) -> tuple[list[str], dict]:
    """The argv and environment of the vLLM server for ``model``."""
    from rlkit.models import context_length, pick_dtype, resolve_model_path
    from rlkit.rollout.vllm import require_vllm

    require_vllm()
    path = resolve_model_path(model)
    context = context_length(path)
    max_len = max_model_len or min(context or 4096, 4096)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
            "--host", host, "--port", str(port), "--dtype", str(pick_dtype(dtype)).removeprefix("torch."),
            "--max-model-len", str(max_len), "--logprobs-mode", "processed_logprobs",
            "--generation-config", "vllm", "--disable-uvicorn-access-log"]
    if torch.cuda.is_available():
        argv += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    else:
        # no chunked prefill: vLLM on CPU cannot rewind a seeded request's generator after one
        argv += ["--enforce-eager", "--kv-cache-memory-bytes", str(int((kv_cache_gib or 1.0) * 2**30)),
                 "--no-enable-chunked-prefill"]
    argv += list(extra or [])
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    if env.pop("RLKIT_QUIETED_VLLM", None):  # a server's own log is its console
        env["VLLM_LOGGING_LEVEL"] = "INFO"
    return argv, env


def serve(model: str, **kwargs) -> None:
    """Become the vLLM server (never returns)."""
    argv, env = serve_command(model, **kwargs)
    print(" ".join(argv), flush=True)
    os.execve(argv[0], argv, env)
