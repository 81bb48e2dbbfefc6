"""The RL loop: GRPO (and, with a value model, PPO) as configurations of one loop with named, timed phases.

    collect   → engine.generate(prompt ids, n); rewards;    RolloutBatch: token ids, masks, sampler log-probs,
                dynamic sampling refills the batch          rewards (time/rollout, time/reward)
    logprobs  → old policy log-probs, truncated IS weights, only when the config needs them (time/reference)
                reference log-probs
    values    → critic values                               only when rl.advantage reads values (gae)
    advantage → ADVANTAGES[rl.advantage](...)               gae | grpo | dr_grpo | rloo | reinforce_pp
    update    → num_iterations × mini-batches of POLICY_LOSSES[rl.policy_loss] (+ KL in the loss, + value loss)
    sync      → engine.wake(); engine.sync_weights(policy)  a no-op for the hf engine (it samples the policy)
    log       → metrics.jsonl / TensorBoard, progress bar, periodic eval; then an atomic checkpoint

GRPO (Shao et al. 2024) with the DAPO options (Yu et al. 2025): clip-higher (``epsilon_high``), token-mean
loss aggregation, dynamic sampling (groups whose rewards are all equal are dropped and the batch is
refilled with fresh prompts) and overlong filtering. Departures from the paper: the KL term is optional
(``beta: 0`` loads no reference model) and can go into the reward per token instead of the loss.

When the sampler is not the trainer (``rollout.engine: vllm``) the old log-probs are always recomputed by
the trainer, and truncated importance sampling (Yao et al. 2025) weights each token's policy loss by
``min(pi_trainer / pi_sampler, rollout.tis_cap)``; ``rollout/logprob_diff`` and ``rollout/is_*`` show the gap.

The loop runs under accelerate from the first line: one process on CPU, or ``accelerate launch
--num_processes N`` for DDP on CPUs (gloo) or GPUs; each process rolls out its share of the prompts (with
vLLM, on its own engine).

    rlkit grpo --recipe r1_zero                                   # the embedded world, ~3 minutes on 2 cores
    rlkit grpo --recipe r1_zero --set rollout.engine=vllm         # vLLM in the training process
    rlkit grpo --model Qwen/Qwen2.5-0.5B --dataset math.jsonl
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from rlkit import checkpoint as ckpt
from rlkit import runs
from rlkit.algos import (
    NEEDS_VALUES,
    AdvantageConfig,
    aggregate,
    all_finite,
    PolicyLossConfig,
    compute_advantages,
    compute_kl,
    compute_policy_loss,
    make_kl_controller,
    masked_mean,
    truncated_is_weights,
    value_loss,
)
from rlkit.config import ConfigError, RunConfig
from rlkit.data import DataError, check_lengths, rl_rows
from rlkit.errors import Diverged
from rlkit.evaluation import check_eval_rows, eval_rows, eval_spec, evaluate_model
from rlkit.models import context_length, load_causal_lm, load_tokenizer, lora_targets
from rlkit.outputs import finish_run
from rlkit.rollout import SamplingParams, make_engine
from rlkit.rollout.vllm import full_weights
from rlkit.reward_check import check_before_training
from rlkit.scoring import RewardSet, score_groups
from rlkit.templates import apply_chat, full_text, render_prompt, render_rows
from rlkit.tracking import MetricsLogger, console, truncate_metrics
from rlkit.trainers import sharding
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


def _loss_count(mode: str, mask: torch.Tensor) -> torch.Tensor:
    """What an aggregation divides by: completion tokens (token_mean), non-empty sequences (the seq_mean
    modes) or sequences (the constant-normalised modes)."""
    if mode == "token_mean":
        return mask.sum()
    if mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return (mask.sum(-1) > 0).sum()
    return torch.tensor(mask.shape[0], device=mask.device)


def _global_count(acc, mode: str, mini_mask: torch.Tensor) -> float:
    """A mini-batch's normaliser summed over every process: the loss is normalised by the global count (as
    verl's agg_loss), not by each process's own, so that a process with more tokens weighs more."""
    n = _loss_count(mode, mini_mask).to(torch.float64)
    if acc.num_processes > 1:
        import torch.distributed as dist

        dist.all_reduce(n)
    return max(float(n), 1.0)


def _loss_weight(mode: str, micro_mask: torch.Tensor, total: float, world: int = 1) -> float:
    """Share of the global mini-batch normaliser ``total`` that one micro-batch carries, times the number of
    processes (the gradient all-reduce averages over processes): accumulated micro-batch losses of every
    process then add up to the loss of the whole mini-batch as one process would compute it."""
    return float(_loss_count(mode, micro_mask)) * world / total


KL_CLAMP = 20.0  # bound on |log pi - log pi_ref| before a KL estimator (verl's choice): exp() stays finite


def run_rl(cfg: RunConfig, resume: str = "auto") -> dict:
    """Train (or resume) the run ``cfg`` describes; ``resume``: auto | anyway | overwrite (see rlkit.runs)."""
    rewards = RewardSet(cfg.rewards)  # a reward that does not resolve is reported before anything else
    with runs.guarded_run(cfg, resume, ckpt.last_checkpoint) as stop:
        return RLRun(cfg, stop, rewards).fit()


class RLRun:
    """One RL run: ``__init__`` sets everything up (or restores it from the last checkpoint); ``fit`` runs
    the loop, one named phase per method, the rollout batch passed from phase to phase."""

    def __init__(self, cfg: RunConfig, stop: runs.GracefulStop, rewards: RewardSet):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.t_start = time.time()
        self.cfg, self.stop, self.rewards = cfg, stop, rewards
        rl, t = cfg.rl, cfg.train
        self.rl, self.t = rl, t
        cuda = torch.cuda.is_available()
        bf16 = t.bf16 if t.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
        self.fsdp = sharding.fsdp_options()  # FSDP2 from the accelerate config (sharding.py), or None
        if self.fsdp is not None and cfg.model.lora is not None:
            raise ConfigError("model.lora: LoRA under FSDP is not supported by the RL loop yet; use the ddp config "
                              "(the adapter is small) or full fine-tuning under fsdp2")
        if self.fsdp is not None and rl.logprob_chunk is not None:
            raise ConfigError("rl.logprob_chunk: not supported under FSDP (it reads the LM head's weight outside the "
                              "forward, where FSDP2 holds only a shard); leave it unset")
        self.bf16 = bf16
        self.acc = acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")
        self.rank, self.world, self.main = acc.process_index, acc.num_processes, acc.is_main_process
        self.out = out = Path(cfg.output_dir)
        if rl.prompts_per_step % self.world:
            raise DataError(f"rl.prompts_per_step ({rl.prompts_per_step}) must be divisible by the {self.world} processes")
        self.per_proc = rl.prompts_per_step // self.world
        self.B = self.per_proc * rl.num_generations
        # The sampler is not the trainer (vLLM): old log-probs are recomputed and importance-weighted.
        self.off_policy = cfg.rollout.engine != "hf"

        # data
        self.tokenizer = tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        self.context = context_length(cfg.model.path, cfg.model.trust_remote_code)
        self.longest_prompt = 0
        rows = rl_rows(cfg.data, check=self._fits)
        rewards.check_routes(rows)
        if rl.reward_check and self.main:
            check_before_training(rewards, rows, cfg.data.template, tokenizer)
        self.max_steps = t.max_steps or max(1, math.ceil(t.epochs * len(rows) / rl.prompts_per_step))
        self.stream = PromptStream(rows, t.seed)

        # models and optimizers
        set_seed(t.seed)
        resume_from = ckpt.last_checkpoint(out)
        self._build_policy(resume_from)
        n_minibatches = math.ceil(self.B / (rl.mini_batch_size or self.B))
        # A separate pass for the old log-probs only when the update cannot take them from its own forward: it
        # updates more than once per batch, the KL goes into the reward, or (with another sampler, whose tokens
        # are importance-weighted) dropout would make the update's forward differ from the policy that sampled.
        self.need_old_logp = (rl.num_iterations > 1 or n_minibatches > 1 or (rl.kl_in == "reward" and rl.beta > 0)
                              or (self.off_policy and _has_dropout(self.policy)))
        opt_steps = self.max_steps * rl.num_iterations * n_minibatches
        if self.fsdp is not None:  # shard first: the optimizer is built on the shards
            self.policy = sharding.shard(self.policy.to(acc.device), self.fsdp, bf16)
            self.optimizer, self.scheduler = self._optimizer(self.policy, t.learning_rate, opt_steps)
        else:
            self.optimizer, self.scheduler = self._optimizer(self.policy, t.learning_rate, opt_steps)
            self.policy, self.optimizer = acc.prepare(self.policy, self.optimizer)
        self.unwrapped = acc.unwrap_model(self.policy)
        if self.ref_model is not None:
            self.ref_model.to(acc.device)
            if self.fsdp is not None:
                sharding.shard(self.ref_model, self.fsdp, bf16)
        self.critic: Critic | None = None
        if rl.advantage in NEEDS_VALUES:  # a critic exactly when the advantage estimator reads values
            self.critic = self._build_critic(resume_from, opt_steps)
        self.extra_state = ({"critic_optimizer": self.critic.optimizer, "critic_scheduler": self.critic.scheduler}
                            if self.critic is not None else {})
        self.ptx = _PtxStream(rl, tokenizer, cfg.data.template, t.seed) if rl.ptx_coef > 0 else None
        self.kl_ctl = make_kl_controller(rl.kl_controller, rl.beta, target=rl.kl_target, horizon=rl.kl_horizon)

        # resume, or seed a fresh run
        self.step, self.history = 0, {}
        if resume_from is not None:
            self._restore(resume_from)
        else:
            torch.manual_seed(t.seed * 1009 + self.rank)
            random.seed(t.seed * 1009 + self.rank)
            if self.main and out.exists():
                (out / "metrics.jsonl").unlink(missing_ok=True)

        # evaluation data, the rollout engine, logging
        self.eval_template = cfg.eval.template or cfg.data.template
        spec = eval_spec(cfg)
        self.eval_data = eval_rows(cfg.eval, spec, cfg.data)[1] if spec else None
        if self.eval_data:
            check_eval_rows(self.eval_data, spec, self.eval_template, tokenizer, cfg.model.path, cfg.eval.max_new_tokens)
        if self.eval_data is None and self.main and "before" not in self.history and cfg.eval.task == "auto":
            console.print("[yellow]no evaluation: set data.eval to a held-out split of your data to get before/after "
                          "pass@1[/]")
        self.engine = self._build_engine()
        self.params = SamplingParams(n=rl.num_generations, max_new_tokens=rl.max_new_tokens,
                                     temperature=rl.temperature, top_p=rl.top_p)
        self.logger = MetricsLogger(out, cfg.report_to, run_name=cfg.name,
                                    config=cfg.model_dump(mode="json")) if self.main else None
        self.timer = PhaseTimer()

    # ------------------------------------------------------------------------------------- set-up

    def _fits(self, spec: str, source_rows: list[dict]) -> list[dict]:
        """Rows the rewards can score (gold answers checked), whose prompts leave room for
        rl.max_new_tokens in the model's context."""
        rl, tok = self.rl, self.tokenizer
        self.rewards.check_rows(source_rows, spec)
        texts = render_rows([r["prompt"] for r in source_rows], self.cfg.data.template, tok, spec)
        lengths = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
        if self.context is None:
            self.longest_prompt = max([self.longest_prompt, *lengths])
            return source_rows
        kept = check_lengths(source_rows, lengths, self.context - rl.max_new_tokens, spec, self.cfg.data.on_overlong,
                             f"which with rl.max_new_tokens {rl.max_new_tokens} exceeds the model's context of "
                             f"{self.context} tokens")
        self.longest_prompt = max([self.longest_prompt, *(n for n in lengths if n <= self.context - rl.max_new_tokens)])
        return kept

    def _build_policy(self, resume_from: Path | None) -> None:
        cfg, rl = self.cfg, self.rl
        policy = load_causal_lm(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code)
        self.ref_model = None
        if cfg.model.lora is not None:
            from peft import LoraConfig, PeftModel, get_peft_model

            lc = cfg.model.lora
            if resume_from is not None:
                policy = PeftModel.from_pretrained(policy, str(resume_from), is_trainable=True)
            else:
                policy = get_peft_model(policy, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                           target_modules=lora_targets(policy, lc.target_modules),
                                                           task_type="CAUSAL_LM"))
        else:
            if rl.beta > 0:  # beta 0: no KL anywhere, so no reference model
                self.ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
            if resume_from is not None:
                policy = load_causal_lm(str(resume_from), cfg.model.dtype, cfg.model.trust_remote_code)
        if self.t.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        policy.config.use_cache = True
        self.policy = policy

    def _optimizer(self, model, lr: float, opt_steps: int):
        from transformers import get_scheduler

        t = self.t
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=t.weight_decay)
        sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=int(t.warmup_ratio * opt_steps),
                              num_training_steps=opt_steps)
        return opt, sched

    def _build_critic(self, resume_from: Path | None, opt_steps: int) -> Critic:
        cfg, rl = self.cfg, self.rl
        critic = load_critic(str(resume_from / "critic") if resume_from is not None else rl.value_model,
                             cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code)
        critic.model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.fsdp is not None:
            critic = sharding.shard(critic.to(self.acc.device), self.fsdp, self.bf16)
            opt, sched = self._optimizer(critic, rl.value_learning_rate or self.t.learning_rate, opt_steps)
        else:
            opt, sched = self._optimizer(critic, rl.value_learning_rate or self.t.learning_rate, opt_steps)
            critic, opt = self.acc.prepare(critic, opt)
        return Critic(critic, opt, sched)

    def _restore(self, resume_from: Path) -> None:
        state = ckpt.load_state(resume_from, self.rank, self.optimizer, self.scheduler, self.extra_state,
                                world=self.world if self.fsdp is not None else None)
        ckpt.apply_learning_rate(self.optimizer, self.scheduler, self.t.learning_rate)  # --resume-anyway, new rate
        if self.critic is not None:
            ckpt.apply_learning_rate(self.critic.optimizer, self.critic.scheduler,
                                     self.rl.value_learning_rate or self.t.learning_rate)
        self.step, self.stream.pos, self.history = state["step"], state["data_pos"], state.get("history", {})
        if self.ptx is not None:
            self.ptx.pos = state.get("ptx_pos", 0)
        self.kl_ctl.load_state_dict(state["kl_controller"])
        if self.main:
            print(f"resuming from {resume_from} (step {self.step})", flush=True)
            truncate_metrics(self.out / "metrics.jsonl", self.step)

    def _build_engine(self):
        """The configured rollout engine, sampling from the policy's current weights."""
        cfg, rl = self.cfg, self.rl
        longest = self.longest_prompt + max(rl.max_new_tokens, cfg.eval.max_new_tokens)
        longest_prompt = self.longest_prompt
        if self.eval_data:
            ids = self.tokenizer([render_prompt(r["prompt"], self.eval_template, self.tokenizer)
                                  for r in self.eval_data], add_special_tokens=False)["input_ids"]
            longest = max(longest, max(len(x) for x in ids) + cfg.eval.max_new_tokens)
            longest_prompt = max(longest_prompt, max(len(x) for x in ids))
        # every process syncs its own engine; a server shared by all processes gets the main process's weights
        self.shared_server = cfg.rollout.engine == "vllm" and cfg.rollout.mode == "server"
        engine = make_engine(cfg.rollout, self.tokenizer, model=self.unwrapped if self.main or not self.shared_server
                             else None, model_path=cfg.model.path, max_batch=max(self.B, 1),
                             max_len=longest, seed=self.t.seed, dtype=cfg.model.dtype, max_prompt_len=longest_prompt)
        if self.shared_server:
            if not self.main:
                self._join_gather()
            self.acc.wait_for_everyone()  # the server holds the weights before any process samples
        return engine

    def _join_gather(self) -> None:
        """Under FSDP2, take part in the gathers of the main process's push to a shared server (it reads the
        weights one tensor at a time; each is a collective). Unsharded: nothing to do."""
        if self.fsdp is not None:
            for _ in full_weights(self.unwrapped):
                pass

    # ----------------------------------------------------------------------------------- the loop

    def fit(self) -> dict:
        if "before" not in self.history:
            self.history["before"] = self.evaluate()
            if self.logger is not None and self.history["before"]:
                self.logger.log(self.step, self.history["before"])
        self.acc.wait_for_everyone()
        self.progress = _Progress(self.max_steps, self.step, self.cfg.kind) if self.main else None
        self.policy.train()
        try:
            while self.step < self.max_steps:
                step_t0 = time.time()
                batch = self.collect()           # rollout + reward (+ dynamic sampling)
                self.engine.sleep()              # the update gets the engine's memory
                self.logprobs(batch)             # old (when needed) and reference log-probs
                self.values(batch)               # critic values (when the advantage estimator reads them)
                self.advantages(batch)
                stats = self.update(batch)
                _check_finite(self.acc, stats, self.policy, self.step + 1)
                self.sync()                      # the engine samples from the new weights
                self.step += 1
                self.log(batch, stats, step_t0)
                self.checkpoint()
        finally:
            if self.progress is not None:
                self.progress.close()
        return self.finish()

    # --------------------------------------------------------------------------------- the phases

    def collect(self) -> RolloutBatch:
        """Roll out ``per_proc`` prompts × G samples, score them, and (dynamic sampling) refill the batch with
        fresh prompts while groups whose rewards are all equal are dropped."""
        rl, tok = self.rl, self.tokenizer
        kept: list[dict] = []
        dropped: list[dict] = []
        rounds = 0
        failures: dict[str, int] = defaultdict(int)
        while True:
            prompts_rows = self.stream.take(rl.prompts_per_step)[self.rank * self.per_proc : (self.rank + 1) * self.per_proc]
            texts = [render_prompt(r["prompt"], self.cfg.data.template, tok) for r in prompts_rows]
            prompt_ids = tok(texts, add_special_tokens=False)["input_ids"]
            with self.timer("rollout"), sharding.gathered(self.policy) if not self.off_policy else contextlib.nullcontext():
                groups = _generate(self.engine, prompt_ids, self.params, self.step + 1)
            with self.timer("reward"):
                scored = score_groups(self.rewards, prompts_rows, texts, groups)
            G = rl.num_generations
            for gi, g in enumerate(groups):
                sl = slice(gi * G, (gi + 1) * G)
                group = {"prompt_ids": prompt_ids[gi], "samples": g, "totals": scored.total[sl],
                         "scores": {k: v[sl] for k, v in scored.per_reward.items()}, "route": prompts_rows[gi].get("route")}
                if rl.dynamic_sampling and len(set(group["totals"])) <= 1:
                    dropped.append(group)
                else:
                    kept.append(group)
            for k, v in scored.failures.items():
                failures[k] += v
            rounds += 1
            need = torch.tensor(float(rl.dynamic_sampling and len(kept) < self.per_proc), device=self.acc.device)
            if rounds > rl.max_resample_rounds or self.acc.reduce(need, "sum").item() == 0:
                break
        used = (kept + dropped)[: self.per_proc]

        prompt_ids, samples, gids, totals, routes = [], [], [], [], []
        scores: dict[str, list] = defaultdict(list)
        for gi, group in enumerate(used):
            routes.extend([group["route"]] * len(group["samples"]))
            for j, s in enumerate(group["samples"]):
                prompt_ids.append(group["prompt_ids"])
                samples.append(s)
                gids.append(gi)
                r = group["totals"][j] * rl.reward_scale
                totals.append(max(-rl.reward_clip, min(rl.reward_clip, r)) if rl.reward_clip else r)
            for k, v in group["scores"].items():
                scores[k].extend(v)
        batch = build_batch(prompt_ids, samples, gids, totals, tok.pad_token_id, rl.overlong_filter)
        batch.samples, batch.scores, batch.routes = samples, dict(scores), routes
        batch.info = {"rounds": rounds, "failures": dict(failures), "rewards": totals,
                      "groups_kept_frac": len(kept) / max(1, len(kept) + len(dropped)) if rl.dynamic_sampling else 1.0}
        return batch.to(self.acc.device)

    def logprobs(self, batch: RolloutBatch) -> None:
        """The trainer's log-probs of the sampled tokens before this step's updates, when the update needs them
        before its own forward; the truncated importance weights that correct for another sampler (else the
        update derives both from its forward: one pass over the batch less); the reference model's log-probs
        (beta > 0)."""
        rl = self.rl
        with self.timer("reference"):
            self.policy.eval()
            with torch.no_grad():
                if self.need_old_logp:
                    batch.old_logp = _chunked_logprobs(self.unwrapped, batch, rl)
                if (self.off_policy and batch.old_logp is not None and batch.sampler_logp is not None
                        and self.cfg.rollout.tis_cap is not None):
                    batch.is_weights = truncated_is_weights(batch.old_logp, batch.sampler_logp, self.cfg.rollout.tis_cap)
                if rl.beta > 0:
                    if self.ref_model is not None:
                        batch.ref_logp = _chunked_logprobs(self.ref_model, batch, rl)
                    else:
                        with self.unwrapped.disable_adapter():
                            batch.ref_logp = _chunked_logprobs(self.unwrapped, batch, rl)
            self.policy.train()

    def values(self, batch: RolloutBatch) -> None:
        if self.critic is None:
            return
        with self.timer("values"), torch.no_grad():
            batch.values = _in_chunks(batch, self.rl.micro_batch_size, lambda mb: critic_values(self.critic.model, mb))

    def advantages(self, batch: RolloutBatch) -> None:
        rl = self.rl
        with self.timer("advantage"):
            if rl.kl_in == "reward" and batch.ref_logp is not None:
                batch.token_rewards = -self.kl_ctl.value * compute_kl(rl.kl_estimator, batch.old_logp, batch.ref_logp,
                                                                      clamp=KL_CLAMP) * batch.completion_mask
            batch.advantages, batch.returns = compute_advantages(
                rl.advantage, rewards=batch.rewards, mask=batch.completion_mask, group_ids=batch.group_ids,
                values=batch.values, token_rewards=batch.token_rewards,
                cfg=AdvantageConfig(gamma=rl.gamma, lam=rl.lam, std_normalize=rl.std_normalize,
                                    whiten=rl.whiten_advantages))

    def update(self, batch: RolloutBatch) -> dict:
        with self.timer("update"):
            return _update(self.policy, self.optimizer, self.scheduler, self.acc, batch, self.rl, self.kl_ctl.value,
                           critic=self.critic, ptx=self.ptx, tis_cap=self.cfg.rollout.tis_cap)

    def sync(self) -> None:
        with self.timer("sync"):
            self.engine.wake()
            if self.main or not self.shared_server:
                self.engine.sync_weights(self.unwrapped)
            else:
                self._join_gather()
            if self.shared_server:
                self.acc.wait_for_everyone()  # no process samples from the server before the new weights are in

    def log(self, batch: RolloutBatch, stats: dict, step_t0: float) -> None:
        rl, step, samples, totals = self.rl, self.step, batch.samples, batch.info["rewards"]
        with self.timer("log"):
            series = {
                "reward": totals,
                **{f"reward/{k}": [x for x in v if x is not None] for k, v in sorted(batch.scores.items())},
                **{f"reward/{k}/failures": [float(v) * self.world] for k, v in sorted(batch.info["failures"].items())},
                **{k: [v] for k, v in stats.items()},
                **({"reward/kl_penalty": batch.token_rewards.sum(-1).tolist()} if batch.token_rewards is not None else {}),
                **(_sampler_metrics(batch) if self.off_policy else {}),
                "completion_len": [len(s.token_ids) for s in samples],
                "truncated_frac": [float(not s.finished) for s in samples],
            }
            reduced = _gmeans(self.acc, series)  # one all-reduce for every averaged metric
            if self.off_policy and batch.is_weights is not None:
                reduced["rollout/is_weight_max"] = _gmax(self.acc, _masked_max(batch.is_weights, batch.completion_mask))
            self.kl_ctl.update(reduced.get("kl", 0.0), self.B * self.world)
            metrics = {
                **reduced,
                **_route_metrics(batch.routes, totals, batch.scores),
                "beta": self.kl_ctl.value,
                "groups_kept_frac": batch.info["groups_kept_frac"],
                "rollout_rounds": batch.info["rounds"],
                "lr": self.scheduler.get_last_lr()[0],
                "step_seconds": time.time() - step_t0,
                "completion_tokens_per_s": sum(len(s.token_ids) for s in samples) * self.world
                / max(self.timer.times.get("rollout", 1e-9), 1e-9),
            }
            if step % rl.eval_steps == 0 or step == self.max_steps:
                self.acc.wait_for_everyone()
                metrics.update(self.evaluate())
            metrics.update(self.timer.pop())
            if self.main:
                self.logger.log(step, metrics)
                self.progress.update(step, metrics)
                if rl.log_completions and (step % self.t.logging_steps == 0 or step == 1):
                    self.progress.note(f"[dim]step {step} sample (reward {totals[0]:.2f}):[/] {samples[0].text[:200]!r}")

    def checkpoint(self) -> None:
        """Save every ``train.save_steps``, at the end, and when a signal asked to stop (then stop)."""
        stopping = _any_process(self.acc, self.stop.requested is not None)
        step = self.step
        if step % self.t.save_steps == 0 or step == self.max_steps or stopping:
            state = {"step": step, "data_pos": self.stream.pos, "kl_controller": self.kl_ctl.state_dict(),
                     "history": self.history, "max_steps": self.max_steps, "ptx_pos": self.ptx.pos if self.ptx else 0}
            _save_checkpoint(self.acc, self.out, step, self.unwrapped, self.tokenizer, self.optimizer, self.scheduler,
                             state, self.t.save_total_limit, self.extra_state,
                             self.acc.unwrap_model(self.critic.model) if self.critic is not None else None,
                             sharded=self.fsdp is not None)
        if stopping:
            raise self.stop.interrupted(f"saved {self.out / f'checkpoint-{step}'}")

    def evaluate(self) -> dict:
        """Held-out pass@1 on the main process, with the rollout engine (vLLM holds the synced weights).
        Sharded: every process evaluates its share of the rows on the gathered weights, and the shares'
        metrics are combined (a forward that only the main process ran would leave FSDP's state unlike the
        others')."""
        if self.eval_data is None or not (self.main or self.fsdp is not None):
            return {}
        engine = self.engine if self.off_policy else None  # hf: a fresh engine at the eval batch size
        if self.fsdp is None:
            rep = evaluate_model(self.unwrapped, self.tokenizer, self.eval_data, self.cfg.eval, self.eval_template,
                                 engine=engine)
            return {f"eval/{k}": v for k, v in rep.metrics.items() if k not in ("n_prompts",)}
        rows = self.eval_data[self.rank :: self.world] or self.eval_data[:1]
        with sharding.gathered(self.policy) if not self.off_policy else contextlib.nullcontext():
            rep = evaluate_model(self.unwrapped, self.tokenizer, rows, self.cfg.eval, self.eval_template,
                                 engine=engine)
        metrics = _combine_shares(self.acc, rep.metrics, len(self.eval_data[self.rank :: self.world]))
        return {f"eval/{k}": v for k, v in metrics.items() if k not in ("n_prompts",)} if self.main else {}

    def finish(self) -> dict:
        """The final Hugging Face directory (merged with LoRA, the adapter beside it), the critic, the
        before/after table, the plot and the model card."""
        cfg, out, acc = self.cfg, self.out, self.acc
        acc.wait_for_everyone()
        result: dict = {"steps": self.step, "processes": self.world}
        if self.fsdp is not None:  # gathered on the main process (a collective), written below
            full_policy = sharding.full_state_dict(self.policy)
            full_critic = sharding.full_state_dict(self.critic.model) if self.critic is not None else None
        if self.main:
            if self.fsdp is not None:
                self.unwrapped.save_pretrained(str(out), state_dict=full_policy)
                if self.critic is not None:
                    self.critic.model.model.save_pretrained(str(out / "critic"), state_dict=_strip(full_critic, "model."))
            else:
                if cfg.model.lora is not None:
                    self.unwrapped.save_pretrained(str(out / "adapter"))  # the adapter first: merging folds it away
                final = self.unwrapped.merge_and_unload() if cfg.model.lora is not None else self.unwrapped
                final.save_pretrained(str(out))
                if self.critic is not None:
                    acc.unwrap_model(self.critic.model).model.save_pretrained(str(out / "critic"))
            self.tokenizer.save_pretrained(str(out))
            after = _last_eval(out / "metrics.jsonl")
            before = self.history.get("before", {})
            result.update({"before/" + k.removeprefix("eval/"): v for k, v in before.items() if "seconds" not in k})
            result.update({"after/" + k.removeprefix("eval/"): v for k, v in after.items() if "seconds" not in k})
            result["seconds"] = round(time.time() - self.t_start, 1)
            finish_run(out, cfg, self.logger, result, ["reward", "reward/accuracy", "eval/pass@1", "kl", "completion_len"],
                       stage=cfg.kind)
        acc.wait_for_everyone()
        self.engine.close()  # before the process group goes: vLLM tears down its own groups in it
        acc.end_training()
        return result


