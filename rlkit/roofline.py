"""What ``rlkit bench`` sets a GRPO step against: the machine's matmul peak, measured in the same run and
dtype, the FLOPs the update and the reference pass did, and the peak memory.

    peak = matmul_peak(torch.bfloat16)           # GFLOP/s of a 4096 x 4096 product on this device
    with PeakMemory() as mem: ...                # mem.gib: peak RSS (CPU) or max_memory_allocated (CUDA)
    update_flops(params, tokens)                 # 6 x params x tokens: forward and backward
    forward_flops(params, tokens)                # 2 x params x tokens: a forward-only pass (reference, old)
    attention_flops(layers, width, row_len, rows)  # stated apart: 4 x layers x width x row_len^2 per row

The parameter count times tokens is the usual estimate (Kaplan et al. 2020): every weight does one
multiply-add per token in the forward pass and two in the backward. Tokens are the real ones (padding
excluded), so the figure is the useful work; attention's own products grow with the row length and are
reported apart, counted over the padded rows as the kernels compute them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def matmul_peak(dtype: torch.dtype, n: int = 4096, reps: int = 3, device: str | None = None) -> float:
    """GFLOP/s of an ``n`` x ``n`` matmul in ``dtype`` on this device (the best of ``reps`` after a warm-up),
    with the threads torch has."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    best = float("inf")
    for i in range(reps + 1):
        _sync()
        t0 = time.perf_counter()
        (a @ b).sum()
        _sync()
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def update_flops(params: int, tokens: float) -> float:
    return 6.0 * params * tokens


def forward_flops(params: int, tokens: float) -> float:
    return 2.0 * params * tokens


def attention_flops(layers: int, width: int, row_len: float, rows: float, passes: int = 3) -> float:
    """Q·K and attention·V over full rows of ``row_len`` (``width`` = heads x head dim), ``passes`` 3 for a
    forward and backward, 1 for a forward."""
    return 4.0 * layers * width * row_len**2 * rows * passes


def model_shape(model) -> dict:
    """Parameters (all, trainable) and the attention's layers and width, from a loaded model."""
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    head_dim = getattr(cfg, "head_dim", None) or ((cfg.hidden_size // heads) if heads else 0)
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "layers": getattr(cfg, "num_hidden_layers", 0) or 0, "attention_width": heads * head_dim}


class PeakMemory:
    """Peak memory inside the block: on CUDA ``max_memory_allocated`` (reset at entry); on Linux the process's
    peak resident set (VmHWM, reset at entry through /proc/self/clear_refs); else None."""

    gib: float | None = None

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            return False
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.gib = round(int(line.split()[1]) / 2**20, 2)
        except OSError:
            self.gib = None
        return False


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
