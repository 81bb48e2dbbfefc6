"""Advantage estimators (``ADVANTAGES``) and their configs (``ADVANTAGE_SCHEMAS``, the ``Advantage`` union).

Every estimator has the same keyword-only signature, so the RL loop dispatches in one line::

    advantages, returns = ADVANTAGES[cfg.name](
        rewards=rewards, mask=mask, group_ids=group_ids, values=values, token_rewards=token_rewards, cfg=cfg
    )

``cfg`` is the estimator's schema (``GRPOAdvantage``, ..., ``GAEAdvantage``: exactly the knobs it reads, and
for gae its critic's), picked from a config by its ``name``; an estimator called without one uses its
schema's defaults, and one given another estimator's schema raises ``ValueError``. Class flags:
``needs_values`` (gae: a critic is built exactly then) and ``compares_group`` (grpo, dr_grpo, rloo: the
baseline is the other samples of the prompt, so they need at least 2 samples per prompt). ``eps`` (added to
a std) is ``EPS`` = 1e-6, not a knob.

Shapes: ``rewards`` Tensor[B] (scalar sequence-level reward per sample), ``mask`` Tensor[B, T] (1 on
generated tokens, 0 on padding), ``group_ids`` Tensor[B] long (samples of the same prompt share an id;
ids need not be contiguous or sorted), ``values`` Tensor[B, T] critic values (gae only),
``token_rewards`` Tensor[B, T] optional per-token reward, e.g. ``-beta * kl`` per token when the KL
penalty goes into the reward, InstructGPT-style. Both outputs are Tensor[B, T] with zeros on padding.
An argument an estimator does not use (``values`` for grpo, ``group_ids`` for gae) is ignored, so the
loop may always pass everything it has.

Estimators:

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
  Dr. GRPO, the length-independent loss normaliser, is the aggregation ``seq_mean_token_sum_norm``
  (``rlkit.algos.aggregation``).
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

from typing import Annotated, ClassVar, Literal, Protocol

import torch
from pydantic import Field
from torch import Tensor

from rlkit.algos.returns import (
    broadcast,
    check_inputs,
    discounted_returns,
    group_stats,
    sequence_rewards,
    token_level_rewards,
)
from rlkit.algos.utils import Registry, masked_whiten
from rlkit.sections import Section

StdNormalize = Literal["group", "batch", "none"]
EPS = 1e-6  # added to a std before dividing (grpo; the whitening of gae and reinforce_pp)


class AdvantageFn(Protocol):
    def __call__(
        self,
        *,
        rewards: Tensor,
        mask: Tensor,
        group_ids: Tensor | None = None,
        values: Tensor | None = None,
        token_rewards: Tensor | None = None,
        cfg: Section = ...,
    ) -> tuple[Tensor, Tensor]: ...


ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
ADVANTAGE_SCHEMAS: Registry[type[Section]] = Registry("advantage estimator")


class _AdvantageSection(Section):
    needs_values: ClassVar[bool] = False  # reads a critic's values: the run builds and trains a value model
    compares_group: ClassVar[bool] = False  # its baseline is the prompt's other samples: needs >= 2 per prompt


# ------------------------------------------------------------------------------------------ helpers


def _check_cfg(cfg: Section, name: str) -> None:
    """Raise unless ``cfg`` is the schema of estimator ``name``."""
    if getattr(cfg, "name", None) != name:
        raise ValueError(f"advantage estimator {name!r} got the config of {getattr(cfg, 'name', type(cfg).__name__)!r}")


# ---------------------------------------------------------------------------------------- estimators


@ADVANTAGE_SCHEMAS.register("grpo")
class GRPOAdvantage(_AdvantageSection):
    """GRPO: the group-centred reward over the group's (or the batch's) std."""

    name: Literal["grpo"] = Field("grpo", description="Advantage estimator: grpo, dr_grpo, rloo, reinforce_pp, gae.")
    std_normalize: StdNormalize = Field(
        "group", description="Divide by the reward std of the group, of the batch, or not at all.")
    compares_group: ClassVar[bool] = True


_GRPO_ADVANTAGE = GRPOAdvantage()  # the default cfg


@ADVANTAGES.register("grpo")
@torch.no_grad()
def grpo(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
    cfg: GRPOAdvantage = _GRPO_ADVANTAGE,
) -> tuple[Tensor, Tensor]:
    """GRPO outcome advantage: group-centred reward over ``std + eps`` (unbiased std), on every valid token.

    Args:
        rewards: Tensor[B] sequence rewards.
        mask: Tensor[B, T] 0/1 valid-token mask.
        group_ids: Tensor[B] long, required.
        values: ignored.
        token_rewards: Tensor[B, T] or None; its masked sum is added to ``rewards`` first.
        cfg: ``GRPOAdvantage`` (reads ``std_normalize``: "group" | "batch" | "none").
    Returns:
        (advantages Tensor[B, T], returns Tensor[B, T] = total reward broadcast), zeros on padding.
    """
    _check_cfg(cfg, "grpo")
    check_inputs(rewards, mask, group_ids, True, token_rewards=token_rewards)
    r = sequence_rewards(rewards, mask, token_rewards)
    mean, std, _ = group_stats(r, group_ids)
    if cfg.std_normalize == "none":
        adv = r - mean
    else:
        if cfg.std_normalize == "batch":
            std = (r.std(correction=1) if r.numel() > 1 else r.new_zeros(())).expand_as(r)
        denom = std + EPS
        adv = torch.where(denom > 0, (r - mean) / denom.clamp_min(1e-30), torch.zeros_like(r))  # a nan std -> 0
    return broadcast(adv, mask), broadcast(r, mask)


@ADVANTAGE_SCHEMAS.register("dr_grpo")
class DrGRPOAdvantage(_AdvantageSection):
    """Dr. GRPO: the group-centred reward, no std division; no knobs."""

    name: Literal["dr_grpo"] = Field("dr_grpo", description="Advantage estimator: grpo, dr_grpo, rloo, reinforce_pp, gae.")
    compares_group: ClassVar[bool] = True


_DRGRPO_ADVANTAGE = DrGRPOAdvantage()  # the default cfg


@ADVANTAGES.register("dr_grpo")
@torch.no_grad()
def dr_grpo(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
    cfg: DrGRPOAdvantage = _DRGRPO_ADVANTAGE,
) -> tuple[Tensor, Tensor]:
    """Dr. GRPO outcome advantage ``r_i - mean_group`` (no std division), on every valid token.

    Args:
        rewards: Tensor[B] sequence rewards.
        mask: Tensor[B, T] 0/1 valid-token mask.
        group_ids: Tensor[B] long, required.
        values: ignored.
        token_rewards: Tensor[B, T] or None; its masked sum is added to ``rewards`` first.
        cfg: ``DrGRPOAdvantage``; not read (present for the uniform signature).
    Returns:
        (advantages Tensor[B, T], returns Tensor[B, T] = total reward broadcast), zeros on padding.
    """
    _check_cfg(cfg, "dr_grpo")
    check_inputs(rewards, mask, group_ids, True, token_rewards=token_rewards)
    r = sequence_rewards(rewards, mask, token_rewards)
    mean, _, _ = group_stats(r, group_ids)
    return broadcast(r - mean, mask), broadcast(r, mask)


@ADVANTAGE_SCHEMAS.register("rloo")
class RLOOAdvantage(_AdvantageSection):
    """RLOO: the reward minus the mean reward of the prompt's other samples; no knobs."""

    name: Literal["rloo"] = Field("rloo", description="Advantage estimator: grpo, dr_grpo, rloo, reinforce_pp, gae.")
    compares_group: ClassVar[bool] = True


