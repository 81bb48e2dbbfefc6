"""Policy losses (``POLICY_LOSSES``), their configs (``POLICY_LOSS_SCHEMAS``), and the policy's helpers.

Policy losses share one signature, so the update phase dispatches in one line::

    loss, metrics = POLICY_LOSSES[cfg.name](logp, old_logp, advantages, mask, cfg=cfg, is_weights=w,
                                            aggregation=mode, constant=c, global_count=n)

``logp`` Tensor[B, T] (log-probs of the sampled tokens under the policy being trained, with grad),
``old_logp`` Tensor[B, T] (the same under the policy that generated the batch, no grad),
``advantages`` Tensor[B, T], ``mask`` Tensor[B, T] 0/1, ``is_weights`` optional Tensor[B, T]
importance weights multiplied into the per-token loss (e.g. ``truncated_is_weights`` for the
trainer/sampler mismatch). ``cfg`` is the variant's schema (``PPOClipLoss``, ``ReinforceLoss``; a loss
called without one uses its schema's defaults, and one given another loss's schema raises ``ValueError``).
The per-token loss is reduced by ``aggregate(..., aggregation, constant, global_count)``
(``rlkit.algos.aggregation``, default token_mean: with ``global_count`` the micro-batch losses add up to the
mini-batch's). The loss is a 0-dim tensor; metrics are detached 0-dim tensors (no
device sync until the logger calls ``.item()``), averaged over this batch's valid tokens.

- ``ppo_clip`` (Schulman et al. 2017): per token ``max(-A r, -A clip(r, 1 - epsilon, 1 + epsilon_high))``
  with ``r = exp(logp - old_logp)``. ``epsilon_high`` defaults to ``epsilon``; a larger one is DAPO's
  clip-higher (Yu et al. 2025, e.g. 0.2 / 0.28). ``dual_clip = c > 1`` (Ye et al. 2020, "Mastering Complex
  Control in MOBA Games") additionally caps the loss of negative-advantage tokens at ``c * |A|``
  (``min(that, -A c)``), so a token whose ratio exploded (r > c) under A < 0 stops pushing (zero gradient)
  instead of contributing an unbounded ``|A| r``. Departure from the paper: the log-ratio is clamped to
  ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` (20) before the ``exp``, as verl does, so one wild token cannot
  make ``inf``.
- ``reinforce``: ``-A * logp`` per token, no ratio, no clipping: the on-policy policy gradient
  (its gradient equals ppo_clip's at ``old_logp == logp``). It ignores ``old_logp`` (except for
  metrics) and is only correct with one update per batch (``ReinforceLoss.single_update_only``).

Metrics: ``clip_frac`` share of valid tokens where the PPO clip is active (= ``clip_frac_low`` +
``clip_frac_high``: A < 0 and r < 1 - epsilon, resp. A > 0 and r > 1 + epsilon_high, i.e. where the
clipped branch wins and the gradient is zero); ``dual_clip_frac`` share where the dual clip is active;
``approx_kl`` the k3 estimate of KL(old || new), ``mean(r - 1 - log r)`` (samples come from the old
policy); ``ratio_mean``, ``ratio_max``.

``truncated_is_weights`` corrects for a sampler that is not the trainer; ``entropy_from_logits`` is the
per-position entropy of the softmax.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Protocol

import torch
from pydantic import Field, model_validator
from torch import Tensor

from rlkit.algos.aggregation import aggregate
from rlkit.algos.utils import Registry, check_bt, masked_mean
from rlkit.sections import Section

LOG_RATIO_CLAMP = 20.0  # bound on |logp - old_logp| before exp (numerical safety, as verl)


class PolicyLossFn(Protocol):
    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        cfg: Section = ...,
        is_weights: Tensor | None = None,
        aggregation: str = "token_mean",
        constant: float | None = None,
        global_count: Tensor | float | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
POLICY_LOSS_SCHEMAS: Registry[type[Section]] = Registry("policy loss")


def _check_cfg(cfg: Section, name: str) -> None:
    """Raise unless ``cfg`` is the schema of policy loss ``name``."""
    if getattr(cfg, "name", None) != name:
        raise ValueError(f"policy loss {name!r} got the config of {getattr(cfg, 'name', type(cfg).__name__)!r}")


def _ratio_metrics(log_ratio: Tensor, ratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    return {
        "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": torch.where(mask != 0, ratio, zero).max(),  # ratio > 0, so padding's 0 never wins
    }


# -------------------------------------------------------------------------------------------- ppo_clip


@POLICY_LOSS_SCHEMAS.register("ppo_clip")
class PPOClipLoss(Section):
    """PPO's clipped surrogate, with DAPO's clip-higher and the dual clip."""

    name: Literal["ppo_clip"] = Field("ppo_clip", description="Policy loss: ppo_clip, reinforce, gspo, cispo or sapo.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip range of the importance ratio.")
    epsilon_high: float | None = Field(None, gt=0, allow_inf_nan=True,
                                       description="Upper clip range (DAPO clip-higher; .inf: none); default: epsilon.")
    dual_clip: float | None = Field(None, gt=1, description="Dual-clip constant c > 1 for negative advantages.")
    single_update_only: ClassVar[bool] = False  # correct over several updates per rollout batch

    @model_validator(mode="after")
    def _clip_higher(self) -> PPOClipLoss:
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ValueError("epsilon_high: must be >= epsilon (clip-higher)")
        return self

    @property
    def lower(self) -> float:
        """The ratio's lower clip bound ``1 - epsilon``."""
        return 1.0 - self.epsilon

    @property
    def upper(self) -> float:
        """The ratio's upper clip bound ``1 + (epsilon_high or epsilon)`` (inf: no upper clip)."""
        return 1.0 + (self.epsilon if self.epsilon_high is None else self.epsilon_high)


