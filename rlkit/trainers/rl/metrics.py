"""The RL loop's metrics: the per-sample series the log phase averages over processes, the per-route means,
the sampler/trainer gap, and the progress bar's and end-of-run plot's keys.

Names are namespaced (rlkit.tracking): ``reward/total`` and ``reward/<name>`` (``/failures``),
``rollout/...`` (lengths, truncation, dynamic sampling, the sampler's log-prob gap and importance weights),
``kl/...`` (``kl/reward_penalty``; ``kl/mean`` and ``kl/coef`` come from the update and the controller),
``route/<r>/...``, ``env/...`` (multi-turn episodes); the update's own are in ``update.UpdateStats.metrics``.
"""

from __future__ import annotations

import torch

from rlkit.algos import masked_fraction
from rlkit.trainers.batch import RolloutBatch

# the progress bar: (metric, label, format); reward, KL and length always shown (0 until known)
PROGRESS_FIELDS = [("reward/total", "reward", ".3f"), ("reward/accuracy", "acc", ".2f"), ("eval/pass@1", "eval", ".2f"),
                   ("kl/mean", "kl", ".4f"), ("rollout/completion_len", "len", ".0f")]
PROGRESS_REQUIRED = ("reward/total", "kl/mean", "rollout/completion_len")
PLOT_KEYS = ["reward/total", "reward/accuracy", "eval/pass@1", "kl/mean", "rollout/completion_len"]


def sample_series(batch: RolloutBatch, world: int, off_policy: bool, is_mode: str = "truncate",
                  step: int | None = None) -> dict[str, list[float]]:
    """Per-sample values to average over every process's samples (``dist.means``). Every process passes the
    same keys: the reward names and failure counts are the configured rewards', on every process."""
    samples = batch.samples
    return {
        "reward/total": batch.info.rewards,
        **{f"reward/{k}": [x for x in v if x is not None] for k, v in sorted(batch.scores.items())},
        # a count per process: the mean over processes times their number is the sum
        **{f"reward/{k}/failures": [float(v) * world] for k, v in sorted(batch.info.failures.items())},
        **({"kl/reward_penalty": batch.token_rewards.sum(-1).tolist()} if batch.token_rewards is not None else {}),
        **(sampler_series(batch, is_mode) if off_policy else {}),
        # the model's own tokens (a multi-turn sample's tool and environment tokens are not its length)
        "rollout/completion_len": [float(sum(s.mask)) if s.mask is not None else len(s.token_ids) for s in samples],
        "rollout/truncated_frac": [float(not s.finished) for s in samples],
        # the tokens each sample puts through every forward pass, and its padded row's length (rlkit bench's
        # FLOP counts; the share of padding is 1 - tokens / row_len)
        "batch/tokens": batch.attention_mask.sum(-1).float().tolist(),
        "batch/row_len": [float(batch.attention_mask.shape[1])] * len(samples),
        # updates between the weights that sampled and those trained on (asynchronous rollouts: 1)
        **({"rollout/staleness": [float(step - v) for v in batch.policy_version.tolist()]}
           if batch.policy_version is not None and step is not None else {}),
        **episode_series(samples),
    }


def episode_series(samples: list) -> dict[str, list[float]]:
    """Multi-turn episodes: ``env/turns``, ``env/tool_calls``, ``env/tool_errors`` (per episode) and
    ``env/truncated`` (1 when a limit cut the episode); nothing for one-turn samples."""
    eps = [s.episode for s in samples]
    if not eps or any(e is None for e in eps):
        return {}
    return {"env/turns": [float(e.turns) for e in eps], "env/tool_calls": [float(e.tool_calls) for e in eps],
            "env/tool_errors": [float(e.tool_errors) for e in eps], "env/truncated": [float(e.truncated) for e in eps],
            "env/env_tokens": [float(len(s.token_ids) - sum(s.mask)) for s in samples]}


def sampler_series(batch: RolloutBatch, is_mode: str = "truncate") -> dict[str, list[float]]:
    """How far the sampler's log-probs are from the trainer's (``rollout/logprob_diff``, mean |difference|
    per loss token) and what the importance weights did: their mean, the share of tokens at the cap (truncate)
    and the share dropped (``rollout/is_masked_frac``, mask; 0 when truncating)."""
    if batch.sampler_logp is None or batch.old_logp is None:
        return {}
    mask = batch.loss_mask
    n = float(mask.sum())
    out = {"rollout/logprob_diff": [float(((batch.sampler_logp - batch.old_logp).abs() * mask).sum()) / max(n, 1.0)]}
    if batch.is_weights is not None:
        raw = torch.exp((batch.old_logp - batch.sampler_logp).clamp(max=20.0))
        out["rollout/is_weight_mean"] = [float((batch.is_weights * mask).sum()) / max(n, 1.0)]
        clipped = float(((raw > batch.is_weights) * mask).sum()) / max(n, 1.0) if is_mode == "truncate" else 0.0
        out["rollout/is_clipped_frac"] = [clipped]
        out["rollout/is_masked_frac"] = [masked_fraction(batch.is_weights, mask)]
    return out


def sample_maxes(batch: RolloutBatch, off_policy: bool, step: int | None = None) -> dict[str, float]:
    """Per-process maxima to combine by the max over processes (``dist.maxes``)."""
    out = {}
    if off_policy and batch.is_weights is not None:
        out["rollout/is_weight_max"] = masked_max(batch.is_weights, batch.loss_mask)
    if batch.policy_version is not None and step is not None and len(batch.policy_version):
        out["rollout/staleness_max"] = float(step - int(batch.policy_version.min()))
    return out


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(x.masked_fill(mask == 0, float("-inf")).max()) if mask.any() else 0.0


def route_metrics(routes: list, totals: list[float], per_reward: dict[str, list]) -> dict:
    """``route/<r>/reward`` and ``route/<r>/<reward>`` for every route present (all-scenario RL).

    Computed on this process's samples only: the routes present can differ between processes, and a
    collective over a different set of keys would hang."""
    out = {}
    for r in sorted({x for x in routes if x is not None}):
        idx = [i for i, x in enumerate(routes) if x == r]
        out[f"route/{r}/reward"] = sum(totals[i] for i in idx) / len(idx)
        out[f"route/{r}/share"] = len(idx) / max(1, len(routes))
        for k, v in per_reward.items():
            vals = [v[i] for i in idx if v[i] is not None]
            if vals:
                out[f"route/{r}/{k}"] = sum(vals) / len(vals)
    return out
