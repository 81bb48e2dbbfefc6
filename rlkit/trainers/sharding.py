"""FSDP2 for the RL loop: ``accelerate launch --config_file $(rlkit config-path fsdp2) -m rlkit grpo ...``.

accelerate's launcher passes the config on as ``ACCELERATE_USE_FSDP``/``FSDP_*`` variables. The RL loop
reads them and shards its models itself with ``torch.distributed.fsdp.fully_shard``: each transformer
block (the model's own ``_no_split_modules``, or ``fsdp_transformer_layer_cls_to_wrap``) is one unit, the
root another. It does so for the policy, the frozen reference model and the critic alike (accelerate's
``prepare`` takes one model under FSDP2, and on CPU it silently falls back to DDP), so the same code runs on
GPUs (NCCL) and on CPU (gloo, as in the tests).

Under sharding:

- gradients are reduce-scattered in every backward; micro-batches before the last skip it
  (:func:`no_sync`); the loss is normalised by global counts (``rl.update._global_count``);
- generation with the hf engine and evaluation run on gathered weights (``rlkit.weights.gathered``: one
  all-gather, then plain forwards with no collectives, so one process may generate more than another);
- the vLLM sync and the Hugging Face export gather one tensor at a time (``rlkit.weights.full_weights``,
  ``rlkit.weights.full_state_dict``);
- checkpoints hold the full model in Hugging Face format (what resume loads, then shards again) and each
  process's optimizer shard as plain tensors (:func:`local_optimizer_state`); a run resumes on the same
  number of processes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from rlkit.config import ConfigError
from rlkit.weights import is_sharded
# TODO(transition): re-exported until rl.py imports them from rlkit.weights
from rlkit.weights import full_state_dict, gathered  # noqa: F401


@dataclass(frozen=True)
class FsdpOptions:
    reshard_after_forward: bool = True
    offload: bool = False
    layer_classes: tuple[str, ...] | None = None  # None: the model's _no_split_modules


def _env_true(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


def fsdp_options() -> FsdpOptions | None:
    """The FSDP2 settings accelerate launch passed on, or None when the run is not sharded. DeepSpeed and
    FSDP1 are one-line errors (the RL loop shards with FSDP2 only)."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError("accelerate config: the RL loop (grpo, ppo) does not run on DeepSpeed; launch it with "
                          "--config_file $(rlkit config-path fsdp2) (ZeRO-3-like sharding); sft and rm do run on "
                          "DeepSpeed")
    if not _env_true("ACCELERATE_USE_FSDP"):
        return None
    version = os.environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ConfigError(f"accelerate config: fsdp_version {version}; the RL loop shards with FSDP2: set "
                          f"fsdp_version: 2 (as $(rlkit config-path fsdp2) does)")
    if _env_true("FSDP_CPU_RAM_EFFICIENT_LOADING"):  # transformers then loads real weights on rank 0 only
        raise ConfigError("accelerate config: fsdp_cpu_ram_efficient_loading true is not supported by the RL loop "
                          "(every process loads the model itself); set it to false")
    classes = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").strip()
    return FsdpOptions(reshard_after_forward=_env_true("FSDP_RESHARD_AFTER_FORWARD", "true"),
                       offload=_env_true("FSDP_OFFLOAD_PARAMS"),
                       layer_classes=tuple(c.strip() for c in classes.split(",") if c.strip()) or None)


def _no_split_modules(model) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def shard(model: torch.nn.Module, opts: FsdpOptions, bf16: bool = False) -> torch.nn.Module:
    """``fully_shard`` each transformer block, then the whole model (in place; returns it). Create the
    optimizer after this: its parameters are the DTensor shards."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    classes = set(opts.layer_classes or _no_split_modules(model))
    units = [m for m in model.modules() if type(m).__name__ in classes]
    if not units:
        raise ConfigError(f"FSDP: no module of class {', '.join(sorted(classes)) or '(none named)'} in "
                          f"{type(model).__name__}; set fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    kw: dict = {"reshard_after_forward": opts.reshard_after_forward}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if opts.offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for m in units:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    model._rlkit_reshard = opts.reshard_after_forward
    # FSDP2 finishes its set-up at the first forward; do it now, on every process alike, so that a forward
    # that only some processes run (evaluation on the main one, inside gathered()) finds the same state.
    model._get_fsdp_state()._lazy_init()
    return model


@contextlib.contextmanager
def no_sync(model, sync: bool):
    """Skip the gradient reduce-scatter of this backward unless ``sync`` (the last micro-batch)."""
    if not is_sharded(model):
        yield
        return
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local_optimizer_state(optimizer) -> dict:
    """This process's optimizer state with every DTensor as its local shard: plain tensors and containers,
    which ``torch.load(weights_only=True)`` reads back."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state = {k: {n: v.to_local() if isinstance(v, DTensor) else v for n, v in s.items()} for k, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_local_optimizer_state(optimizer, sd: dict) -> None:
    """Inverse of :func:`local_optimizer_state`: local shards become DTensors placed as their parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for k, s in sd["state"].items():
        p = params[int(k)]
        state[k] = {n: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.size(),
                                          stride=p.stride())
                    if isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() > 0 else v for n, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
