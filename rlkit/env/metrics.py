"""What the episodes of a batch did, as metrics: ``env/turns``, ``env/tool_calls``, ``env/tool_errors`` (means
per episode), ``env/truncated`` (the share cut by a limit) and ``env/model_tokens`` / ``env/env_tokens``."""

from __future__ import annotations


def episode_metrics(samples: list, prefix: str = "env/") -> dict[str, float]:
    eps = [s.episode for s in samples if s.episode is not None]
    if not eps:
        return {}
    n = len(eps)
    model = sum(sum(s.mask) for s in samples if s.mask is not None)
    total = sum(len(s.token_ids) for s in samples if s.mask is not None)
    return {
        f"{prefix}turns": sum(e.turns for e in eps) / n,
        f"{prefix}tool_calls": sum(e.tool_calls for e in eps) / n,
        f"{prefix}tool_errors": sum(e.tool_errors for e in eps) / n,
        f"{prefix}truncated": sum(e.truncated for e in eps) / n,
        f"{prefix}model_tokens": model / n,
        f"{prefix}env_tokens": (total - model) / n,
    }
