"""Policy losses (``POLICY_LOSSES``), loss aggregation (``AGGREGATIONS``), the value loss, and helpers.

Policy losses share one signature, so the update phase dispatches in one line::

    loss, metrics = POLICY_LOSSES[name](logp, old_logp, advantages, mask, cfg=pcfg, is_weights=w)

``logp`` Tensor[B, T] (log-probs of the sampled tokens under the policy being trained, with grad),
``old_logp`` Tensor[B, T] (the same under the policy that generated the batch, no grad),
``advantages`` Tensor[B, T], ``mask`` Tensor[B, T] 0/1, ``is_weights`` optional Tensor[B, T]
importance weights multiplied into the per-token loss (e.g. ``truncated_is_weights`` for the
trainer/sampler mismatch). The loss is a 0-dim tensor; metrics are detached 0-dim tensors (no
device sync until the logger calls ``.item()``), averaged over valid tokens.

- ``ppo_clip`` (Schulman et al. 2017): per token ``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``
  with ``r = exp(logp - old_logp)``. ``clip_high`` defaults to ``clip_low``; a larger ``clip_high`` is
  DAPO's clip-higher (Yu et al. 2025, e.g. 0.2 / 0.28). ``dual_clip = c > 1`` (Ye et al. 2020,
  "Mastering Complex Control in MOBA Games") additionally caps the loss of negative-advantage tokens
  at ``c * |A|`` (``min(that, -A c)``), so a token whose ratio exploded (r > c) under A < 0 stops
  pushing (zero gradient) instead of contributing an unbounded ``|A| r``. Departure from the paper: the
  log-ratio is clamped to ``[-log_ratio_clamp, log_ratio_clamp]`` (default 20) before the ``exp``,
  as verl does, so one wild token cannot make ``inf``.
- ``reinforce``: ``-A * logp`` per token, no ratio, no clipping: the on-policy policy gradient
  (its gradient equals ppo_clip's at ``old_logp == logp``). It ignores ``old_logp`` (except for
  metrics) and is only correct with one update per batch.

Metrics: ``clip_frac`` share of valid tokens where the PPO clip is active (= ``clip_frac_low`` +
``clip_frac_high``: A < 0 and r < 1 - clip_low, resp. A > 0 and r > 1 + clip_high, i.e. where the
clipped branch wins and the gradient is zero); ``dual_clip_frac`` share where the dual clip is active;
``approx_kl`` the k3 estimate of KL(old || new), ``mean(r - 1 - log r)`` (samples come from the old
policy); ``ratio_mean``, ``ratio_max``.

Aggregation turns a per-token loss matrix into a scalar; ``aggregate(loss_mat, mask, mode, constant)``:

- ``token_mean``: sum over all valid tokens / number of valid tokens in the batch (DAPO, Yu et al.
  2025: every token weighs the same, long answers are not down-weighted).
- ``seq_mean_token_mean``: per-sequence mean over its tokens, then mean over sequences (GRPO as in
  Shao et al. 2024; Liu et al. 2025 show it biases toward long wrong answers).
- ``seq_mean_token_sum``: per-sequence sum, then mean over sequences.
- ``seq_mean_token_sum_norm``: sum over all valid tokens / (B * constant), ``constant`` = the maximum
  generation length (Dr. GRPO, Liu et al. 2025): a normaliser that does not depend on the data.
  ``constant`` is required (verl falls back to the padded width T, which changes batch to batch).

Sequences whose mask is all zero (e.g. filtered overlong samples) count as absent in the
``seq_mean_*`` modes (not in the denominator), but do count in ``B`` for ``seq_mean_token_sum_norm``,
whose point is a fixed denominator. A batch with no valid token gives a loss of 0.

``value_loss`` is PPO2/InstructGPT's clipped value loss ``0.5 * max((V - R)^2, (clip(V, V_old - c,
V_old + c) - R)^2)``, aggregated like the policy loss. ``explained_variance`` is
``1 - Var[R - V] / Var[R]`` over valid tokens. ``entropy_from_logits`` is the per-position entropy
of the softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from rlkit.algos.utils import Registry, masked_mean, masked_sum, masked_var

# ---------------------------------------------------------------------------------------- aggregation


class AggregationFn(Protocol):
    def __call__(self, loss_mat: Tensor, mask: Tensor, *, constant: float | None = None) -> Tensor: ...


AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation")


@AGGREGATIONS.register("token_mean")
def token_mean(loss_mat: Tensor, mask: Tensor, *, constant: float | None = None) -> Tensor:
    """Sum over valid tokens / number of valid tokens (0 if none).

    Args:
        loss_mat: Tensor[B, T] per-token loss.
        mask: Tensor[B, T] 0/1.
        constant: ignored.
    Returns:
        Tensor[] scalar.
    """
    return masked_mean(loss_mat, mask)


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(loss_mat: Tensor, mask: Tensor, *, constant: float | None = None) -> Tensor:
    """Mean over each sequence's valid tokens, then mean over sequences with at least one valid token.

    Args:
        loss_mat: Tensor[B, T] per-token loss.
        mask: Tensor[B, T] 0/1.
        constant: ignored.
    Returns:
        Tensor[] scalar.
    """
    per_seq = masked_mean(loss_mat, mask, dim=-1)  # [B], 0 for empty rows
    return masked_mean(per_seq, (mask != 0).any(dim=-1))


@AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(loss_mat: Tensor, mask: Tensor, *, constant: float | None = None) -> Tensor:
    """Sum over each sequence's valid tokens, then mean over sequences with at least one valid token.

    Args:
        loss_mat: Tensor[B, T] per-token loss.
        mask: Tensor[B, T] 0/1.
        constant: ignored.
    Returns:
        Tensor[] scalar.
    """
    per_seq = masked_sum(loss_mat, mask, dim=-1)
    return masked_mean(per_seq, (mask != 0).any(dim=-1))


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(loss_mat: Tensor, mask: Tensor, *, constant: float | None = None) -> Tensor:
    """Dr. GRPO: sum over all valid tokens / (B * constant).

    Args:
        loss_mat: Tensor[B, T] per-token loss.
        mask: Tensor[B, T] 0/1.
        constant: the normaliser per sequence, usually the maximum generation length; required.
    Returns:
        Tensor[] scalar.
    """
    if constant is None or constant <= 0:
        raise ValueError("aggregation 'seq_mean_token_sum_norm' needs constant > 0 (the max generation length)")
    return masked_sum(loss_mat, mask) / (loss_mat.shape[0] * constant)


def aggregate(loss_mat: Tensor, mask: Tensor, mode: str = "token_mean", constant: float | None = None) -> Tensor:
    """``AGGREGATIONS[mode](loss_mat, mask, constant=constant)``.

    Args:
        loss_mat: Tensor[B, T] per-token loss.
        mask: Tensor[B, T] 0/1.
        mode: a name in ``AGGREGATIONS``.
        constant: the normaliser of ``seq_mean_token_sum_norm``; ignored by the other modes.
    Returns:
        Tensor[] scalar.
    """
    if loss_mat.shape != mask.shape or loss_mat.dim() != 2:
        raise ValueError(f"loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    return AGGREGATIONS[mode](loss_mat, mask, constant=constant)


# ------------------------------------------------------------------------------------- policy losses


@dataclass(frozen=True)
class PolicyLossConfig:
    """Knobs of the policy losses.

    Attributes:
        clip_low: PPO epsilon: the ratio's lower bound is ``1 - clip_low``.
        clip_high: upper bound ``1 + clip_high``; None = ``clip_low`` (DAPO clip-higher: set it larger).
        dual_clip: cap the loss of negative-advantage tokens at ``dual_clip * |A|``; must be > 1; None = off.
        aggregation: a name in ``AGGREGATIONS``.
        aggregation_constant: the ``constant`` of ``seq_mean_token_sum_norm`` (max generation length).
        log_ratio_clamp: bound on ``|logp - old_logp|`` before ``exp`` (numerical safety).
    """

    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    aggregation: str = "token_mean"
    aggregation_constant: float | None = None
    log_ratio_clamp: float = 20.0

    def __post_init__(self) -> None:
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high is not None and self.clip_high < 0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        AGGREGATIONS.check(self.aggregation)
        if self.aggregation == "seq_mean_token_sum_norm" and not (self.aggregation_constant or 0) > 0:
            raise ValueError("aggregation 'seq_mean_token_sum_norm' needs aggregation_constant > 0")

    @property
    def upper(self) -> float:
        """The ratio's upper clip bound ``1 + (clip_high or clip_low)``."""
        return 1.0 + (self.clip_low if self.clip_high is None else self.clip_high)

    @property
    def lower(self) -> float:
        """The ratio's lower clip bound ``1 - clip_low``."""
        return 1.0 - self.clip_low


