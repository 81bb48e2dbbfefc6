"""What changes a run's result: the resume policy (a run resumes across a change to none of these keys) and
the keys a pipeline stage's hash leaves out."""

from __future__ import annotations

from typing import Any

# Keys that never change what a run produces (its weights or data): naming, reporting, logging,
# checkpoint cadence and evaluation. A pipeline stage's hash leaves them out, and a run resumes across
# changes to them.
RESULT_NEUTRAL = ("name", "description", "output_dir", "report_to", "train.logging_steps", "train.save_steps",
                  "train.save_total_limit", "rl.log_completions", "rl.reward_check", "rl.eval_steps", "eval",
                  "data.eval", "rollout.mode", "rollout.server_url", "rollout.server_timeout", "rollout.server_wait",
                  "rollout.sync_dir", "rollout.gpu_memory_utilization", "rollout.kv_cache_gib",
                  "rollout.max_model_len", "rollout.enforce_eager", "rollout.sleep")
# Changing these on resume extends or shortens a run; they still change its result.
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs")


def covered(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the dotted ``path`` is one of ``prefixes`` or lies under one."""
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def result_differences(old: dict, new: dict, ignore: tuple[str, ...] = RESULT_NEUTRAL + RESUMABLE_CHANGES
                       ) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for every key of two config dumps that differs and may change the result."""
    from rlkit.nested import flatten

    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not covered(k, ignore)]
