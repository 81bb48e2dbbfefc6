"""The RL loop: GRPO (and, with a value model, PPO) as configurations of one loop with named, timed phases.

    rollout   → engine.generate(prompts, n)               token ids, masks (and sampler log-probs)
    reward    → RewardSet.score(completions, columns)      per-reward scores and their weighted sum
    reference → old policy log-probs; reference log-probs  only when the config needs them
    advantage → ADVANTAGES[rl.advantage](...)              grpo | dr_grpo | rloo | reinforce_pp
    update    → num_iterations × mini-batches of POLICY_LOSSES[rl.policy_loss] (+ KL in the loss)
    sync      → engine.sync_weights(policy)                a no-op for the in-process hf engine
    log       → metrics.jsonl / TensorBoard, progress bar, periodic eval, atomic checkpoints

GRPO (Shao et al. 2024) with the DAPO options (Yu et al. 2025): clip-higher (``epsilon_high``), token-mean
loss aggregation, dynamic sampling (groups whose rewards are all equal are dropped and the batch is
refilled with fresh prompts) and overlong filtering. Departures from the paper: the KL term is optional
(``beta: 0`` loads no reference model) and can go into the reward per token instead of the loss.

The loop runs under accelerate from the first line: one process on CPU, or ``accelerate launch
--num_processes N`` for DDP on CPUs (gloo) or GPUs; each process rolls out its share of the prompts.

    rlkit grpo --recipe r1_zero                        # the embedded world, ~5 minutes on 2 cores
    rlkit grpo --recipe r1_zero --model Qwen/Qwen2.5-0.5B --dataset math.jsonl
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

from rlkit import checkpoint as ckpt
from rlkit import runs
from rlkit.algos import (
    AdvantageConfig,
    aggregate,
    all_finite,
    PolicyLossConfig,
    compute_advantages,
    compute_kl,
    compute_policy_loss,
    make_kl_controller,
    masked_mean,
    value_loss,
)
from rlkit.config import RunConfig
from rlkit.data import DataError, check_lengths, rl_rows
from rlkit.errors import Diverged
from rlkit.evaluation import eval_rows, eval_spec, evaluate_model
from rlkit.models import context_length, load_causal_lm, load_tokenizer
from rlkit.outputs import finish_run
from rlkit.rollout import SamplingParams, make_engine
from rlkit.scoring import RewardSet, score_groups
from rlkit.templates import full_text, render_prompt
from rlkit.tracking import MetricsLogger, console, truncate_metrics
from rlkit.trainers.batch import RolloutBatch, build_batch, completion_logprobs
from rlkit.trainers.critic import critic_values, load_critic


class PhaseTimer:
    """``with timer("rollout"):`` accumulates wall time per named phase into ``time/<phase>``."""

    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[name] += time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.times.items()}
        self.times.clear()
        return out


class PromptStream:
    """Deterministic prompt order: a fresh seeded permutation per epoch; the position is saved for resume."""

    def __init__(self, rows: list[dict], seed: int, pos: int = 0):
        self.rows, self.seed, self.pos = rows, seed, pos
        self._epoch, self._perm = -1, []

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.pos, len(self.rows))
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(len(self.rows), generator=g).tolist()
            out.append(self.rows[self._perm[i]])
            self.pos += 1
        return out


def _loss_weight(mode: str, micro_mask: torch.Tensor, mini_mask: torch.Tensor) -> float:
    """Share of a mini-batch's normaliser that one micro-batch carries, so that accumulated micro-batch
    losses equal the mini-batch loss of the chosen aggregation."""
    if mode == "token_mean":
        return float(micro_mask.sum()) / max(float(mini_mask.sum()), 1.0)
    if mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return float((micro_mask.sum(-1) > 0).sum()) / max(float((mini_mask.sum(-1) > 0).sum()), 1.0)
    return micro_mask.shape[0] / mini_mask.shape[0]


KL_CLAMP = 20.0  # bound on |log pi - log pi_ref| before a KL estimator (verl's choice): exp() stays finite


def run_rl(cfg: RunConfig, resume: str = "auto") -> dict:
    """Train (or resume) the run ``cfg`` describes; ``resume``: auto | anyway | overwrite (see rlkit.runs)."""
    rewards = RewardSet(cfg.rewards)  # a reward that does not resolve is reported before anything else
    with runs.guarded_run(cfg, resume, ckpt.last_checkpoint) as stop:
        return _run_rl(cfg, stop, rewards)


def _run_rl(cfg: RunConfig, stop: runs.GracefulStop, rewards: RewardSet) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    t_start = time.time()
    rl, t = cfg.rl, cfg.train
    cuda = torch.cuda.is_available()
    bf16 = t.bf16 if t.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    out = Path(cfg.output_dir)
    if rl.prompts_per_step % world:
        raise DataError(f"rl.prompts_per_step ({rl.prompts_per_step}) must be divisible by the {world} processes")
    per_proc = rl.prompts_per_step // world
    B = per_proc * rl.num_generations

    # ---------------------------------------------------------------------------------- set-up
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    context = context_length(cfg.model.path, cfg.model.trust_remote_code)

    def fits(spec: str, source_rows: list[dict]) -> list[dict]:
        """Rows the rewards can score (gold answers checked), whose prompts leave room for
        rl.max_new_tokens in the model's context."""
        rewards.check_rows(source_rows, spec)
        if context is None:
            return source_rows
        texts = [render_prompt(r["prompt"], cfg.data.template, tokenizer) for r in source_rows]
        lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return check_lengths(source_rows, lengths, context - rl.max_new_tokens, spec, cfg.data.on_overlong,
                             f"which with rl.max_new_tokens {rl.max_new_tokens} exceeds the model's context of "
                             f"{context} tokens")

    rows = rl_rows(cfg.data, check=fits)
    if rl.reward_check and main:
        _reward_check(rewards, rows, cfg.data.template, tokenizer)
    max_steps = t.max_steps or max(1, math.ceil(t.epochs * len(rows) / rl.prompts_per_step))
    set_seed(t.seed)
    resume_from = ckpt.last_checkpoint(out)
    policy = load_causal_lm(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code)
    ref_model = None
    if cfg.model.lora is not None:
        from peft import LoraConfig, PeftModel, get_peft_model

        lc = cfg.model.lora
        if resume_from is not None:
            policy = PeftModel.from_pretrained(policy, str(resume_from), is_trainable=True)
        else:
            policy = get_peft_model(policy, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                       target_modules=lc.target_modules, task_type="CAUSAL_LM"))
    else:
        if rl.beta > 0:  # beta 0: no KL anywhere, so no reference model
            ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
        if resume_from is not None:
            policy = load_causal_lm(str(resume_from), cfg.model.dtype, cfg.model.trust_remote_code)
    if t.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.config.use_cache = True

    n_minibatches = math.ceil(B / (rl.mini_batch_size or B))
    opt_steps = max_steps * rl.num_iterations * n_minibatches
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=t.learning_rate,
                                  weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * opt_steps),
                              num_training_steps=opt_steps)
    policy, optimizer = acc.prepare(policy, optimizer)
    if ref_model is not None:
        ref_model.to(acc.device)
    critic = critic_opt = critic_sched = None
    if cfg.kind == "ppo":
        critic = load_critic(str(resume_from / "critic") if resume_from is not None else rl.value_model,
                             cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code)
        critic.model.config.pad_token_id = tokenizer.pad_token_id
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=rl.value_learning_rate or t.learning_rate,
                                       weight_decay=t.weight_decay)
        critic_sched = get_scheduler(t.lr_scheduler, critic_opt, num_warmup_steps=int(t.warmup_ratio * opt_steps),
                                     num_training_steps=opt_steps)
        critic, critic_opt = acc.prepare(critic, critic_opt)
    extra_state = {"critic_optimizer": critic_opt, "critic_scheduler": critic_sched} if critic is not None else {}
    ptx = _PtxStream(rl, tokenizer, cfg.data.template, t.seed) if rl.ptx_coef > 0 else None
    kl_ctl = make_kl_controller(rl.kl_controller, rl.beta, target=rl.kl_target, horizon=rl.kl_horizon)

    stream = PromptStream(rows, t.seed)
    step, history = 0, {}
    if resume_from is not None:
        state = ckpt.load_state(resume_from, rank, optimizer, scheduler, extra_state)
        ckpt.apply_learning_rate(optimizer, scheduler, t.learning_rate)  # --resume-anyway with a new rate
        if critic_opt is not None:
            ckpt.apply_learning_rate(critic_opt, critic_sched, rl.value_learning_rate or t.learning_rate)
        step, stream.pos, history = state["step"], state["data_pos"], state.get("history", {})
        if ptx is not None:
            ptx.pos = state.get("ptx_pos", 0)
        kl_ctl.load_state_dict(state["kl_controller"])
        if main:
            print(f"resuming from {resume_from} (step {step})", flush=True)
            truncate_metrics(out / "metrics.jsonl", step)
    else:
        torch.manual_seed(t.seed * 1009 + rank)
        random.seed(t.seed * 1009 + rank)
        if main and out.exists():
            (out / "metrics.jsonl").unlink(missing_ok=True)

    unwrapped = acc.unwrap_model(policy)
    engine = make_engine(rl.engine, unwrapped, tokenizer, batch_size=max(B, 1), cache=rl.hf_cache)
    params = SamplingParams(n=rl.num_generations, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                            top_p=rl.top_p)
    logger = MetricsLogger(out, cfg.report_to if main else [], run_name=cfg.name,
                           config=cfg.model_dump(mode="json")) if main else None
    eval_cfg = cfg.eval
    eval_template = eval_cfg.template or cfg.data.template
    spec = eval_spec(cfg)
    eval_data = eval_rows(eval_cfg, spec)[1] if spec else None
    if eval_data is None and main and "before" not in history and eval_cfg.task == "auto":
        console.print("[yellow]no evaluation: set data.eval to a held-out split of your data to get before/after "
                      "pass@1[/]")

    def run_eval() -> dict:
        if eval_data is None or not main:
            return {}
        rep = evaluate_model(unwrapped, tokenizer, eval_data, eval_cfg, eval_template)
        return {f"eval/{k}": v for k, v in rep.metrics.items() if k not in ("n_prompts",)}

    if "before" not in history:
        history["before"] = run_eval()
        if logger is not None and history["before"]:
            logger.log(step, history["before"])
    acc.wait_for_everyone()

    def reference_logprobs(batch: RolloutBatch) -> torch.Tensor | None:
        if rl.beta == 0:
            return None
        with torch.no_grad():
            if ref_model is not None:
                return _chunked_logprobs(ref_model, batch, rl)
            with unwrapped.disable_adapter():
                return _chunked_logprobs(unwrapped, batch, rl)

    timer = PhaseTimer()
    progress = _Progress(max_steps, step, cfg.kind) if main else None
    policy.train()
    # --------------------------------------------------------------------------------- the loop
    try:
        while step < max_steps:
            step_t0 = time.time()
            # rollout + reward (+ dynamic sampling)
            kept: list[tuple] = []
            dropped: list[tuple] = []
            rounds = 0
            failures: dict[str, int] = defaultdict(int)
            while True:
                prompts_rows = stream.take(rl.prompts_per_step)[rank * per_proc : (rank + 1) * per_proc]
                texts = [render_prompt(r["prompt"], cfg.data.template, tokenizer) for r in prompts_rows]
                with timer("rollout"):
                    groups = _generate(engine, texts, params, step + 1)
                with timer("reward"):
                    scored = score_groups(rewards, prompts_rows, texts, groups)
                for gi, (text, g) in enumerate(zip(texts, groups)):
                    sl = slice(gi * rl.num_generations, (gi + 1) * rl.num_generations)
                    item = (text, g, scored.total[sl], {k: v[sl] for k, v in scored.per_reward.items()},
                            prompts_rows[gi].get("route"))
                    if rl.dynamic_sampling and len(set(scored.total[sl])) == 1:
                        dropped.append(item)
                    else:
                        kept.append(item)
                for k, v in scored.failures.items():
                    failures[k] += v
                rounds += 1
                need = torch.tensor(float(rl.dynamic_sampling and len(kept) < per_proc), device=acc.device)
                if rounds > rl.max_resample_rounds or acc.reduce(need, "sum").item() == 0:
                    break
            groups_used = (kept + dropped)[:per_proc]

            prompt_ids, samples, gids, totals, routes = [], [], [], [], []
            per_reward: dict[str, list] = defaultdict(list)
            for gi, (text, g, tot, per, route) in enumerate(groups_used):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                routes.extend([route] * len(g))
                for j, s in enumerate(g):
                    prompt_ids.append(ids)
                    samples.append(s)
                    gids.append(gi)
                    r = tot[j] * rl.reward_scale
                    totals.append(max(-rl.reward_clip, min(rl.reward_clip, r)) if rl.reward_clip else r)
                for k, v in per.items():
                    per_reward[k].extend(v)
            batch = build_batch(prompt_ids, samples, gids, totals, tokenizer.pad_token_id, rl.overlong_filter)
            batch = _to(batch, acc.device)

            # reference and old log-probs
            with timer("reference"):
                need_old = rl.num_iterations > 1 or n_minibatches > 1 or (rl.kl_in == "reward" and rl.beta > 0)
                policy.eval()
                if need_old:
                    with torch.no_grad():
                        batch.old_logp = _chunked_logprobs(unwrapped, batch, rl)
                batch.ref_logp = reference_logprobs(batch)
                policy.train()
            if critic is not None:
                with timer("values"), torch.no_grad():
                    batch.values = _in_chunks(batch, rl.micro_batch_size, lambda mb: critic_values(critic, mb))

            # advantage
            with timer("advantage"):
                token_rewards = None
                if rl.kl_in == "reward" and batch.ref_logp is not None:
                    token_rewards = -kl_ctl.value * compute_kl(rl.kl_estimator, batch.old_logp, batch.ref_logp,
                                                               clamp=KL_CLAMP) * batch.completion_mask
                batch.advantages, batch.returns = compute_advantages(
                    rl.advantage, rewards=batch.rewards, mask=batch.completion_mask, group_ids=batch.group_ids,
                    values=batch.values, token_rewards=token_rewards,
                    cfg=AdvantageConfig(gamma=rl.gamma, lam=rl.lam, std_normalize=rl.std_normalize,
                                        whiten=rl.whiten_advantages))

            # update
            with timer("update"):
                stats = _update(policy, optimizer, scheduler, acc, batch, rl, kl_ctl.value,
                                critic=(critic, critic_opt, critic_sched) if critic is not None else None, ptx=ptx)

            _check_finite(stats, policy, step + 1)

            with timer("sync"):
                _sync(engine, unwrapped)

            step += 1
            # log
            with timer("log"):
                series = {
                    "reward": totals,
                    **{f"reward/{k}": [x for x in v if x is not None] for k, v in sorted(per_reward.items())},
                    **{f"reward/{k}/failures": [float(v) * world] for k, v in sorted(failures.items())},
                    **{k: [v] for k, v in stats.items()},
                    **({"reward/kl_penalty": token_rewards.sum(-1).tolist()} if token_rewards is not None else {}),
                    "completion_len": [len(s.token_ids) for s in samples],
                    "truncated_frac": [float(not s.finished) for s in samples],
                }
                reduced = _gmeans(acc, series)  # one all-reduce for every averaged metric
                kl_ctl.update(reduced.get("kl", 0.0), B * world)
                metrics = {
                    **reduced,
                    **_route_metrics(routes, totals, per_reward),
                    "beta": kl_ctl.value,
                    "groups_kept_frac": len(kept) / max(1, len(kept) + len(dropped)) if rl.dynamic_sampling else 1.0,
                    "rollout_rounds": rounds,
                    "lr": scheduler.get_last_lr()[0],
                    "step_seconds": time.time() - step_t0,
                    "completion_tokens_per_s": sum(len(s.token_ids) for s in samples) * world
                    / max(timer.times.get("rollout", 1e-9), 1e-9),
                }
                if step % rl.eval_steps == 0 or step == max_steps:
                    acc.wait_for_everyone()
                    metrics.update(run_eval())
                metrics.update(timer.pop())
                if main:
                    logger.log(step, metrics)
                    progress.update(step, metrics)
                    if rl.log_completions and (step % t.logging_steps == 0 or step == 1):
                        s0 = samples[0]
                        progress.note(f"[dim]step {step} sample (reward {totals[0]:.2f}):[/] {s0.text[:200]!r}")
                stopping = _any_process(acc, stop.requested is not None)
                if step % t.save_steps == 0 or step == max_steps or stopping:
                    _save_checkpoint(acc, out, step, unwrapped, tokenizer, optimizer, scheduler,
                                     {"step": step, "data_pos": stream.pos, "kl_controller": kl_ctl.state_dict(),
                                      "history": history, "max_steps": max_steps, "ptx_pos": ptx.pos if ptx else 0},
                                     t.save_total_limit, extra_state,
                                     acc.unwrap_model(critic).model if critic is not None else None)
                if stopping:
                    raise stop.interrupted(f"saved {out / f'checkpoint-{step}'}")
    finally:
        if progress is not None:
            progress.close()

    # -------------------------------------------------------------------------------- finish
    acc.wait_for_everyone()
    result: dict = {"steps": step, "processes": world}
    if main:
        if cfg.model.lora is not None:
            unwrapped.save_pretrained(str(out / "adapter"))  # the adapter first: merging folds it away
        final = unwrapped.merge_and_unload() if cfg.model.lora is not None else unwrapped
        final.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        if critic is not None:
            acc.unwrap_model(critic).model.save_pretrained(str(out / "critic"))
        after = _last_eval(out / "metrics.jsonl")
        before = history.get("before", {})
        result.update({"before/" + k.removeprefix("eval/"): v for k, v in before.items() if "seconds" not in k})
        result.update({"after/" + k.removeprefix("eval/"): v for k, v in after.items() if "seconds" not in k})
        result["seconds"] = round(time.time() - t_start, 1)
        finish_run(out, cfg, logger, result, ["reward", "reward/accuracy", "eval/pass@1", "kl", "completion_len"],
                   stage=cfg.kind)
    acc.wait_for_everyone()
    acc.end_training()
    return result


