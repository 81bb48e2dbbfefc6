"""The reward bookkeeping under the advantage estimators: shape checks, sequence and per-token rewards,
group statistics and returns-to-go. Shapes as in ``rlkit.algos.advantages``; pure tensor maths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkit.algos.utils import last_token_onehot, masked_sum


def check_inputs(rewards: Tensor, mask: Tensor, group_ids: Tensor | None, need_groups: bool, **bt: Tensor | None) -> None:
    """Raise unless rewards is Tensor[B], mask Tensor[B, T], group_ids (required if need_groups) Tensor[B]
    and every named tensor in ``bt`` Tensor[B, T]."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be Tensor[B], got shape {tuple(rewards.shape)}")
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"mask must be Tensor[B, T] with B={rewards.shape[0]}, got shape {tuple(mask.shape)}")
    if need_groups and group_ids is None:
        raise ValueError("this advantage estimator needs group_ids (Tensor[B], samples of one prompt share an id)")
    if group_ids is not None and tuple(group_ids.shape) != tuple(rewards.shape):
        raise ValueError(f"group_ids must be Tensor[B] like rewards, got shape {tuple(group_ids.shape)}")
    for name, t in bt.items():
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{name} must be Tensor[B, T] like mask {tuple(mask.shape)}, got {tuple(t.shape)}")


def as_float(x: Tensor) -> Tensor:
    """``x``, as float32 if it is not floating point (integer rewards)."""
    return x if x.is_floating_point() else x.float()


def broadcast(per_seq: Tensor, mask: Tensor) -> Tensor:
    """Tensor[B] -> Tensor[B, T]: the value on every valid token, 0 on padding."""
    return per_seq.unsqueeze(-1) * (mask != 0).to(per_seq.dtype)


def sequence_rewards(rewards: Tensor, mask: Tensor, token_rewards: Tensor | None) -> Tensor:
    """Tensor[B]: the sequence reward plus the masked sum of per-token rewards (if any)."""
    r = as_float(rewards)
    if token_rewards is not None:
        r = r + masked_sum(token_rewards.to(r.dtype), mask, dim=-1)
    return r


def token_level_rewards(rewards: Tensor, mask: Tensor, token_rewards: Tensor | None) -> Tensor:
    """Tensor[B, T]: per-token rewards (0 on padding) with the sequence reward added at the last valid token."""
    r = as_float(rewards)
    out = last_token_onehot(mask).to(r.dtype) * r.unsqueeze(-1)
    if token_rewards is not None:
        valid = mask != 0
        out = out + torch.where(valid, token_rewards.to(r.dtype), torch.zeros((), dtype=r.dtype, device=r.device))
    return out


def group_stats(x: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample statistics of the sample's group.

    Args:
        x: Tensor[B] float values (rewards).
        group_ids: Tensor[B] long; equal ids form a group (any order, any values).
    Returns:
        (mean Tensor[B], unbiased std Tensor[B] (0 for a group of one), count Tensor[B]), each entry
        giving the statistic of that sample's group.
    """
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    G = uniq.numel()
    zeros = x.new_zeros(G)
    n = zeros.index_add(0, inv, torch.ones_like(x))
    mean = zeros.index_add(0, inv, x) / n
    ss = zeros.index_add(0, inv, (x - mean[inv]) ** 2)
    var = torch.where(n > 1, ss / (n - 1).clamp_min(1), torch.zeros_like(ss))
    return mean[inv], var.sqrt()[inv], n[inv]


def discounted_returns(token_r: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Return-to-go over valid tokens only (padding skipped, 0 on padding). Tensor[B, T] -> Tensor[B, T]."""
    valid = mask != 0
    out = torch.zeros_like(token_r)
    running = token_r.new_zeros(token_r.shape[0])
    for t in reversed(range(token_r.shape[-1])):
        g = token_r[:, t] + gamma * running
        running = torch.where(valid[:, t], g, running)
        out[:, t] = torch.where(valid[:, t], g, torch.zeros_like(g))
    return out
