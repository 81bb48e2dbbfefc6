"""Policy losses that reshape the importance ratio, for stale or off-policy samples: gspo, cispo, sapo.

Same signature as ``ppo_clip`` (``rlkit.algos.policy_loss``): ``logp``, ``old_logp``, ``advantages``, ``mask``
Tensor[B, T], ``cfg`` the loss's schema, ``is_weights`` Tensor[B, T] or None (rollout correction, multiplied in),
``aggregation``/``constant``/``global_count`` as ``aggregate``. They return the same metric keys as ``ppo_clip``
(``clip_frac`` and its halves: where the loss's clip or cap is active; ``dual_clip_frac`` 0), with ``r`` the
token ratio ``exp(logp - old_logp)`` (log-ratio clamped to ±20 as everywhere).

- ``gspo`` (Zheng et al. 2025, "Group Sequence Policy Optimization"): the sequence ratio
  ``s_i = exp(mean_t log r_{i,t})`` over the sequence's valid tokens, clipped as PPO clips a token ratio,
  ``max(-A s, -A clip(s, 1 - epsilon, 1 + epsilon_high))``, with the paper's small ranges (3e-4, 4e-4). Written
  in the paper's GSPO-token form, ``s_{i,t} = sg[s_i] · pi(y_t) / sg[pi(y_t)]``: the value of every token of a
  sequence is ``s_i`` and its gradient is GSPO's when the advantage is per sequence (GRPO's), while per-token
  advantages (GAE) still work. The paper averages per sequence then over sequences (``seq_mean_token_mean``);
  rlkit uses the run's ``rl.loss_aggregation`` (its default token_mean weighs long sequences more).
  ``clip_frac`` is the share of tokens whose sequence is clipped; ``ratio_mean``/``ratio_max`` are of ``s``.
- ``cispo`` (MiniMax 2025, "MiniMax-M1"; the cap as in ScaleRL, Khatri et al. 2025): the REINFORCE gradient of
  every token weighted by its clipped, detached ratio, ``-sg[min(r, epsilon_max)] · A · logp``: no token is
  dropped from the gradient, as PPO's clip drops them; ``epsilon_max`` 5 as TRL recommends. ``clip_frac_high``
  is the share of tokens with ``r > epsilon_max`` (TRL's ``cispo_clip_ratio`` counts only A > 0 among them).
- ``sapo`` (Gao et al. 2025, "Soft Adaptive Policy Optimization"): a smooth gate instead of the hard clip,
  ``-A · (4 / tau) · sigmoid(tau (r - 1))``, with ``tau = temperature_pos`` where A > 0 and ``temperature_neg``
  elsewhere (1.0 and 1.05, the paper's and TRL's defaults). At ``r = 1`` its gradient is the policy gradient;
  it fades smoothly as the ratio leaves 1, faster for negative advantages. The clip fractions are 0.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from rlkit.algos.aggregation import aggregate
from rlkit.algos.policy_loss import (
    LOG_RATIO_CLAMP,
    POLICY_LOSS_SCHEMAS,
    POLICY_LOSSES,
    PPOClipLoss,
    ReinforceLoss,
    _check_cfg,
    _ratio_metrics,
)
from rlkit.algos.utils import check_bt, masked_mean
from rlkit.sections import Section

_NAMES = "Policy loss: ppo_clip, reinforce, gspo, cispo or sapo."


def _log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    return (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _finish(per_token: Tensor, mask: Tensor, is_weights, aggregation, constant, global_count) -> Tensor:
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    return aggregate(per_token, mask, aggregation, constant, global_count)


# ------------------------------------------------------------------------------------------------ gspo


@POLICY_LOSS_SCHEMAS.register("gspo")
class GSPOLoss(Section):
    """GSPO: the clipped sequence-level importance ratio."""

    name: Literal["gspo"] = Field("gspo", description=_NAMES)
    epsilon: float = Field(3e-4, gt=0, lt=1, description="Lower clip range of the sequence ratio (GSPO: 3e-4).")
    epsilon_high: float = Field(4e-4, gt=0, description="Upper clip range of the sequence ratio (GSPO: 4e-4).")
    single_update_only: ClassVar[bool] = False

    @model_validator(mode="after")
    def _order(self) -> GSPOLoss:
        if self.epsilon_high < self.epsilon:
            raise ValueError("epsilon_high: must be >= epsilon")
        return self


@POLICY_LOSSES.register("gspo")
def gspo(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, cfg: GSPOLoss = GSPOLoss(),
         is_weights: Tensor | None = None, aggregation: str = "token_mean", constant: float | None = None,
         global_count: Tensor | float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token: per token ``max(-A s_t, -A clip(s_t, 1 - eps, 1 + eps_high))`` with
    ``s_t = exp(logp_t - sg[logp_t] + sg[mean log r over the sequence])``.

    Args: as ``ppo_clip`` (``cfg``: ``GSPOLoss``). Returns: (loss Tensor[], metrics as ppo_clip's).
    """
    check_bt(mask, logp=logp, old_logp=old_logp, advantages=advantages, is_weights=is_weights)
    _check_cfg(cfg, "gspo")
    adv = advantages.detach()
    m = mask.to(logp.dtype)
    log_r = _log_ratio(logp, old_logp)
    seq_log = (log_r * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [B]
    log_s = logp - logp.detach() + seq_log.detach().unsqueeze(-1)  # value: the sequence's; gradient: the token's
    s = torch.exp(log_s)
    lo, hi = 1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high
    per_token = torch.maximum(-adv * s, -adv * s.clamp(lo, hi))
    loss = _finish(per_token, mask, is_weights, aggregation, constant, global_count)
    with torch.no_grad():
        sv = s.detach()
        low = masked_mean(((adv < 0) & (sv < lo)).float(), mask)
        high = masked_mean(((adv > 0) & (sv > hi)).float(), mask)
        metrics = {"clip_frac": low + high, "clip_frac_low": low, "clip_frac_high": high,
                   "dual_clip_frac": torch.zeros_like(low), **_ratio_metrics(log_s.detach(), sv, mask)}
    return loss, metrics


# ----------------------------------------------------------------------------------------------- cispo


@POLICY_LOSS_SCHEMAS.register("cispo")
class CISPOLoss(Section):
    """CISPO: the policy gradient weighted by the clipped (detached) importance ratio."""

    name: Literal["cispo"] = Field("cispo", description=_NAMES)
    epsilon_max: float = Field(5.0, gt=1, description="Cap on the importance ratio that weights each token "
                               "(ScaleRL's epsilon_max; TRL's epsilon_high for cispo).")
    single_update_only: ClassVar[bool] = False


@POLICY_LOSSES.register("cispo")
def cispo(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, cfg: CISPOLoss = CISPOLoss(),
          is_weights: Tensor | None = None, aggregation: str = "token_mean", constant: float | None = None,
          global_count: Tensor | float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per token ``-sg[min(r, epsilon_max)] * A * logp``.

    Args: as ``ppo_clip`` (``cfg``: ``CISPOLoss``). Returns: (loss Tensor[], metrics as ppo_clip's).
    """
    check_bt(mask, logp=logp, old_logp=old_logp, advantages=advantages, is_weights=is_weights)
    _check_cfg(cfg, "cispo")
    log_r = _log_ratio(logp, old_logp)
    r = torch.exp(log_r).detach()
    per_token = -r.clamp(max=cfg.epsilon_max) * advantages.detach() * logp
    loss = _finish(per_token, mask, is_weights, aggregation, constant, global_count)
    with torch.no_grad():
        high = masked_mean((r > cfg.epsilon_max).float(), mask)
        zero = torch.zeros_like(high)
        metrics = {"clip_frac": high, "clip_frac_low": zero, "clip_frac_high": high, "dual_clip_frac": zero,
                   **_ratio_metrics(log_r.detach(), r, mask)}
    return loss, metrics


# ------------------------------------------------------------------------------------------------ sapo


@POLICY_LOSS_SCHEMAS.register("sapo")
class SAPOLoss(Section):
    """SAPO: a temperature-controlled sigmoid gate on the ratio instead of a hard clip."""

    name: Literal["sapo"] = Field("sapo", description=_NAMES)
    temperature_pos: float = Field(1.0, gt=0, description="Gate temperature where the advantage is positive.")
    temperature_neg: float = Field(1.05, gt=0, description="Gate temperature where it is not (SAPO: a bit larger).")
    single_update_only: ClassVar[bool] = False


@POLICY_LOSSES.register("sapo")
def sapo(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, cfg: SAPOLoss = SAPOLoss(),
         is_weights: Tensor | None = None, aggregation: str = "token_mean", constant: float | None = None,
         global_count: Tensor | float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per token ``-A * (4 / tau) * sigmoid(tau * (r - 1))``, ``tau`` by the sign of A.

    Args: as ``ppo_clip`` (``cfg``: ``SAPOLoss``). Returns: (loss Tensor[], metrics as ppo_clip's; clip
    fractions 0).
    """
    check_bt(mask, logp=logp, old_logp=old_logp, advantages=advantages, is_weights=is_weights)
    _check_cfg(cfg, "sapo")
    adv = advantages.detach()
    log_r = _log_ratio(logp, old_logp)
    r = torch.exp(log_r)
    tau = torch.where(adv > 0, torch.full_like(adv, cfg.temperature_pos), torch.full_like(adv, cfg.temperature_neg))
    per_token = -adv * torch.sigmoid(tau * (r - 1)) * 4 / tau
    loss = _finish(per_token, mask, is_weights, aggregation, constant, global_count)
    with torch.no_grad():
        zero = logp.new_zeros(())
        metrics = {"clip_frac": zero, "clip_frac_low": zero, "clip_frac_high": zero, "dual_clip_frac": zero,
                   **_ratio_metrics(log_r.detach(), r.detach(), mask)}
    return loss, metrics


# One ``policy_loss:`` section: ``{name: ppo_clip, epsilon: 0.2}``; the schema of a name: POLICY_LOSS_SCHEMAS[name]
PolicyLoss = Annotated[PPOClipLoss | ReinforceLoss | GSPOLoss | CISPOLoss | SAPOLoss, Field(discriminator="name")]
