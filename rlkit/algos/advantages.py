"""Advantage estimators: ``ADVANTAGES[name](rewards=..., mask=..., group_ids=..., ...)``.

Every estimator has the same keyword-only signature, so the RL loop dispatches in one line::

    advantages, returns = ADVANTAGES[cfg.estimator](
        rewards=rewards, mask=mask, group_ids=group_ids, values=values, token_rewards=token_rewards, cfg=acfg
    )

Shapes: ``rewards`` Tensor[B] (scalar sequence-level reward per sample), ``mask`` Tensor[B, T] (1 on
generated tokens, 0 on padding), ``group_ids`` Tensor[B] long (samples of the same prompt share an id;
ids need not be contiguous or sorted), ``values`` Tensor[B, T] critic values (gae only),
``token_rewards`` Tensor[B, T] optional per-token reward, e.g. ``-beta * kl`` per token when the KL
penalty goes into the reward, InstructGPT-style. Both outputs are Tensor[B, T] with zeros on padding.
An argument an estimator does not use (``values`` for grpo, ``group_ids`` for gae) is ignored, so the
loop may always pass everything it has.

Estimators (``AdvantageConfig`` holds their knobs):

- ``grpo`` (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_g) / (std_g + eps)``, broadcast to every
  valid token. ``std_normalize`` picks the std: ``group`` (the paper), ``batch`` (std of all rewards in
  the batch, mean still per group: TRL's ``scale_rewards="batch"``), ``none`` (= dr_grpo). The std is
  the *unbiased* one (Bessel's ``n - 1``), as ``torch.std`` in TRL's ``GRPOTrainer`` and verl's
  ``compute_grpo_outcome_advantage``; the paper does not say, and matching the reference
  implementations keeps numbers comparable (for a group of 2 with rewards {1, 0} that is ±0.7071, not
  ±1). ``eps`` goes outside the square root. Departures: a group of one sample gets advantage 0 (its
  std is undefined; verl instead uses mean 0 / std 1, i.e. the raw reward); the paper's "process
  supervision" variant is not implemented.
- ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``A_i = r_i - mean_g``, no std
  division (which they show biases updates toward too-easy/too-hard questions). The other half of
  Dr. GRPO, the length-independent loss normaliser, is ``aggregation="seq_mean_token_sum_norm"`` in
  ``policy_loss``.
- ``rloo`` (Ahmadian et al. 2024, "Back to Basics"): leave-one-out baseline,
  ``A_i = r_i - mean_{j != i} r_j = k/(k-1) * (r_i - mean_g)``; groups of one sample get 0.
- ``reinforce_pp`` (Hu 2025, REINFORCE++): per-token reward ``token_rewards`` plus the sequence reward at
  the last valid token, discounted return-to-go with ``gamma``, then whitened over every valid token in
  the batch (global, not per group). This is the plain REINFORCE++ of OpenRLHF's
  ``advantage_estimator="reinforce"``; the "reinforce_baseline" variant (group mean subtracted first)
  is deliberately not offered. ``returns`` is the un-whitened return-to-go.
- ``gae`` (Schulman et al. 2016; as used by PPO, Schulman et al. 2017, and InstructGPT, Ouyang et al.
  2022): ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}`` with
  ``r_t = token_rewards_t`` plus the sequence reward at the last valid token, and ``V`` after the last
  valid token = 0 (the episode ends there). Padding tokens are skipped (their values and rewards are
  ignored, also for holes in the middle of a row). ``returns = A + V`` (before whitening), the critic's
  target; ``whiten=True`` (default, as in InstructGPT/TRL/verl) whitens the advantages over all valid
  tokens of the batch, never the returns.

For grpo, dr_grpo and rloo a given ``token_rewards`` is first summed over valid tokens and added to the
sequence reward; their ``returns`` is that total reward broadcast over valid tokens (the undiscounted
return of an outcome-only reward). A sample whose mask is all zeros still takes part in its group's
statistics (its reward is a sequence-level fact) but gets zero advantages.

All estimators run under ``torch.no_grad()``: advantages and returns are targets, never differentiated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from rlkit.algos.utils import Registry, last_token_onehot, masked_sum, masked_whiten

StdNormalize = Literal["group", "batch", "none"]


@dataclass(frozen=True)
class AdvantageConfig:
    """Knobs of the advantage estimators (each says which estimators read it).

    Attributes:
        gamma: discount per token (gae, reinforce_pp). 1.0 = undiscounted, the usual choice for LLMs.
        lam: GAE lambda (gae). 1.0 = Monte Carlo return minus value; 0.0 = one-step TD.
        std_normalize: which std divides grpo's centred rewards: "group", "batch" or "none".
        eps: added to a std before dividing (grpo; whitening in gae and reinforce_pp).
        whiten: whiten gae advantages over the valid tokens of the batch (masked mean/var).
    """

    gamma: float = 1.0
    lam: float = 1.0
    std_normalize: StdNormalize = "group"
    eps: float = 1e-6
    whiten: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.std_normalize not in ("group", "batch", "none"):
            raise ValueError(f"unknown std_normalize {self.std_normalize!r}; known: batch, group, none")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


class AdvantageFn(Protocol):
    def __call__(
        self,
        *,
        rewards: Tensor,
        mask: Tensor,
        group_ids: Tensor | None = None,
        values: Tensor | None = None,
        token_rewards: Tensor | None = None,
        cfg: AdvantageConfig = ...,
    ) -> tuple[Tensor, Tensor]: ...


ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
_DEFAULT = AdvantageConfig()
# Estimators that read a critic's ``values``: a run with one of these builds and trains a value model.
NEEDS_VALUES = frozenset({"gae"})


# ------------------------------------------------------------------------------------------ helpers


def _check(rewards: Tensor, mask: Tensor, group_ids: Tensor | None, need_groups: bool, **bt: Tensor | None) -> None:
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


def _float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.float()


def _broadcast(per_seq: Tensor, mask: Tensor) -> Tensor:
    """Tensor[B] -> Tensor[B, T]: the value on every valid token, 0 on padding."""
    return per_seq.unsqueeze(-1) * (mask != 0).to(per_seq.dtype)


def _sequence_rewards(rewards: Tensor, mask: Tensor, token_rewards: Tensor | None) -> Tensor:
    """Tensor[B]: the sequence reward plus the masked sum of per-token rewards (if any)."""
    r = _float(rewards)
    if token_rewards is not None:
        r = r + masked_sum(token_rewards.to(r.dtype), mask, dim=-1)
    return r


def _token_level_rewards(rewards: Tensor, mask: Tensor, token_rewards: Tensor | None) -> Tensor:
    """Tensor[B, T]: per-token rewards (0 on padding) with the sequence reward added at the last valid token."""
    r = _float(rewards)
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


# ---------------------------------------------------------------------------------------- estimators


@ADVANTAGES.register("grpo")
@torch.no_grad()
def grpo(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
    cfg: AdvantageConfig = _DEFAULT,
) -> tuple[Tensor, Tensor]:
    """GRPO outcome advantage: group-centred reward over ``std + eps`` (unbiased std), on every valid token.

    Args:
        rewards: Tensor[B] sequence rewards.
        mask: Tensor[B, T] 0/1 valid-token mask.
        group_ids: Tensor[B] long, required.
        values: ignored.
        token_rewards: Tensor[B, T] or None; its masked sum is added to ``rewards`` first.
        cfg: reads ``std_normalize`` ("group" | "batch" | "none") and ``eps``.
    Returns:
        (advantages Tensor[B, T], returns Tensor[B, T] = total reward broadcast), zeros on padding.
    """
    _check(rewards, mask, group_ids, True, token_rewards=token_rewards)
    r = _sequence_rewards(rewards, mask, token_rewards)
    mean, std, _ = group_stats(r, group_ids)
    if cfg.std_normalize == "none":
        adv = r - mean
    else:
        if cfg.std_normalize == "batch":
            std = (r.std(correction=1) if r.numel() > 1 else r.new_zeros(())).expand_as(r)
        denom = std + cfg.eps
        adv = torch.where(denom > 0, (r - mean) / denom.clamp_min(1e-30), torch.zeros_like(r))  # 0/0 -> 0 when eps=0
    return _broadcast(adv, mask), _broadcast(r, mask)


@ADVANTAGES.register("dr_grpo")
@torch.no_grad()
def dr_grpo(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
    cfg: AdvantageConfig = _DEFAULT,
) -> tuple[Tensor, Tensor]:
    """Dr. GRPO outcome advantage ``r_i - mean_group`` (no std division), on every valid token.

    Args:
        rewards: Tensor[B] sequence rewards.
        mask: Tensor[B, T] 0/1 valid-token mask.
        group_ids: Tensor[B] long, required.
        values: ignored.
        token_rewards: Tensor[B, T] or None; its masked sum is added to ``rewards`` first.
        cfg: not read (present for the uniform signature).
    Returns:
        (advantages Tensor[B, T], returns Tensor[B, T] = total reward broadcast), zeros on padding.
    """
    _check(rewards, mask, group_ids, True, token_rewards=token_rewards)
    r = _sequence_rewards(rewards, mask, token_rewards)
    mean, _, _ = group_stats(r, group_ids)
    return _broadcast(r - mean, mask), _broadcast(r, mask)


@ADVANTAGES.register("rloo")
@torch.no_grad()
def rloo(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
    cfg: AdvantageConfig = _DEFAULT,
) -> tuple[Tensor, Tensor]:
    """RLOO advantage: reward minus the mean reward of the *other* samples of the group.

    ``A_i = r_i - (sum_g - r_i) / (k - 1) = k / (k - 1) * (r_i - mean_g)``; a group of one gets 0.

    Args:
        rewards: Tensor[B] sequence rewards.
        mask: Tensor[B, T] 0/1 valid-token mask.
        group_ids: Tensor[B] long, required.
        values: ignored.
        token_rewards: Tensor[B, T] or None; its masked sum is added to ``rewards`` first.
        cfg: not read (present for the uniform signature).
    Returns:
        (advantages Tensor[B, T], returns Tensor[B, T] = total reward broadcast), zeros on padding.
    """
    _check(rewards, mask, group_ids, True, token_rewards=token_rewards)
    r = _sequence_rewards(rewards, mask, token_rewards)
    mean, _, n = group_stats(r, group_ids)
    adv = torch.where(n > 1, n / (n - 1).clamp_min(1) * (r - mean), torch.zeros_like(r))
    return _broadcast(adv, mask), _broadcast(r, mask)


def _discounted_returns(token_r: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Return-to-go over valid tokens only (padding skipped, 0 on padding). Tensor[B, T] -> Tensor[B, T]."""
    valid = mask != 0
    out = torch.zeros_like(token_r)
    running = token_r.new_zeros(token_r.shape[0])
    for t in reversed(range(token_r.shape[-1])):
        g = token_r[:, t] + gamma * running
        running = torch.where(valid[:, t], g, running)
        out[:, t] = torch.where(valid[:, t], g, torch.zeros_like(g))
    return out