# ------------------------------------------------------------------------------------- helpers


def _in_chunks(batch: RolloutBatch, size: int, fn) -> torch.Tensor:
    """``fn`` over micro-batches of ``size`` samples, concatenated: [B, T]."""
    B = batch.input_ids.shape[0]
    return torch.cat([fn(batch.select(torch.arange(i, min(B, i + size), device=batch.input_ids.device)))
                      for i in range(0, B, size)])


def _chunked_logprobs(model, batch: RolloutBatch, rl) -> torch.Tensor:
    return _in_chunks(batch, rl.micro_batch_size, lambda mb: completion_logprobs(
        model, mb, rl.temperature, chunk_tokens=rl.logprob_chunk)[0])


@dataclass
class Critic:
    """The PPO value model with its own optimizer and schedule."""

    model: torch.nn.Module  # TokenCritic, prepared by accelerate
    optimizer: torch.optim.Optimizer
    scheduler: object


def _update(policy, optimizer, scheduler, acc, batch: RolloutBatch, rl, beta: float, critic: Critic | None = None,
            ptx=None, tis_cap: float | None = None) -> dict:
    """num_iterations passes over the batch in mini-batches; each mini-batch is one optimizer step made of
    micro-batches whose losses are weighted so that they add up to the mini-batch loss. ``batch.is_weights``
    (truncated importance sampling against the sampler) weights the policy loss per token.

    One pass in one mini-batch over a batch with sampler log-probs and no old ones (another sampler, no
    dropout): the old log-probs are this forward's (the weights have not moved yet); they and the importance
    weights ``min(pi_old / pi_sampler, tis_cap)`` are written into ``batch`` for the log phase."""
    B = batch.input_ids.shape[0]
    mini = rl.mini_batch_size or B
    fill_old = (batch.old_logp is None and batch.sampler_logp is not None and rl.num_iterations == 1 and mini >= B)
    config = acc.unwrap_model(policy).config.get_text_config()
    aux_coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    # MoE: the router's load-balancing loss whenever the family computes one and its coefficient is set, as TRL's
    # SFTTrainer adds it (whatever the config's output_router_logits, which the released configs leave off)
    router = aux_coef > 0 and hasattr(config, "output_router_logits")
    if fill_old:
        batch.old_logp = torch.zeros_like(batch.completion_mask)
        if tis_cap is not None:
            batch.is_weights = torch.ones_like(batch.completion_mask)
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
            total = _global_count(acc, rl.loss_aggregation, mini_mask)
            tokens = _global_count(acc, "token_mean", mini_mask)  # per-token metrics: the global token mean
            micro_chunks = list(range(0, len(mini_idx), rl.micro_batch_size))
            if ptx is not None:
                with _no_sync(acc, policy, False):
                    ptx_loss = ptx.loss(policy, acc.device)
                    acc.backward(rl.ptx_coef * ptx_loss)
                sums["loss/ptx"] += ptx_loss.detach()
            for ci, c0 in enumerate(micro_chunks):
                idx = mini_idx[c0 : c0 + rl.micro_batch_size]
                mb = batch.select(idx)
                last = ci == len(micro_chunks) - 1
                with _no_sync(acc, policy, last):
                    logp, ent, router_aux = completion_logprobs(policy, mb, rl.temperature, with_entropy=True,
                                                                chunk_tokens=rl.logprob_chunk, with_aux=True,
                                                                router_logits=router)
                    is_w = mb.is_weights
                    if fill_old:
                        old = logp.detach()
                        batch.old_logp[idx] = old
                        if tis_cap is not None:
                            is_w = batch.is_weights[idx] = truncated_is_weights(old, mb.sampler_logp, tis_cap)
                    else:
                        old = mb.old_logp if mb.old_logp is not None else logp.detach()
                    pl, pm = compute_policy_loss(rl.policy_loss, logp, old, mb.advantages, mb.completion_mask,
                                                 cfg=loss_cfg, is_weights=is_w)
                    loss = pl
                    kl_tok = None
                    if mb.ref_logp is not None:
                        kl_tok = compute_kl(rl.kl_estimator, logp, mb.ref_logp, clamp=KL_CLAMP)
                        if rl.kl_in == "loss" and beta > 0:
                            loss = loss + beta * aggregate(kl_tok, mb.completion_mask, rl.loss_aggregation,
                                                           float(rl.max_new_tokens))
                    if router_aux is not None:  # MoE load balancing, as the family's own training adds it
                        loss = loss + aux_coef * router_aux
                    w = _loss_weight(rl.loss_aggregation, mb.completion_mask, total, acc.num_processes)
                    acc.backward(loss * w)
                mask = mb.completion_mask
                wt = _loss_weight("token_mean", mask, tokens, acc.num_processes)
                sums["loss/policy"] += pl.detach() * w
                if router_aux is not None:
                    sums["loss/router_aux"] += router_aux.detach() * w
                sums["entropy"] += masked_mean(ent, mask) * wt
                for k in ("clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl"):
                    if k in pm:
                        sums[k] += pm[k].detach() * wt
                if kl_tok is not None:
                    sums["kl"] += masked_mean(kl_tok.detach(), mask) * wt
                if critic is not None:
                    with _no_sync(acc, critic.model, last):
                        v = critic_values(critic.model, mb)
                        vl, vm = value_loss(v, mb.values, mb.returns, mask, clip=rl.value_clip,
                                            aggregation=rl.loss_aggregation, constant=float(rl.max_new_tokens))
                        acc.backward(vl * w)
                    sums["loss/value"] += vl.detach() * w
                    for k in ("vf_clip_frac", "explained_variance", "value_mean"):
                        # every process must report the same keys; NaN (constant returns) counts as 0
                        sums[k] += torch.nan_to_num(torch.as_tensor(vm.get(k, 0.0), dtype=torch.float32).detach()) * w
            sums["grad_norm"] += _full(acc.clip_grad_norm_(policy.parameters(), rl.max_grad_norm)).detach()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if critic is not None:
                acc.clip_grad_norm_(critic.model.parameters(), rl.max_grad_norm)
                critic.optimizer.step()
                critic.scheduler.step()
                critic.optimizer.zero_grad(set_to_none=True)
            count += 1
    keys = list(sums)
    values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=acc.device).reshape(())
                          for k in keys]).div(count).tolist()
    return dict(zip(keys, values))


