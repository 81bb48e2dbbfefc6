"""Apply a recipe's rewards to samples: weights, per-reward metrics, failures that never crash a run.

Each reward is called once per batch with the completions and every dataset column. A reward that
raises is retried sample by sample; a sample that still raises, or for which the reward returns NaN
(the built-in math check does on a timeout), scores 0 and is counted in ``reward/<name>/failures``.
``None`` means "not applicable" (the weighted sum skips it; the metric averages the rest). A reward that
fails on every sample of a batch is reported loudly, so a run never goes on silently scoring zeros.
A reward with ``routes`` applies only to samples whose ``route`` column is one of them (others: None).
A reward function may carry a ``prepare(**params)`` attribute, called once when the set is built, so that
bad parameters (a reward model path that does not exist) fail before training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rlkit.rewards import RewardError, get_reward
from rlkit.tracking import console


@dataclass
class ScoredBatch:
    total: list[float]                          # weighted sum per sample
    per_reward: dict[str, list[float | None]]   # raw score per reward and sample (None: not applicable)
    failures: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"reward": _mean(self.total)}
        for name, vals in self.per_reward.items():
            applicable = [v for v in vals if v is not None]
            if applicable:
                out[f"reward/{name}"] = _mean(applicable)
            out[f"reward/{name}/failures"] = float(self.failures.get(name, 0))
        return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def score_groups(rewards: "RewardSet", rows: list[dict], prompts: list[str], groups: list[list]) -> ScoredBatch:
    """Score ``groups[i]`` (the samples of prompt i) with every dataset column of ``rows[i]``, plus the
    rendered ``prompts`` and the ``completion_lengths`` in tokens, repeated per sample."""
    flat = [s for g in groups for s in g]
    keys = {k for r in rows for k in r}
    cols = {k: [r.get(k) for r, g in zip(rows, groups) for _ in g] for k in keys}
    cols["prompts"] = [p for p, g in zip(prompts, groups) for _ in g]
    cols["completion_lengths"] = [len(s.token_ids) for s in flat]
    return rewards.score([s.text for s in flat], cols)


class RewardSet:
    """The rewards a recipe lists: ``[{name, weight, params}]``, built and checked up front."""

    def __init__(self, specs: list, warn_all_failed: bool = True):
        if not specs:
            raise RewardError("no rewards configured; list at least one under 'rewards:'")
        self.specs = specs
        self.fns = {}
        for s in specs:
            key = s.alias or s.name
            if key in self.fns:
                raise RewardError(f"reward '{key}' is listed twice; give one an 'alias'")
            self.fns[key] = get_reward(s.name)
            prepare = getattr(self.fns[key], "prepare", None)
            if prepare is not None:  # e.g. load a reward model now: a bad path fails before training starts
                prepare(**dict(s.params))
        self.warn_all_failed = warn_all_failed

    @property
    def names(self) -> list[str]:
        return list(self.fns)

    def score(self, completions: list[str], columns: dict[str, list]) -> ScoredBatch:
        n = len(completions)
        per: dict[str, list[float | None]] = {}
        failures: dict[str, int] = {}
        total = [0.0] * n
        routes = columns.get("route")
        for spec in self.specs:
            key = spec.alias or spec.name
            if spec.routes is not None:
                idx = [i for i in range(n) if routes is not None and routes[i] in spec.routes]
                vals = [None] * n
                failed = 0
                if idx:
                    sub_cols = {k: [v[i] for i in idx] for k, v in columns.items()}
                    sub, failed = self._call(key, self.fns[key], [completions[i] for i in idx], sub_cols,
                                             dict(spec.params))
                    for i, v in zip(idx, sub):
                        vals[i] = v
            else:
                vals, failed = self._call(key, self.fns[key], completions, columns, dict(spec.params))
            per[key] = vals
            failures[key] = failed
            if failed and failed == sum(v is not None for v in vals) and self.warn_all_failed:
                console.print(f"[bold red]reward '{key}' failed on all {n} samples of this batch; they score 0[/]")
            for i, v in enumerate(vals):
                if v is not None:
                    total[i] += spec.weight * v
        return ScoredBatch(total, per, failures)

    @staticmethod
    def _call(key, fn, completions, columns, params) -> tuple[list[float | None], int]:
        n = len(completions)
        try:
            raw = list(fn(completions, **columns, **params))
            if len(raw) != n:
                raise RewardError(f"reward '{key}' returned {len(raw)} scores for {n} completions")
        except RewardError:
            raise
        except Exception:
            raw = []
            for i in range(n):
                one = {k: [v[i]] for k, v in columns.items()}
                try:
                    raw.extend(fn([completions[i]], **one, **params))
                except Exception:
                    raw.append(math.nan)
        out: list[float | None] = []
        failed = 0
        for v in raw:
            if v is None:
                out.append(None)
            elif isinstance(v, (int, float)) and math.isfinite(v):
                out.append(float(v))
            else:
                failed += 1
                out.append(0.0)
        return out, failed
