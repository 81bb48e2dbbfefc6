"""The RL loop's collect phase: roll out a batch of prompts (single-turn, or multi-turn episodes), score it, and
(dynamic sampling) refill it; called by ``RLRun.collect``, on the trainer's thread or, with asynchronous
rollouts, on the background thread of ``overlap.RolloutAhead``."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from rlkit.env.episodes import run_episodes
from rlkit.errors import Diverged
from rlkit.rollout import SamplingParams
from rlkit.scoring import score_groups
from rlkit.templates import render_prompt
from rlkit.trainers.batch import RolloutBatch, ScoredGroup, batch_from_groups
from rlkit.trainers.rl import dist
from rlkit.weights import gathered

LAST_GOOD = ("the last good checkpoint is kept; lower train.learning_rate (or raise rl.kl.coef) and run again "
             "with --resume-anyway to continue from it, or --overwrite to start over")


def collect(run, index: int | None = None, version: int | None = None) -> RolloutBatch:
    """Roll out ``per_process`` prompts × G samples, score them, and (dynamic sampling) refill the batch
    with fresh prompts while groups whose rewards are all equal are dropped. Asynchronous (``index``: the
    batch's number, ``version``: the weights it samples from): seeded from the run's seed and the index."""
    rl, tok, n = run.rl, run.tokenizer, run.plan.per_process
    version = run.step if version is None else version
    params = run.params if index is None else dataclasses.replace(
        run.params, seed=(run.t.seed * 1_000_003 + index * 10_007) % 2**31)
    kept: list[ScoredGroup] = []
    dropped: list[ScoredGroup] = []
    rounds = 0
    failures: dict[str, int] = {}
    dynamic = rl.dynamic_sampling is not None
    max_rounds = rl.dynamic_sampling.max_rounds if dynamic else 0
    while True:
        rows = run.stream.take(rl.prompts_per_step)[run.rank * n : (run.rank + 1) * n]
        if run.env is None:
            texts = [render_prompt(r["prompt"], run.cfg.data.template, tok) for r in rows]
            prompt_ids = tok(texts, add_special_tokens=False)["input_ids"]
        with run.timer("rollout"), (gathered(run.policy) if run.plan.gather_weights
                                     else contextlib.nullcontext()), run.sampling_precision():
            if run.env is None:
                groups = generate(run.engine, prompt_ids, params, run.step + 1)
            else:  # multi-turn: the engine generates every turn from token ids
                texts, groups = generate(run.engine, None, params, run.step + 1,
                                         lambda: run_episodes(run.engine, tok, run.env, run.cfg.env, rows,
                                                              params))
                prompt_ids = tok(texts, add_special_tokens=False)["input_ids"]
        with run.timer("reward"):
            scored = score_groups(run.rewards, rows, texts, groups)
        G = rl.num_generations
        for gi, g in enumerate(groups):
            sl = slice(gi * G, (gi + 1) * G)
            group = ScoredGroup(prompt_ids[gi], g, scored.total[sl],
                                {k: v[sl] for k, v in scored.per_reward.items()}, rows[gi].get("route"))
            (dropped if dynamic and len(set(group.totals)) <= 1 else kept).append(group)
        for k, v in scored.failures.items():
            failures[k] = failures.get(k, 0) + v
        rounds += 1
        if rounds > max_rounds or not dist.any_process(run.acc, dynamic and len(kept) < n):
            break
    batch = batch_from_groups((kept + dropped)[:n], tok.pad_token_id, rl.reward_scale, rl.reward_clip,
                              rl.overlong_filter)
    batch.info.rounds, batch.info.failures = rounds, failures
    batch.info.groups_kept_frac = len(kept) / max(1, len(kept) + len(dropped)) if dynamic else 1.0
    batch.info.stream_pos = run.stream.pos  # where the next batch's prompts start (saved for resume)
    batch.policy_version = torch.full((len(batch.samples),), version, dtype=torch.long)
    return batch.to(run.acc.device)


def generate(engine, prompt_ids: list[list[int]] | None, params: SamplingParams, step: int, episodes=None):
    """Roll out (``episodes()``: multi-turn episodes instead); sampling from a model whose logits went non-finite
    means training diverged."""
    try:
        return episodes() if episodes is not None else engine.generate(prompt_ids, params)
    except RuntimeError as e:
        if "inf" in str(e) or "nan" in str(e):
            raise Diverged(f"step {step}: training diverged: the policy's probabilities are not finite "
                           f"({str(e).splitlines()[0]}); {LAST_GOOD}") from None
        raise
