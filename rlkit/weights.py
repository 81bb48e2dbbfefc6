"""A model's weights, whole: gathering FSDP2 shards, iterating full tensors, merged LoRA weights.

Torch-only helpers shared by the rollout engines (a vLLM sync exports the policy's weights; the hf engine asks
whether a model is sharded) and the trainers (the Hugging Face export, evaluation on gathered weights). The
FSDP2 set-up itself (``fully_shard``, gradient sync) is in :mod:`rlkit.trainers.sharding`.
"""

from __future__ import annotations

import contextlib

import torch


def is_sharded(model) -> bool:
    """Whether ``model`` is an FSDP2 module (``fully_shard``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """The whole model unsharded on every process for the duration (one all-gather, a collective: every
    process enters), forwards inside run without collectives. A no-op for an unsharded model."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
        reshard = getattr(model, "_rlkit_reshard", True)  # set by rlkit.trainers.sharding.shard
        for m in units:  # back to the configured behaviour (the root, as FSDP2 sets it, keeps its parameters)
            m.set_reshard_after_forward(reshard and m is not model, recurse=False)


def full_state_dict(model) -> dict:
    """The full state dict on the main process (on CPU), ``{}`` on the others; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_weights(model):
    """``(name, tensor)`` of ``model``'s weights under the Hugging Face checkpoint names (what vLLM loads),
    one tensor at a time. A peft LoRA model gives its merged weights (base + B·A·scale), computed per
    layer without touching the model; FSDP2 shards are gathered one tensor at a time (a collective)."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        yield from merged_lora_weights(model)
        return
    for name, tensor in model.state_dict().items():
        yield name, (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()


def merged_lora_weights(model):
    """``(name, tensor)`` of a peft LoRA model's base weights with each active adapter's delta added, under
    the base model's names (``.base_layer.`` dropped, ``lora_*`` left out)."""
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