# ------------------------------------------------------------------------------------- helpers


def _to(batch: RolloutBatch, device) -> RolloutBatch:
    return RolloutBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.__dict__.items()})


def _in_chunks(batch: RolloutBatch, size: int, fn) -> torch.Tensor:
    """``fn`` over micro-batches of ``size`` samples, concatenated: [B, T]."""
    B = batch.input_ids.shape[0]
    return torch.cat([fn(batch.select(torch.arange(i, min(B, i + size), device=batch.input_ids.device)))
                      for i in range(0, B, size)])


def _chunked_logprobs(model, batch: RolloutBatch, rl) -> torch.Tensor:
    return _in_chunks(batch, rl.micro_batch_size, lambda mb: completion_logprobs(
        model, mb, rl.temperature, chunk_tokens=rl.logprob_chunk)[0])


def _update(policy, optimizer, scheduler, acc, batch: RolloutBatch, rl, beta: float, critic=None, ptx=None) -> dict:
    """num_iterations passes over the batch in mini-batches; each mini-batch is one optimizer step made of
    micro-batches whose losses are weighted so that they add up to the mini-batch loss."""
    B = batch.input_ids.shape[0]
    mini = rl.mini_batch_size or B
    loss_cfg = PolicyLossConfig(clip_low=rl.epsilon, clip_high=rl.epsilon_high, dual_clip=rl.dual_clip,
                                aggregation=rl.loss_aggregation,
                                aggregation_constant=float(rl.max_new_tokens))
    sums: dict[str, torch.Tensor | float] = defaultdict(float)  # device tensors: no host sync per micro-batch
    count = 0
    for _ in range(rl.num_iterations):
        order = torch.randperm(B).to(batch.input_ids.device) if mini < B else torch.arange(B, device=batch.input_ids.device)
        for m0 in range(0, B, mini):
            mini_idx = order[m0 : m0 + mini]
            mini_mask = batch.completion_mask[mini_idx]
            micro_chunks = list(range(0, len(mini_idx), rl.micro_batch_size))
            if ptx is not None:
                with acc.no_sync(policy):
                    ptx_loss = ptx.loss(policy, acc.device)
                    acc.backward(rl.ptx_coef * ptx_loss)
                sums["loss/ptx"] += ptx_loss.detach()
            for ci, c0 in enumerate(micro_chunks):
                idx = mini_idx[c0 : c0 + rl.micro_batch_size]
                mb = batch.select(idx)
                last = ci == len(micro_chunks) - 1
                ctx = contextlib.nullcontext() if last else acc.no_sync(policy)
                with ctx:
                    logp, ent = completion_logprobs(policy, mb, rl.temperature, with_entropy=True,
                                                    chunk_tokens=rl.logprob_chunk)
                    old = mb.old_logp if mb.old_logp is not None else logp.detach()
                    pl, pm = compute_policy_loss(rl.policy_loss, logp, old, mb.advantages, mb.completion_mask,
                                                 cfg=loss_cfg)
                    loss = pl
                    kl_tok = None
                    if mb.ref_logp is not None:
                        kl_tok = compute_kl(rl.kl_estimator, logp, mb.ref_logp, clamp=KL_CLAMP)
                        if rl.kl_in == "loss" and beta > 0:
                            loss = loss + beta * aggregate(kl_tok, mb.completion_mask, rl.loss_aggregation,
                                                           float(rl.max_new_tokens))
                    w = _loss_weight(rl.loss_aggregation, mb.completion_mask, mini_mask)
                    acc.backward(loss * w)
                mask = mb.completion_mask
                wt = _loss_weight("token_mean", mask, mini_mask)  # per-token metrics: the mini-batch's token mean
                sums["loss/policy"] += pl.detach() * w
                sums["entropy"] += masked_mean(ent, mask) * wt
                for k in ("clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl"):
                    if k in pm:
                        sums[k] += pm[k].detach() * wt
                if kl_tok is not None:
                    sums["kl"] += masked_mean(kl_tok.detach(), mask) * wt
                if critic is not None:
                    cmodel = critic[0]
                    with contextlib.nullcontext() if last else acc.no_sync(cmodel):
                        v = critic_values(cmodel, mb)
                        vl, vm = value_loss(v, mb.values, mb.returns, mask, clip=rl.value_clip,
                                            aggregation=rl.loss_aggregation, constant=float(rl.max_new_tokens))
                        acc.backward(vl * w)
                    sums["loss/value"] += vl.detach() * w
                    for k in ("vf_clip_frac", "explained_variance", "value_mean"):
                        # every process must report the same keys; NaN (constant returns) counts as 0
                        sums[k] += torch.nan_to_num(torch.as_tensor(vm.get(k, 0.0), dtype=torch.float32).detach()) * w
            sums["grad_norm"] += acc.clip_grad_norm_(policy.parameters(), rl.max_grad_norm).detach()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if critic is not None:
                cmodel, copt, csched = critic
                acc.clip_grad_norm_(cmodel.parameters(), rl.max_grad_norm)
                copt.step()
                csched.step()
                copt.zero_grad(set_to_none=True)
            count += 1
    keys = list(sums)
    values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=acc.device).reshape(())
                          for k in keys]).div(count).tolist()
    return dict(zip(keys, values))


