"""The critic's maths: the clipped value loss and explained variance.

``value_loss`` is PPO2/InstructGPT's clipped value loss ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c)
- R)^2)``, aggregated like the policy loss (``aggregation``, its ``constant`` and the ``global_count`` of
``rlkit.algos.aggregation``). ``explained_variance`` is ``1 - Var[R - V] / Var[R]`` over valid tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkit.algos.aggregation import aggregate
from rlkit.algos.utils import check_bt, masked_mean, masked_var


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over valid tokens (1 = perfect critic, 0 = no better than a constant).

    Args:
        values: Tensor[B, T] predicted values.
        returns: Tensor[B, T] targets.
        mask: Tensor[B, T] 0/1.
    Returns:
        Tensor[] (detached); ``nan`` when the returns have zero variance (the ratio is undefined).
    """
    with torch.no_grad():
        var_r = masked_var(returns, mask, unbiased=False)
        var_d = masked_var(returns - values, mask, unbiased=False)
        return torch.where(var_r > 0, 1 - var_d / var_r.clamp_min(1e-30), torch.full_like(var_r, float("nan")))


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = None,
    aggregation: str = "token_mean",
    constant: float | None = None,
    global_count: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2 / InstructGPT): ``0.5 * max((V - R)^2, (clip(V, V_old ± c) - R)^2)``.

    Args:
        values: Tensor[B, T] current critic values (with grad).
        old_values: Tensor[B, T] critic values at rollout time (no grad).
        returns: Tensor[B, T] targets (e.g. from ``gae``).
        mask: Tensor[B, T] 0/1.
        clip: the value clip range c (``GAEAdvantage.value_clip``), or None for the plain ``0.5 * (V - R)^2``.
        aggregation: a name in ``AGGREGATIONS``.
        constant: the ``constant`` of ``seq_mean_token_sum_norm``.
        global_count: the mini-batch's ``loss_count(aggregation, mask)`` over all processes; None = local.
    Returns:
        (loss Tensor[], metrics: vf_clip_frac (share of valid tokens where the clipped term is the
        larger, i.e. the gradient is zero), explained_variance, value_mean; detached Tensor[]).
    """
    check_bt(mask, values=values, old_values=old_values, returns=returns)
    returns = returns.detach()
    unclipped = (values - returns) ** 2
    if clip is None:
        per_token = unclipped
        active = torch.zeros_like(mask, dtype=torch.bool)
    else:
        old = old_values.detach()
        v_clipped = torch.maximum(torch.minimum(values, old + clip), old - clip)
        clipped = (v_clipped - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        active = clipped > unclipped
    loss = 0.5 * aggregate(per_token, mask, aggregation, constant, global_count)
    with torch.no_grad():
        metrics = {
            "vf_clip_frac": masked_mean(active.float(), mask),
            "explained_variance": explained_variance(values.detach(), returns, mask),
            "value_mean": masked_mean(values.detach(), mask),
        }
    return loss, metrics