_PPO_CLIP_LOSS = PPOClipLoss()  # the default cfg


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    cfg: PPOClipLoss = _PPO_CLIP_LOSS,
    is_weights: Tensor | None = None,
    aggregation: str = "token_mean",
    constant: float | None = None,
    global_count: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with asymmetric clip (clip-higher) and optional dual clip.

    Args:
        logp: Tensor[B, T] current log-probs of the sampled tokens (with grad).
        old_logp: Tensor[B, T] behaviour-policy log-probs (no grad).
        advantages: Tensor[B, T].
        mask: Tensor[B, T] 0/1 valid-token mask.
        cfg: ``PPOClipLoss`` (epsilon, epsilon_high, dual_clip).
        is_weights: Tensor[B, T] or None, multiplied into the per-token loss (no grad expected).
        aggregation: a name in ``AGGREGATIONS``.
        constant: the ``constant`` of ``seq_mean_token_sum_norm`` (required by it, ignored by the others).
        global_count: the mini-batch's ``loss_count`` over all processes; None = this batch's count.
    Returns:
        (loss Tensor[], metrics: clip_frac, clip_frac_low, clip_frac_high, dual_clip_frac, approx_kl,
        ratio_mean, ratio_max, all detached Tensor[]).
    """
    check_bt(mask, logp=logp, old_logp=old_logp, advantages=advantages, is_weights=is_weights)
    _check_cfg(cfg, "ppo_clip")
    adv = advantages.detach()
    log_ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
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
    loss = aggregate(per_token, mask, aggregation, constant, global_count)

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


# ------------------------------------------------------------------------------------------- reinforce


@POLICY_LOSS_SCHEMAS.register("reinforce")
class ReinforceLoss(Section):
    """The on-policy policy gradient ``-A * logp``: no knobs."""

    name: Literal["reinforce"] = Field("reinforce", description="Policy loss: ppo_clip, reinforce, gspo, cispo or sapo.")
    # REINFORCE is only correct with one update per rollout batch (one epoch, one mini-batch)
    single_update_only: ClassVar[bool] = True


_REINFORCE_LOSS = ReinforceLoss()  # the default cfg


@POLICY_LOSSES.register("reinforce")
def reinforce(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    cfg: ReinforceLoss = _REINFORCE_LOSS,
    is_weights: Tensor | None = None,
    aggregation: str = "token_mean",
    constant: float | None = None,
    global_count: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Vanilla on-policy policy gradient ``-A * logp`` per token (no ratio, no clipping).

    Args:
        logp: Tensor[B, T] current log-probs of the sampled tokens (with grad).
        old_logp: Tensor[B, T] behaviour-policy log-probs; used for metrics only.
        advantages: Tensor[B, T].
        mask: Tensor[B, T] 0/1 valid-token mask.
        cfg: ``ReinforceLoss``; not read (present for the uniform signature).
        is_weights: Tensor[B, T] or None, multiplied into the per-token loss.
        aggregation, constant, global_count: as for ``ppo_clip``.
    Returns:
        (loss Tensor[], metrics with the same keys as ppo_clip; the clip fractions are 0).
    """
    check_bt(mask, logp=logp, old_logp=old_logp, advantages=advantages, is_weights=is_weights)
    _check_cfg(cfg, "reinforce")
    per_token = -advantages.detach() * logp
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = aggregate(per_token, mask, aggregation, constant, global_count)
    with torch.no_grad():
        log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        zero = logp.new_zeros(())
        metrics = {
            "clip_frac": zero,
            "clip_frac_low": zero,
            "clip_frac_high": zero,
            "dual_clip_frac": zero,
            **_ratio_metrics(log_ratio, log_ratio.exp(), mask),
        }
    return loss, metrics


# The ``policy_loss:`` union of every schema (``PolicyLoss``) is in rlkit.algos.ratio_losses, which adds gspo,
# cispo and sapo to these registries.


def compute_policy_loss(
    name: str | Section,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    cfg: Section | None = None,
    is_weights: Tensor | None = None,
    aggregation: str = "token_mean",
    constant: float | None = None,
    global_count: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``POLICY_LOSSES[name](...)``; ``name`` may be the schema itself (then it is also ``cfg``).

    See the module docstring for the arguments and shapes; ``cfg`` None = the loss's schema's defaults.
    """
    if isinstance(name, Section):
        name, cfg = name.name, name if cfg is None else cfg
    kw = {} if cfg is None else {"cfg": cfg}
    return POLICY_LOSSES[name](logp, old_logp, advantages, mask, **kw, is_weights=is_weights,
                               aggregation=aggregation, constant=constant, global_count=global_count)


# ------------------------------------------------------------------------------------------- helpers


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
