"""``train.precision``: the compute precision of training, one key for every trainer.

    auto  bf16 where the hardware computes it natively (a CUDA GPU with bf16; a CPU with AVX-512 BF16 or AMX,
          for a model of hidden size >= 512), else fp32 (the default)
    bf16  bf16 matmuls under autocast; the master weights, the optimizer state, the loss and every
          log-softmax stay fp32
    fp32  everything in fp32

While training, the weights are fp32 whatever the precision (``model.dtype`` is the dtype a model is loaded
and exported in); the RL reference is held in bf16 under bf16 (``reference_dtype``: it only runs forwards), a
frozen LoRA base in bf16 under bf16 on a GPU (``frozen_dtype``).

    from rlkit.precision import for_model, autocast
    p = for_model(cfg.train.precision, cfg.model.path)   # "bf16" or "fp32"
    with autocast(p, device):                  # a forward of the reference, the old log-probs, the critic
        ...
"""

from __future__ import annotations

import contextlib

import torch

def cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (AVX-512 BF16 or AMX tiles): bf16 matmuls run ~2.7x fp32's here."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a private probe that changed: take the safe answer
            continue
    return False


# On a CPU, autocast casts every weight at every forward: below this hidden size the casts cost more than the
# bf16 matmuls save (the embedded model, hidden 128: an r1_zero step 2.53 s in bf16 against 2.26 s in fp32;
# SmolLM2-135M, hidden 576: forward and backward 3.4 s against 5.8 s).
CPU_BF16_MIN_HIDDEN = 512


def resolve(precision: str, hidden_size: int | None = None) -> str:
    """``auto`` made concrete for this machine (and, on a CPU, this model's ``hidden_size``): "bf16" or "fp32"."""
    if precision in ("bf16", "fp32"):
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    small = hidden_size is not None and hidden_size < CPU_BF16_MIN_HIDDEN
    return "bf16" if cpu_has_bf16() and not small else "fp32"


def for_model(precision: str, path: str, trust_remote_code: bool = False) -> str:
    """``resolve`` for the model at ``path`` (its config's hidden size)."""
    if precision != "auto" or torch.cuda.is_available():
        return resolve(precision)
    from rlkit.models import hidden_size

    return resolve(precision, hidden_size(path, trust_remote_code))


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for a resolved "bf16", else nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return torch.autocast(device_type=kind, dtype=torch.bfloat16)


def frozen_dtype(resolved: str) -> torch.dtype:
    """The dtype of a LoRA base (frozen weights the backward passes through): bf16 under bf16 on a GPU; fp32 on
    a CPU, where CPU bf16 attention backward kernels are slow (``fp32_attention_on_cpu``)."""
    return torch.bfloat16 if resolved == "bf16" and torch.cuda.is_available() else torch.float32


def reference_dtype(resolved: str) -> torch.dtype:
    """The dtype of the RL reference (forward passes only): bf16 under bf16, on a CPU too (SmolLM2, 32 x 165
    tokens: 1.25 s in bf16 weights with bf16 attention against 1.67 s for fp32 weights under autocast)."""
    return torch.bfloat16 if resolved == "bf16" else torch.float32


def forward_only(model, resolved: str):
    """``model`` (a frozen copy) in ``reference_dtype``, with the plain sdpa attention if it had the fp32 one
    (the CPU bf16 sdpa forward is fast; only its backward is not)."""
    model = model.to(reference_dtype(resolved))
    if getattr(model.config, "_attn_implementation", None) == FP32_ATTENTION:
        model.set_attn_implementation("sdpa")
    return model


FP32_ATTENTION = "rlkit_sdpa_fp32"


def _sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention with autocast off and fp32 inputs (registered as ``FP32_ATTENTION``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.float()
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


def fp32_attention_on_cpu(model, resolved: str) -> None:
    """Under bf16 on a CPU, ``model``'s sdpa attention runs in fp32: CPU autocast puts sdpa in bf16, whose
    backward kernel is twice as slow as fp32's there (SmolLM2-135M, 32 x 165 tokens: forward and backward 9.7 s
    with bf16 attention, 8.3 s with fp32). The matmuls around it stay bf16. GPUs keep their bf16 kernels."""
    if resolved != "bf16" or torch.cuda.is_available():
        return
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_ATTENTION, _sdpa_fp32)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)
    model.set_attn_implementation(FP32_ATTENTION)


def describe(precision: str, resolved: str) -> str:
    """One line for the model card: what ran."""
    how = ("bf16 compute (autocast), fp32 master weights, fp32 loss and log-softmax" if resolved == "bf16"
           else "fp32 throughout")
    return f"train.precision {precision}" + (f" ({resolved})" if precision == "auto" else "") + f": {how}"