class PolicyLossFn(Protocol):
    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        cfg: PolicyLossConfig = ...,
        is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
_DEFAULT = PolicyLossConfig()


def _check_bt(mask: Tensor, **named: Tensor | None) -> None:
    if mask.dim() != 2:
        raise ValueError(f"mask must be Tensor[B, T], got shape {tuple(mask.shape)}")
    for name, t in named.items():
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{name} must be Tensor[B, T] like mask {tuple(mask.shape)}, got {tuple(t.shape)}")


def _ratio_metrics(log_ratio: Tensor, ratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    return {
        "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": torch.where(mask != 0, ratio, zero).max(),  # ratio > 0, so padding's 0 never wins
    }


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    cfg: PolicyLossConfig = _DEFAULT,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with asymmetric clip (clip-higher) and optional dual clip.

    Args:
        logp: Tensor[B, T] current log-probs of the sampled tokens (with grad).
        old_logp: Tensor[B, T] behaviour-policy log-probs (no grad).
        advantages: Tensor[B, T].
        mask: Tensor[B, T] 0/1 valid-token mask.
        cfg: clip_low, clip_high, dual_clip, aggregation, aggregation_constant, log_ratio_clamp.
        is_weights: Tensor[B, T] or None, multiplied into the per-token loss (no grad expected).
    Returns:
        (loss Tensor[], metrics: clip_frac, clip_frac_low, clip_frac_high, dual_clip_frac, approx_kl,
        ratio_mean, ratio_max, all detached Tensor[]).
    """
    _check_bt(mask, logp=logp, old_logp=old_logp, advantages=advantages, is_weights=is_weights)
    adv = advantages.detach()
    log_ratio = (logp - old_logp.detach()).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(cfg.lower, cfg.upper)
    per_token = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(mask, dtype=torch.bool)
    if cfg.dual_clip is not None:
        cap = -adv * cfg.dual_clip  # = c * |A| where A < 0
        dual_active = (adv < 0) & (cap < per_token)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = aggregate(per_token, mask, cfg.aggregation, cfg.aggregation_constant)

    with torch.no_grad():
        r = ratio.detach()
        low = masked_mean(((adv < 0) & (r < cfg.lower)).float(), mask)
        high = masked_mean(((adv > 0) & (r > cfg.upper)).float(), mask)
        metrics = {
            "clip_frac": low + high,
            "clip_frac_low": low,
            "clip_frac_high": high,
            "dual_clip_frac": masked_mean(dual_active.float(), mask),
            **_ratio_metrics(log_ratio.detach(), r, mask),
        }
    return loss, metrics


@POLICY_LOSSES.register("reinforce")
def reinforce(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    cfg: PolicyLossConfig = _DEFAULT,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Vanilla on-policy policy gradient ``-A * logp`` per token (no ratio, no clipping).

    Args:
        logp: Tensor[B, T] current log-probs of the sampled tokens (with grad).
        old_logp: Tensor[B, T] behaviour-policy log-probs; used for metrics only.
        advantages: Tensor[B, T].
        mask: Tensor[B, T] 0/1 valid-token mask.
        cfg: aggregation, aggregation_constant, log_ratio_clamp (metrics) are read; clips are not.
        is_weights: Tensor[B, T] or None, multiplied into the per-token loss.
    Returns:
        (loss Tensor[], metrics with the same keys as ppo_clip; the clip fractions are 0).
    """
    _check_bt(mask, logp=logp, old_logp=old_logp, advantages=advantages, is_weights=is_weights)
    per_token = -advantages.detach() * logp
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = aggregate(per_token, mask, cfg.aggregation, cfg.aggregation_constant)
    with torch.no_grad():
        log_ratio = (logp - old_logp).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
        zero = logp.new_zeros(())
        metrics = {
            "clip_frac": zero,
            "clip_frac_low": zero,
            "clip_frac_high": zero,
            "dual_clip_frac": zero,
            **_ratio_metrics(log_ratio, log_ratio.exp(), mask),
        }
    return loss, metrics


def compute_policy_loss(
    name: str,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    cfg: PolicyLossConfig = _DEFAULT,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``POLICY_LOSSES[name](...)``: see the module docstring for the arguments and shapes."""
    return POLICY_LOSSES[name](logp, old_logp, advantages, mask, cfg=cfg, is_weights=is_weights)


def truncated_is_weights(old_logp: Tensor, sampler_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights ``min(exp(old_logp - sampler_logp), cap)`` (no grad).

    Corrects for the mismatch between the sampler's log-probs (e.g. vLLM) and the trainer's
    recomputation of the same behaviour policy (Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"); pass the result as ``is_weights``.

    Args:
        old_logp: Tensor[B, T] behaviour log-probs recomputed by the trainer.
        sampler_logp: Tensor[B, T] log-probs reported by the rollout engine.
        cap: the truncation C (e.g. 2.0); must be > 0.
    Returns:
        Tensor[B, T] in (0, cap]; mask it downstream.
    """
    if cap <= 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    with torch.no_grad():
        return torch.exp((old_logp - sampler_logp).clamp(max=20.0)).clamp(max=cap)


# -------------------------------------------------------------------------------------- value loss


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2 / InstructGPT): ``0.5 * max((V - R)^2, (clip(V, V_old ± c) - R)^2)``.

    Args:
        values: Tensor[B, T] current critic values (with grad).
        old_values: Tensor[B, T] critic values at rollout time (no grad).
        returns: Tensor[B, T] targets (e.g. from ``gae``).
        mask: Tensor[B, T] 0/1.
        clip: the value clip range c, or None for the plain ``0.5 * (V - R)^2``.
        aggregation: a name in ``AGGREGATIONS``.
        constant: the ``constant`` of ``seq_mean_token_sum_norm``.
    Returns:
        (loss Tensor[], metrics: vf_clip_frac (share of valid tokens where the clipped term is the
        larger, i.e. the gradient is zero), explained_variance, value_mean; detached Tensor[]).
    """
    _check_bt(mask, values=values, old_values=old_values, returns=returns)
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
    loss = 0.5 * aggregate(per_token, mask, aggregation, constant)
    with torch.no_grad():
        metrics = {
            "vf_clip_frac": masked_mean(active.float(), mask),
            "explained_variance": explained_variance(values.detach(), returns, mask),
            "value_mean": masked_mean(values.detach(), mask),
        }
    return loss, metrics


# ----------------------------------------------------------------------------------------- entropy


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` along the last dim: ``logsumexp(z) - sum(softmax(z) * z)``.

    Stable for large logits (no ``log(softmax)`` of tiny probabilities) and for ``-inf`` logits
    (masked vocabulary entries contribute 0, not ``0 * -inf = nan``). Computed in the input dtype;
    upcast bf16 logits first if you need float32 precision.

    Args:
        logits: Tensor[..., V].
    Returns:
        Tensor[...] in nats.
    """
    p = torch.softmax(logits, dim=-1)
    pz = torch.where(p > 0, p * logits, torch.zeros((), dtype=p.dtype, device=p.device))
    return torch.logsumexp(logits, dim=-1) - pz.sum(dim=-1)