_RLOO_ADVANTAGE = RLOOAdvantage()  # the default cfg


@ADVANTAGES.register("rloo")
@torch.no_grad()
def rloo(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
    cfg: RLOOAdvantage = _RLOO_ADVANTAGE,
) -> tuple[Tensor, Tensor]:
    """RLOO advantage: reward minus the mean reward of the *other* samples of the group.

    ``A_i = r_i - (sum_g - r_i) / (k - 1) = k / (k - 1) * (r_i - mean_g)``; a group of one gets 0.

    Args:
        rewards: Tensor[B] sequence rewards.
        mask: Tensor[B, T] 0/1 valid-token mask.
        group_ids: Tensor[B] long, required.
        values: ignored.
        token_rewards: Tensor[B, T] or None; its masked sum is added to ``rewards`` first.
        cfg: ``RLOOAdvantage``; not read (present for the uniform signature).
    Returns:
        (advantages Tensor[B, T], returns Tensor[B, T] = total reward broadcast), zeros on padding.
    """
    _check_cfg(cfg, "rloo")
    check_inputs(rewards, mask, group_ids, True, token_rewards=token_rewards)
    r = sequence_rewards(rewards, mask, token_rewards)
    mean, _, n = group_stats(r, group_ids)
    adv = torch.where(n > 1, n / (n - 1).clamp_min(1) * (r - mean), torch.zeros_like(r))
    return broadcast(adv, mask), broadcast(r, mask)


@ADVANTAGE_SCHEMAS.register("reinforce_pp")
class ReinforcePPAdvantage(_AdvantageSection):
    """REINFORCE++: the discounted return-to-go, whitened over the batch."""

    name: Literal["reinforce_pp"] = Field(
        "reinforce_pp", description="Advantage estimator: grpo, dr_grpo, rloo, reinforce_pp, gae.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount per token (1.0: undiscounted).")


