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

import errno
import os
import socket
import sys

import torch

from rlkit.errors import RlkitError


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
                  max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                  kv_cache_gib: float | None = None, extra: list[str] | None = None) -> tuple[list[str], dict]:
    """The argv and environment of the vLLM server for ``model``."""
    from rlkit.models import context_length, pick_dtype, resolve_model_path
    from rlkit.rollout.vllm import require_vllm

    require_vllm()
    path = resolve_model_path(model)
    context = context_length(path)
    if (max_model_len and context and max_model_len > context and not os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN")
            and not _rope_scaled(path)):
        raise RlkitError(f"--max-model-len {max_model_len}: longer than the context of {model} ({context} tokens, "
                         f"max_position_embeddings); use at most {context}")
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


def _rope_scaled(path: str) -> bool:
    """Whether the model's config scales its positions (vLLM then derives a longer context than
    max_position_embeddings)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config = getattr(config, "text_config", None) or config
    rope = getattr(config, "rope_scaling", None) or {}  # transformers 5: {'rope_type': 'default', ...} when unscaled
    return isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) not in (None, "default")


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` and let go, as vLLM's server will (its ``create_server_socket``: IPv6 only for an IPv6
    literal, SO_REUSEADDR): a port in use, an address that is not this machine's or a host that does not resolve
    is one line before vLLM starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as e:
            raise RlkitError(f"--host {host}: cannot resolve it ({e.strerror}); use an address of this machine, "
                             "e.g. 127.0.0.1") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise RlkitError(f"--port {port}: {host}:{port} is already in use (another `rlkit vllm-serve`?); "
                                 "pick a free --port, or stop what listens there") from None
            if e.errno == errno.EACCES:
                raise RlkitError(f"--port {port}: permission denied on {host}; use a port above 1023") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise RlkitError(f"--host {host}: not an address of this machine; use 127.0.0.1 (this machine "
                                 "only) or its address on a private network") from None
            raise RlkitError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


def serve(model: str, **kwargs) -> None:
    """Become the vLLM server (never returns)."""
    check_port(kwargs.get("host", "127.0.0.1"), kwargs.get("port", 8000))
    argv, env = serve_command(model, **kwargs)
    print(" ".join(argv), flush=True)
    os.execve(argv[0], argv, env)