def _route_metrics(routes: list, totals: list[float], per_reward: dict[str, list]) -> dict:
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


def _reward_check(rewards: RewardSet, rows: list[dict], template: str, tokenizer) -> None:
    """One line before training: does any known hack score as high as an honest answer? (rlkit rewards check)"""
    from rlkit.reward_check import run_reward_check, summary_line

    row = next((r for r in rows if r.get("answer") is not None), None)
    if row is None:
        return
    report = run_reward_check(rewards, row, render_prompt(row["prompt"], template, tokenizer), template, tokenizer)
    hint = "; see `rlkit rewards check`, or rl.reward_check=false to skip" if report.hacks else ""
    console.print(f"[{'yellow' if report.hacks else 'green'}]{summary_line(report)}{hint}[/]")


def _generate(engine, texts: list[str], params: SamplingParams, step: int):
    """Roll out; sampling from a model whose logits went non-finite means training diverged."""
    try:
        return engine.generate(texts, params)
    except RuntimeError as e:
        if "inf" in str(e) or "nan" in str(e):
            raise Diverged(f"step {step}: training diverged: the policy's probabilities are not finite "
                           f"({str(e).splitlines()[0]}); {_LAST_GOOD}") from None
        raise


_LAST_GOOD = ("the last good checkpoint is kept; lower train.learning_rate (or raise rl.beta) and run again "
              "with --resume-anyway to continue from it, or --overwrite to start over")


