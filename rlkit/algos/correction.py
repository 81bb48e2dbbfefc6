"""Rollout correction: importance weights for samples drawn by another sampler (vLLM) or by older weights.

``rollout_is_weights(old_logp, sampler_logp, mask, cap, mode, level) -> Tensor[B, T]`` (no grad), multiplied
into the per-token policy loss as ``is_weights``. With ``rho = pi_old / pi_sampler`` per token:

- ``mode="truncate"`` (TIS; Yao et al. 2025): ``min(rho, cap)``.
- ``mode="mask"`` (IcePop, MIS; masked importance sampling): 1 where ``1/cap <= rho <= cap``, else 0: a token
  whose sampler disagrees too much with the trainer is dropped from the gradient (it still counts in the loss
  normaliser), instead of being kept at a capped weight.
- ``level="sequence"``: ``rho`` is the sequence's geometric mean ratio ``exp(mean_t log rho_t)`` over its valid
  tokens, the same for all of them, so a whole sequence is truncated or masked together.

``masked_fraction(weights, mask)`` is the share of valid tokens a mask mode dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkit.algos.utils import check_bt

IS_MODES = ("truncate", "mask")
IS_LEVELS = ("token", "sequence")
_CLAMP = 20.0  # bound on |log rho| before exp


def rollout_is_weights(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float, mode: str = "truncate",
                       level: str = "token") -> Tensor:
    """Importance weights Tensor[B, T] for the trainer/sampler mismatch (see the module docstring).

    Args:
        old_logp: Tensor[B, T] behaviour log-probs recomputed by the trainer.
        sampler_logp: Tensor[B, T] log-probs the rollout engine reported.
        mask: Tensor[B, T] 0/1 valid tokens (the sequence level averages over them).
        cap: C > 1 for mask (the kept range is [1/C, C]); > 0 for truncate.
        mode: truncate | mask.
        level: token | sequence.
    Returns:
        Tensor[B, T]: truncate in (0, cap], mask in {0, 1}; mask it downstream.
    """
    check_bt(mask, old_logp=old_logp, sampler_logp=sampler_logp)
    if mode not in IS_MODES or level not in IS_LEVELS:
        raise ValueError(f"rollout correction: mode {mode!r} / level {level!r}; expected one of {IS_MODES} / {IS_LEVELS}")
    if cap <= 0 or (mode == "mask" and cap <= 1):
        raise ValueError(f"rollout correction: cap must be > {1 if mode == 'mask' else 0}, got {cap}")
    with torch.no_grad():
        log_rho = (old_logp - sampler_logp).float().clamp(-_CLAMP, _CLAMP)
        if level == "sequence":
            m = mask.float()
            seq = (log_rho * m).sum(-1) / m.sum(-1).clamp(min=1.0)
            log_rho = seq.unsqueeze(-1).expand_as(log_rho)
        rho = torch.exp(log_rho)
        if mode == "truncate":
            return rho.clamp(max=cap)
        keep = (rho >= 1.0 / cap) & (rho <= cap)
        return keep.to(old_logp.dtype)


def masked_fraction(weights: Tensor, mask: Tensor) -> float:
    """The share of valid tokens whose weight is 0 (dropped by a mask mode)."""
    n = float(mask.sum())
    return float(((weights == 0) & (mask != 0)).sum()) / n if n else 0.0