_REINFORCEPP_ADVANTAGE = ReinforcePPAdvantage()  # the default cfg


@ADVANTAGES.register("reinforce_pp")
@torch.no_grad()
def reinforce_pp(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
    cfg: ReinforcePPAdvantage = _REINFORCEPP_ADVANTAGE,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: discounted per-token return-to-go, whitened over every valid token of the batch.

    Args:
        rewards: Tensor[B] sequence rewards, placed at each row's last valid token.
        mask: Tensor[B, T] 0/1 valid-token mask.
        group_ids: ignored (the baseline is the batch mean, not a group mean).
        values: ignored.
        token_rewards: Tensor[B, T] or None, e.g. ``-beta * kl`` per token.
        cfg: ``ReinforcePPAdvantage`` (reads ``gamma``).
    Returns:
        (advantages Tensor[B, T] whitened, returns Tensor[B, T] raw return-to-go), zeros on padding.
    """
    _check_cfg(cfg, "reinforce_pp")
    check_inputs(rewards, mask, group_ids, False, token_rewards=token_rewards)
    returns = discounted_returns(token_level_rewards(rewards, mask, token_rewards), mask, cfg.gamma)
    return masked_whiten(returns, mask, eps=EPS), returns


@ADVANTAGE_SCHEMAS.register("gae")
class GAEAdvantage(_AdvantageSection):
    """GAE over a critic's values; the critic's own knobs (init, learning rate, value clip) sit here too."""

    name: Literal["gae"] = Field("gae", description="Advantage estimator: grpo, dr_grpo, rloo, reinforce_pp, gae.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount per token (1.0: undiscounted).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten: bool = Field(True, description="Whiten advantages over the batch.")
    value_model: str = Field(
        "policy", description="Critic init: 'policy' (a new value head on the policy) or a reward model directory (InstructGPT).")
    value_learning_rate: float | None = Field(None, gt=0, description="Critic learning rate; default: train.learning_rate.")
    value_clip: float | None = Field(0.2, gt=0, description="Clip range of the value loss around the old values.")
    needs_values: ClassVar[bool] = True


_GAE_ADVANTAGE = GAEAdvantage()  # the default cfg


@ADVANTAGES.register("gae")
@torch.no_grad()
def gae(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    token_rewards: Tensor | None = None,
    cfg: GAEAdvantage = _GAE_ADVANTAGE,
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation over valid tokens, with the value after the last valid token = 0.

    Args:
        rewards: Tensor[B] sequence rewards, added at each row's last valid token.
        mask: Tensor[B, T] 0/1 valid-token mask (ragged rows and holes are fine).
        group_ids: ignored.
        values: Tensor[B, T] critic values V(s_t), required; entries on padding are ignored.
        token_rewards: Tensor[B, T] or None, e.g. ``-beta * kl`` per token (InstructGPT).
        cfg: ``GAEAdvantage`` (reads ``gamma``, ``lam``, ``whiten``; its value_* knobs are the critic's).
    Returns:
        (advantages Tensor[B, T] (whitened if ``cfg.whiten``), returns Tensor[B, T] = raw advantages +
        values), zeros on padding.
    """
    _check_cfg(cfg, "gae")
    if values is None:
        raise ValueError("advantage estimator 'gae' needs values (Tensor[B, T] from the critic)")
    check_inputs(rewards, mask, group_ids, False, token_rewards=token_rewards, values=values)
    r = token_level_rewards(rewards, mask, token_rewards)
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
        adv = masked_whiten(adv, mask, eps=EPS)
    return adv, returns


# One ``advantage:`` section: ``{name: gae, lam: 0.95}``; the schema of a name: ADVANTAGE_SCHEMAS[name]
Advantage = Annotated[
    GRPOAdvantage | DrGRPOAdvantage | RLOOAdvantage | ReinforcePPAdvantage | GAEAdvantage, Field(discriminator="name")
]
# Estimators that read a critic's ``values``: a run with one of these builds and trains a value model.
NEEDS_VALUES = frozenset(name for name in ADVANTAGE_SCHEMAS if ADVANTAGE_SCHEMAS[name].needs_values)


def compute_advantages(name: str | Section, **kwargs: Tensor | Section | None) -> tuple[Tensor, Tensor]:
    """``ADVANTAGES[name](**kwargs)``; ``name`` may be the schema itself (then it is also ``cfg``); without a
    ``cfg`` the estimator uses its schema's defaults.

    See the module docstring for the keyword arguments and shapes.
    """
    if isinstance(name, Section):
        kwargs.setdefault("cfg", name)
        name = name.name
    return ADVANTAGES[name](**kwargs)