def _no_sync(acc, model, sync: bool):
    """Gradient synchronisation only when ``sync`` (the last micro-batch of an optimizer step)."""
    if sharding.is_sharded(model):
        return sharding.no_sync(model, sync)
    return contextlib.nullcontext() if sync else acc.no_sync(model)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (a sharded model's gradient norm) as the plain tensor it stands for."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _full_local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a sharded model's parameter), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _strip(state: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _combine_shares(acc, metrics: dict, n: int) -> dict:
    """Per-prompt means computed by each process on its share of ``n`` prompts, combined into the means over
    all prompts (weighted by ``n``); ``n_prompts`` summed, ``seconds`` the slowest share's."""
    import torch.distributed as dist

    keys = [k for k in metrics if k not in ("n_prompts", "seconds")]
    t = torch.tensor([metrics[k] * n for k in keys] + [float(n)], dtype=torch.float64, device=acc.device)
    dist.all_reduce(t)
    total = float(t[-1])
    out = {k: float(v) / max(total, 1.0) for k, v in zip(keys, t[:-1].tolist())}
    out["n_prompts"] = int(total)
    out["seconds"] = _gmax(acc, float(metrics.get("seconds", 0.0)))
    return out


def _has_dropout(model) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


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


def _generate(engine, prompt_ids: list[list[int]], params: SamplingParams, step: int):
    """Roll out; sampling from a model whose logits went non-finite means training diverged."""
    try:
        return engine.generate(prompt_ids, params)
    except RuntimeError as e:
        if "inf" in str(e) or "nan" in str(e):
            raise Diverged(f"step {step}: training diverged: the policy's probabilities are not finite "
                           f"({str(e).splitlines()[0]}); {_LAST_GOOD}") from None
        raise


_LAST_GOOD = ("the last good checkpoint is kept; lower train.learning_rate (or raise rl.beta) and run again "
              "with --resume-anyway to continue from it, or --overwrite to start over")


def _check_finite(acc, stats: dict, policy, step: int) -> None:
    """Stop on a non-finite loss, gradient norm or weight, before anything of this step is saved; every
    process stops when any finds one (FSDP2: each checks its own shard of the weights, no collective)."""
    bad = [k for k in ("loss/policy", "loss/value", "grad_norm") if k in stats and not math.isfinite(stats[k])]
    if not bad and not all_finite(_full_local(p) for p in policy.parameters() if p.requires_grad):
        bad = ["weights"]
    if _any_process(acc, bool(bad)) and not bad:
        bad = ["weights or losses on another process"]
    if bad:
        shown = ", ".join(f"{k}={stats[k]}" if k in stats else k for k in bad)
        raise Diverged(f"step {step}: training diverged (non-finite {shown}); {_LAST_GOOD}")


def _any_process(acc, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a signal may reach processes at different times)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), "sum").item() > 0)