def _check_finite(stats: dict, policy, step: int) -> None:
    """Stop on a non-finite loss, gradient norm or weight, before anything of this step is saved."""
    bad = [k for k in ("loss/policy", "loss/value", "grad_norm") if k in stats and not math.isfinite(stats[k])]
    if not bad and not all_finite(p for p in policy.parameters() if p.requires_grad):
        bad = ["weights"]
    if bad:
        shown = ", ".join(f"{k}={stats[k]}" if k in stats else k for k in bad)
        raise Diverged(f"step {step}: training diverged (non-finite {shown}); {_LAST_GOOD}")


def _any_process(acc, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a signal may reach processes at different times)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), "sum").item() > 0)


def _sync(engine, model) -> None:
    sync = getattr(engine, "sync_weights", None)
    if sync is not None:
        sync(model)


def _gmeans(acc, series: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each list over all processes' values, in one all-reduce. Every process must pass the
    same keys in the same order (a list may be empty on some)."""
    if not series:
        return {}
    t = torch.tensor([[sum(v), float(len(v))] for v in series.values()], dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        t = acc.reduce(t, "sum")
    return {k: (s / n if n > 0 else 0.0) for k, (s, n) in zip(series, t.tolist())}


def _save_checkpoint(acc, out: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int,
                     extra: dict | None = None, critic_model=None) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp = ckpt.begin(out, step)
    acc.wait_for_everyone()
    tmp = ckpt.tmp_dir(out, step)
    ckpt.save_process_state(tmp, acc.process_index)
    if acc.is_main_process:
        ckpt.save_main_state(tmp, model, tokenizer, optimizer, scheduler, state, extra)
        if critic_model is not None:
            critic_model.save_pretrained(tmp / "critic")
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.commit(out, step, keep)
    acc.wait_for_everyone()


def _last_eval(path: Path) -> dict:
    from rlkit.tracking import read_metrics

    last: dict = {}
    for row in read_metrics(path):
        ev = {k: v for k, v in row.items() if k.startswith("eval/")}
        if ev:
            last = ev
    return last


class _PtxStream:
    """PPO-ptx: demonstrations as full sequences for a language-modelling loss, in a fixed cycling order."""

    def __init__(self, rl, tokenizer, template: str, seed: int):
        from rlkit.data import sft_rows

        rows = sft_rows(rl.ptx_data)
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) if "messages" in r
                 else full_text(r["prompt"], r["completion"], template, tokenizer) for r in rows]
        self.ids = [tokenizer(x, add_special_tokens=False)["input_ids"][:512] for x in texts]
        self.batch, self.pad, self.pos = rl.ptx_batch_size, tokenizer.pad_token_id, 0
        self.order = torch.randperm(len(self.ids), generator=torch.Generator().manual_seed(seed)).tolist()

    def loss(self, model, device) -> torch.Tensor:
        seqs = [self.ids[self.order[(self.pos + i) % len(self.order)]] for i in range(self.batch)]
        self.pos += self.batch
        L = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), L), self.pad, dtype=torch.long)
        labels = torch.full((len(seqs), L), -100, dtype=torch.long)
        attn = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(x)] = torch.tensor(x)
            attn[i, : len(x)] = 1
        return model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device),
                     use_cache=False).loss


class _Progress:
    """A rich progress bar showing reward, accuracy, KL and length."""

    def __init__(self, total: int, start: int, label: str = "rl"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.prog = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)
        self.task = self.prog.add_task(label, total=total, completed=start, info="")
        self.prog.start()

    def update(self, step: int, m: dict) -> None:
        info = f"reward {m.get('reward', 0):.3f}"
        if "reward/accuracy" in m:
            info += f"  acc {m['reward/accuracy']:.2f}"
        if "eval/pass@1" in m:
            info += f"  eval {m['eval/pass@1']:.2f}"
        info += f"  kl {m.get('kl', 0):.4f}  len {m.get('completion_len', 0):.0f}"
        self.prog.update(self.task, completed=step, info=info)

    def note(self, text: str) -> None:
        self.prog.console.print(text)

    def close(self) -> None:
        self.prog.stop()