@ADVANTAGES.register("reinforce_pp")
@torch.no_grad()
def reinforce_pp(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
    cfg: AdvantageConfig = _DEFAULT,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: discounted per-token return-to-go, whitened over every valid token of the batch.

    Args:
        rewards: Tensor[B] sequence rewards, placed at each row's last valid token.
        mask: Tensor[B, T] 0/1 valid-token mask.
        group_ids: ignored (the baseline is the batch mean, not a group mean).
        values: ignored.
        token_rewards: Tensor[B, T] or None, e.g. ``-beta * kl`` per token.
        cfg: reads ``gamma`` and ``eps``.
    Returns:
        (advantages Tensor[B, T] whitened, returns Tensor[B, T] raw return-to-go), zeros on padding.
    """
    _check(rewards, mask, group_ids, False, token_rewards=token_rewards)
    returns = _discounted_returns(_token_level_rewards(rewards, mask, token_rewards), mask, cfg.gamma)
    return masked_whiten(returns, mask, eps=cfg.eps), returns


@ADVANTAGES.register("gae")
@torch.no_grad()
def gae(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
    cfg: AdvantageConfig = _DEFAULT,
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation over valid tokens, with the value after the last valid token = 0.

    Args:
        rewards: Tensor[B] sequence rewards, added at each row's last valid token.
        mask: Tensor[B, T] 0/1 valid-token mask (ragged rows and holes are fine).
        group_ids: ignored.
        values: Tensor[B, T] critic values V(s_t), required; entries on padding are ignored.
        token_rewards: Tensor[B, T] or None, e.g. ``-beta * kl`` per token (InstructGPT).
        cfg: reads ``gamma``, ``lam``, ``whiten`` and ``eps``.
    Returns:
        (advantages Tensor[B, T] (whitened if ``cfg.whiten``), returns Tensor[B, T] = raw advantages +
        values), zeros on padding.
    """
    if values is None:
        raise ValueError("advantage estimator 'gae' needs values (Tensor[B, T] from the critic)")
    _check(rewards, mask, group_ids, False, token_rewards=token_rewards, values=values)
    r = _token_level_rewards(rewards, mask, token_rewards)
    valid = mask != 0
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    v = torch.where(valid, values.to(r.dtype), zero)
    adv = torch.zeros_like(r)
    next_v = r.new_zeros(r.shape[0])
    next_a = r.new_zeros(r.shape[0])
    for t in reversed(range(r.shape[-1])):
        delta = r[:, t] + cfg.gamma * next_v - v[:, t]
        a = torch.where(valid[:, t], delta + cfg.gamma * cfg.lam * next_a, zero)
        adv[:, t] = a
        next_v = torch.where(valid[:, t], v[:, t], next_v)
        next_a = torch.where(valid[:, t], a, next_a)
    returns = adv + v  # v and adv are already 0 on padding
    if cfg.whiten:
        adv = masked_whiten(adv, mask, eps=cfg.eps)
    return adv, returns


def get_advantage(name: str) -> AdvantageFn:
    """The estimator registered as ``name``; ``ValueError`` listing the known names otherwise."""
    return ADVANTAGES[name]


def compute_advantages(name: str, **kwargs: Tensor | AdvantageConfig | None) -> tuple[Tensor, Tensor]:
    """``ADVANTAGES[name](**kwargs)``: see the module docstring for the keyword arguments and shapes."""
    return ADVANTAGES[name](**kwargs)