def _gmeans(acc, series: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each list over all processes' values, in one all-reduce. Every process must pass the
    same keys in the same order (a list may be empty on some)."""
    if not series:
        return {}
    t = torch.tensor([[sum(v), float(len(v))] for v in series.values()], dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        t = acc.reduce(t, "sum")
    return {k: (s / n if n > 0 else 0.0) for k, (s, n) in zip(series, t.tolist())}


def _sampler_metrics(batch: RolloutBatch) -> dict[str, list[float]]:
    """How far the sampler's log-probs are from the trainer's (``rollout/logprob_diff``, mean |difference|
    per token) and what the truncated importance weights did (mean, share of tokens at the cap)."""
    if batch.sampler_logp is None or batch.old_logp is None:
        return {}
    mask = batch.completion_mask
    n = float(mask.sum())
    out = {"rollout/logprob_diff": [float(((batch.sampler_logp - batch.old_logp).abs() * mask).sum()) / max(n, 1.0)]}
    if batch.is_weights is not None:
        raw = torch.exp((batch.old_logp - batch.sampler_logp).clamp(max=20.0))
        out["rollout/is_weight_mean"] = [float((batch.is_weights * mask).sum()) / max(n, 1.0)]
        out["rollout/is_clipped_frac"] = [float(((raw > batch.is_weights) * mask).sum()) / max(n, 1.0)]
    return out


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(x.masked_fill(mask == 0, float("-inf")).max()) if mask.any() else 0.0


def _gmax(acc, value: float) -> float:
    """The largest of every process's ``value``."""
    if acc.num_processes == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor(value, dtype=torch.float64, device=acc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _save_checkpoint(acc, out: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int,
                     extra: dict | None = None, critic=None, sharded: bool = False) -> None:
    """``critic``: the TokenCritic (its classifier is saved). ``sharded``: FSDP2; the full model is gathered
    onto the main process for the Hugging Face export and each process writes its optimizer shard."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp = ckpt.begin(out, step)
    acc.wait_for_everyone()
    tmp = ckpt.tmp_dir(out, step)
    ckpt.save_process_state(tmp, acc.process_index)
    full = sharding.full_state_dict(model) if sharded else None
    full_critic = sharding.full_state_dict(critic) if sharded and critic is not None else None
    if sharded:
        ckpt.save_optimizer_shards(tmp, acc.process_index, optimizer, extra)
    if acc.is_main_process:
        ckpt.save_main_state(tmp, model, tokenizer, optimizer, scheduler, state, extra, state_dict=full,
                             sharded=sharded)
        if critic is not None:
            critic.model.save_pretrained(tmp / "critic", state_dict=_strip(full_critic, "model.") if sharded else None)
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
        texts = [apply_chat(tokenizer, r["messages"], generation_prompt=False) if "messages" in r
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
