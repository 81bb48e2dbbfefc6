"""Collectives of the RL loop, in one place: every cross-process number goes through ``all_reduce`` here.

Each function is a no-op (no collective) in a single process, and every process must call it with the same
keys in the same order (a collective over different keys would hang). Values are float64 on the
accelerator's device: the gloo/NCCL sum of each entry is the same whatever else the tensor holds.
"""

from __future__ import annotations

import contextlib

import torch

from rlkit.trainers import sharding


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` reduced over every process, in place (``op``: sum | max); returned for chaining."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def any_process(acc, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a signal may reach processes at different times)."""
    if acc.num_processes == 1:
        return flag
    return bool(_all_reduce(torch.tensor(float(flag), device=acc.device)).item() > 0)


def global_sum(acc, n: torch.Tensor) -> torch.Tensor:
    """The global normaliser's all-reduce: a count (a 0-dim tensor) summed over every process, in place."""
    return _all_reduce(n) if acc.num_processes > 1 else n


def means(acc, series: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each list over all processes' values, in one all-reduce (a list may be empty on some)."""
    if not series:
        return {}
    t = torch.tensor([[sum(v), float(len(v))] for v in series.values()], dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        _all_reduce(t)
    return {k: (s / n if n > 0 else 0.0) for k, (s, n) in zip(series, t.tolist())}


def maxes(acc, values: dict[str, float]) -> dict[str, float]:
    """The largest of every process's value, per key, in one all-reduce."""
    if acc.num_processes == 1 or not values:
        return dict(values)
    t = _all_reduce(torch.tensor(list(values.values()), dtype=torch.float64, device=acc.device), "max")
    return dict(zip(values, t.tolist()))


def combine_shares(acc, metrics: dict, n: int) -> dict:
    """Per-prompt means computed by each process on its share of ``n`` prompts, combined into the means over
    all prompts (weighted by ``n``); ``n_prompts`` summed, ``seconds`` the slowest share's."""
    keys = [k for k in metrics if k not in ("n_prompts", "seconds")]
    t = torch.tensor([metrics[k] * n for k in keys] + [float(n)], dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        _all_reduce(t)
    total = float(t[-1])
    out = {k: float(v) / max(total, 1.0) for k, v in zip(keys, t[:-1].tolist())}
    out["n_prompts"] = int(total)
    out["seconds"] = maxes(acc, {"seconds": float(metrics.get("seconds", 0.0))})["seconds"]
    return out


def no_sync(acc, model, sync: bool):
    """Gradient synchronisation only when ``sync`` (the last micro-batch of an optimizer step)."""
    if sharding.is_sharded(model):
        return sharding.no_sync(model, sync)
    return contextlib.nullcontext() if sync else acc.no_sync(model)


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (a sharded model's gradient norm) as the plain tensor it stands for (a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a sharded model's parameter), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def join_gather(sharded: bool, model) -> None:
    """Under FSDP2, take part in the gathers of the main process's push to a shared server (it reads the
    weights one tensor at a time; each is a collective). Unsharded: nothing to do."""
    if sharded:
        from rlkit.weights import full_weights

        for _ in full_weights(model):
            pass
