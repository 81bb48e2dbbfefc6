"""The RL loop: ``run_rl`` and the run object whose ``fit`` calls one named, timed phase after another.

The set-up (``setup.py``) builds the models and a frozen ``Plan`` of the derived values; the update
(``update.py``) returns typed stats; collectives are in ``dist.py``, checkpoints and the export in
``export.py``. The package docstring (``rlkit.trainers.rl``) describes the phases and the papers.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path

import torch

from rlkit import checkpoint as ckpt
from rlkit import precision, runs
from rlkit.algos import (
    FixedKL,
    all_finite,
    compute_advantages,
    compute_kl,
    make_kl_controller,
    rollout_is_weights,
)
from rlkit.config import RunConfig
from rlkit.env.environments import EnvSource, load_env
from rlkit.env.episodes import check_template
from rlkit.errors import Diverged
from rlkit.evaluation import evaluate_model
from rlkit.models import load_tokenizer
from rlkit.reward_check import check_before_training
from rlkit.rollout import SamplingParams
from rlkit.scoring import RewardSet
from rlkit.tracking import MetricsLogger, PhaseTimer, StepProgress, console
from rlkit.trainers import sharding
from rlkit.weights import gathered
from rlkit.trainers.batch import RolloutBatch, completion_logprobs
from rlkit.trainers.critic import critic_values
from rlkit.trainers.rl import collect, dist, export, metrics, overlap, setup
from rlkit.trainers.rl.update import KL_CLAMP, UpdateStats, run_update


def run_rl(cfg: RunConfig, resume: str = "auto") -> dict:
    """Train (or resume) the run ``cfg`` describes; ``resume``: auto | anyway | overwrite (see rlkit.runs)."""
    # an environment, a tool or a reward that does not resolve is reported before anything else
    env = load_env(cfg.env) if cfg.env is not None else None
    rewards = RewardSet(cfg.rewards, env=env)
    with runs.guarded_run(cfg, resume, ckpt.last_checkpoint) as stop:
        return RLRun(cfg, stop, rewards, env).fit()


class RLRun:
    """One RL run: ``__init__`` sets it up (or restores it from the last checkpoint) in the order the random
    draws need; ``fit`` runs the loop, the rollout batch passed from phase to phase."""

    def __init__(self, cfg: RunConfig, stop: runs.GracefulStop, rewards: RewardSet, env: EnvSource | None = None):
        from accelerate.utils import set_seed

        self.t_start = time.time()
        self.cfg, self.stop, self.rewards, self.rl, self.t = cfg, stop, rewards, cfg.rl, cfg.train
        self.env = env  # multi-turn episodes (rlkit.env), or None: one turn
        self.fsdp = sharding.fsdp_options()  # FSDP2 from the accelerate config (sharding.py), or None
        setup.check_supported(cfg, self.fsdp)
        acc, bf16 = setup.build_accelerator(cfg)
        self.acc, self.precision = acc, "bf16" if bf16 else "fp32"
        self.rank, self.world, self.main = acc.process_index, acc.num_processes, acc.is_main_process
        setup.check_world(cfg, self.world)
        self.out = Path(cfg.output_dir)
        sharded = self.fsdp is not None

        # data: everything checked before a model loads
        self.tokenizer = tok = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        if env is not None:
            check_template(tok, env)  # the chat template renders a tool's reply (Gemma's, Phi-3's do not)
        prompts = setup.load_prompts(cfg, tok, rewards, env)
        if self.rl.reward_check and self.main and rewards.names != [getattr(env, "name", None)]:
            check_before_training(rewards, prompts.rows, cfg.data.template, tok)
        self.evals = setup.load_eval(cfg, tok, env)

        # models and optimizers; the random draws from here on are the run's (LoRA and critic heads, dropout)
        set_seed(cfg.train.seed)
        resume_from = ckpt.last_checkpoint(self.out)
        policy, ref = setup.build_policy(cfg, resume_from, reference=setup.needs_reference_copy(cfg),
                                         resolved=self.precision)
        self.plan = plan = setup.make_plan(cfg, self.world, prompts, self.evals, setup.has_dropout(policy), sharded)
        self.policy, self.optimizer, self.scheduler = setup.prepare(
            acc, policy, cfg.train.learning_rate, cfg.train, plan.optimizer_steps, self.fsdp, bf16)
        self.unwrapped = acc.unwrap_model(self.policy)
        self.ref_model = setup.place_reference(acc, ref, self.fsdp, bf16)
        self.critic = (setup.build_critic(cfg, acc, resume_from, tok.pad_token_id, plan.optimizer_steps, self.fsdp,
                                          bf16) if plan.critic else None)
        self.extra_state = ({"critic_optimizer": self.critic.optimizer, "critic_scheduler": self.critic.scheduler}
                            if self.critic is not None else {})
        ptx = self.rl.ptx
        self.ptx = setup.PtxStream(ptx, tok, cfg.data.template, cfg.train.seed) if ptx is not None else None
        # no KL: the coefficient stays 0 (logged as kl/coef, saved with the checkpoint like any controller)
        self.kl_ctl = make_kl_controller(self.rl.kl) if self.rl.kl is not None else FixedKL(0.0)
        self.stream = setup.PromptStream(prompts.rows, cfg.train.seed)

        # resume, or seed a fresh run
        self.step, self.history, self.data_pos = 0, {}, 0
        if resume_from is not None:
            self._restore(resume_from)
        else:
            torch.manual_seed(cfg.train.seed * 1009 + self.rank)
            random.seed(cfg.train.seed * 1009 + self.rank)
            if self.main and self.out.exists():
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if self.evals is None and self.main and "before" not in self.history and cfg.eval.task == "auto":
            console.print("[yellow]no evaluation: set data.eval to a held-out split of your data to get before/after "
                          "pass@1[/]")

        # the rollout engine, logging
        self.engine = setup.build_engine(cfg, plan, tok, self.unwrapped, acc, sharded)
        self.params = SamplingParams(n=self.rl.num_generations, max_new_tokens=self.rl.max_new_tokens,
                                     temperature=self.rl.temperature, top_p=self.rl.top_p)
        self.logger = MetricsLogger(self.out, cfg.report_to, run_name=cfg.name,
                                    config=cfg.model_dump(mode="json")) if self.main else None
        self.timer = PhaseTimer()
        self.ahead: overlap.RolloutAhead | None = None  # asynchronous rollouts, while fit runs

    def _restore(self, resume_from) -> None:
        lr = self.t.learning_rate
        state = export.restore(resume_from, self.out, self.acc, self.optimizer, self.scheduler, self.extra_state, lr,
                               critic=self.critic,
                               critic_lr=(self.rl.advantage.value_learning_rate or lr) if self.critic else lr,
                               sharded=self.fsdp is not None)
        self.step, self.stream.pos, self.history = state["step"], state["data_pos"], state.get("history", {})
        self.data_pos = self.stream.pos
        if self.ptx is not None:
            self.ptx.pos = state.get("ptx_pos", 0)
        self.kl_ctl.load_state_dict(state["kl_controller"])

    # ----------------------------------------------------------------------------------- the loop

    def fit(self) -> dict:
        if "before" not in self.history:
            self.history["before"] = self.evaluate()
            if self.logger is not None and self.history["before"]:
                self.logger.log(self.step, self.history["before"])
        self.acc.wait_for_everyone()
        self.progress = (StepProgress(self.plan.max_steps, self.step, self.cfg.kind, metrics.PROGRESS_FIELDS,
                                      metrics.PROGRESS_REQUIRED) if self.main else None)
        self.policy.train()
        # rollout.max_staleness 1: the next batch is generated while this one trains (overlap.py)
        self.ahead = ahead = overlap.RolloutAhead(self.collect, self.step) if self.plan.async_rollouts else None
        try:
            if ahead is not None:
                ahead.start(self.step)
            while self.step < self.plan.max_steps:
                step_t0 = time.time()
                if ahead is None:
                    batch = self.collect(version=self.step)  # rollout + reward (+ dynamic sampling)
                    self.engine.sleep()          # the update gets the engine's memory
                else:                            # generated during the last update; the next one starts now
                    batch = ahead.take()
                    self.data_pos = batch.info.stream_pos
                    if self.step + 1 < self.plan.max_steps:
                        ahead.start(self.step)
                self.logprobs(batch)             # old (when needed) and reference log-probs
                self.values(batch)               # critic values (when the advantage estimator reads them)
                self.advantages(batch)
                stats = self.update(batch)
                check_finite(self.acc, stats, self.policy, self.step + 1)
                with ahead.idle() if ahead is not None else contextlib.nullcontext():
                    self.sync()                  # the engine samples from the new weights
                self.step += 1
                row = self.log(batch, stats, step_t0)
                row.update(self.periodic_eval())
                self.write(row, batch)
                self.checkpoint()
        finally:
            if ahead is not None:
                ahead.close()
            if self.progress is not None:
                self.progress.close()
        return self.finish()

    @property
    def env_eval(self):
        """What evaluate_model needs for whole episodes (None: one turn)."""
        return (self.env, self.cfg.env) if self.env is not None else None

    # --------------------------------------------------------------------------------- the phases

    def sampling_precision(self):
        """Around generation on the training model (hf): one autocast for the whole generate call, so each
        weight is cast to bf16 once, not at every decoding step (accelerate autocasts each forward). Not with
        the static KV cache, which is allocated fp32 and refuses autocast's bf16 values."""
        static = getattr(self.cfg.rollout, "hf_cache", None) == "static"
        return precision.autocast(self.precision if not (self.plan.off_policy or static) else "fp32", self.acc.device)

    def collect(self, index: int | None = None, version: int | None = None) -> RolloutBatch:
        """Roll out and score one batch (``collect.collect``; ``index``/``version``: asynchronous rollouts)."""
        return collect.collect(self, index, version)

    def logprobs(self, batch: RolloutBatch) -> None:
        """The trainer's log-probs of the sampled tokens before this step's updates, when the update needs them
        before its own forward, and the truncated importance weights that correct for another sampler (else the
        update derives both from its forward: one pass over the batch less); the reference model's log-probs
        (beta > 0)."""
        rl, tis_cap = self.rl, self.plan.tis_cap
        self.policy.eval()
        with torch.no_grad(), precision.autocast(self.precision, self.acc.device):
            with self.timer("old_logprobs"):
                if self.plan.old_logprobs_pass:
                    batch.old_logp = chunked_logprobs(self.unwrapped, batch, rl, self.plan.logprob_chunk)
                if (self.plan.off_policy and batch.old_logp is not None and batch.sampler_logp is not None
                        and tis_cap is not None):
                    batch.is_weights = rollout_is_weights(batch.old_logp, batch.sampler_logp, batch.loss_mask, tis_cap,
                                                          rl.is_mode, rl.is_level)
            with self.timer("reference"):
                if self.plan.reference_logprobs:
                    if self.ref_model is not None:
                        batch.ref_logp = chunked_logprobs(self.ref_model, batch, rl, self.plan.logprob_chunk)
                    else:
                        with self.unwrapped.disable_adapter():
                            batch.ref_logp = chunked_logprobs(self.unwrapped, batch, rl, self.plan.logprob_chunk)
        self.policy.train()

    def values(self, batch: RolloutBatch) -> None:
        if self.critic is None:
            return
        with self.timer("values"), torch.no_grad(), precision.autocast(self.precision, self.acc.device):
            batch.values = in_chunks(batch, self.rl.micro_batch_size, lambda mb: critic_values(self.critic.model, mb))

    def advantages(self, batch: RolloutBatch) -> None:
        rl = self.rl
        with self.timer("advantage"):
            if rl.kl is not None and rl.kl.where == "reward" and batch.ref_logp is not None:
                batch.token_rewards = -self.kl_ctl.value * compute_kl(rl.kl.estimator, batch.old_logp, batch.ref_logp,
                                                                      clamp=KL_CLAMP) * batch.loss_mask
            batch.advantages, batch.returns = compute_advantages(
                rl.advantage, rewards=batch.rewards, mask=batch.loss_mask, group_ids=batch.group_ids,
                values=batch.values, token_rewards=batch.token_rewards)

    def update(self, batch: RolloutBatch) -> UpdateStats:
        with self.timer("update"):
            return run_update(self.policy, self.optimizer, self.scheduler, self.acc, batch, self.rl,
                              self.kl_ctl.value, critic=self.critic, ptx=self.ptx, tis_cap=self.plan.tis_cap,
                              logprob_chunk=self.plan.logprob_chunk)

    def sync(self) -> None:
        with self.timer("sync"):
            self.engine.wake()
            if self.main or not self.plan.shared_server:
                self.engine.sync_weights(self.unwrapped)
            else:
                dist.join_gather(self.fsdp is not None, self.unwrapped)
            if self.plan.shared_server:
                self.acc.wait_for_everyone()  # no process samples from the server before the new weights are in

    def log(self, batch: RolloutBatch, stats: UpdateStats, step_t0: float) -> dict:
        """This step's metrics, averaged (maxima: the largest) over processes in one all-reduce each; the KL
        controller reads the mean KL."""
        plan, info = self.plan, batch.info
        with self.timer("log"):
            trained = self.step - 1  # the weights the update started from (log runs after the step count moved)
            series = {**metrics.sample_series(batch, self.world, plan.off_policy, self.rl.is_mode, trained),
                      **{k: [v] for k, v in stats.metrics().items()}}
            reduced = dist.means(self.acc, series)
            maxima = {**stats.max_metrics(), **metrics.sample_maxes(batch, plan.off_policy, trained)}
            reduced.update(dist.maxes(self.acc, maxima))
            self.kl_ctl.update(reduced.get("kl/mean", 0.0), plan.batch_size * self.world)
            tokens = sum(len(s.token_ids) for s in batch.samples) * self.world
            return {
                **reduced,
                **metrics.route_metrics(batch.routes, info.rewards, batch.scores),
                "kl/coef": self.kl_ctl.value,
                "rollout/groups_kept_frac": info.groups_kept_frac,
                "rollout/rounds": info.rounds,
                "rollout/tokens_per_s": tokens / max(self.timer.times.get("rollout", 1e-9), 1e-9),
                "optim/lr": self.scheduler.get_last_lr()[0],
                "time/step": time.time() - step_t0,
                # asynchronous: what the trainer waited for the batch generated during the last update
                **({"time/rollout_wait": self.ahead.pop_waited()} if self.ahead is not None else {}),
            }

    def periodic_eval(self) -> dict:
        """Every rl.eval_steps and at the last step."""
        if self.step % self.rl.eval_steps and self.step != self.plan.max_steps:
            return {}
        self.acc.wait_for_everyone()
        with self.timer("eval"):
            return self.evaluate()

    def write(self, row: dict, batch: RolloutBatch) -> None:
        """The step's row (with the phase timers) to the metric sinks and the progress bar (main process)."""
        row.update(self.timer.pop())
        if not self.main:
            return
        self.logger.log(self.step, row)
        self.progress.update(self.step, row)
        if self.rl.log_completions and (self.step % self.t.logging_steps == 0 or self.step == 1):
            first = batch.samples[0]
            shown = (" | ".join(f"{m['role']}: {m['content']}" for m in first.episode.messages)
                     if first.episode is not None else first.text)  # an episode: every turn, the tools' too
            self.progress.note(f"[dim]step {self.step} sample (reward {batch.info.rewards[0]:.2f}):[/] {shown[:300]!r}")

    def checkpoint(self) -> None:
        """Save every ``train.save_steps``, at the end, and when a signal asked to stop (then stop)."""
        stopping = dist.any_process(self.acc, self.stop.requested is not None)
        step = self.step
        if step % self.t.save_steps == 0 or step == self.plan.max_steps or stopping:
            pos = self.data_pos if self.plan.async_rollouts else self.stream.pos  # not the batch in flight's
            state = export.loop_state(step, pos, self.kl_ctl, self.history, self.plan.max_steps, self.ptx)
            export.save_checkpoint(self.acc, self.out, step, self.unwrapped, self.tokenizer, self.optimizer,
                                   self.scheduler, state, self.t.save_total_limit, self.extra_state,
                                   self.acc.unwrap_model(self.critic.model) if self.critic is not None else None,
                                   sharded=self.fsdp is not None)
        if stopping:
            raise self.stop.interrupted(f"saved {self.out / f'checkpoint-{step}'}")

    def evaluate(self) -> dict:
        """Held-out pass@1 on the main process, with the rollout engine (vLLM holds the synced weights).
        Sharded: every process evaluates its share of the rows on the gathered weights, and the shares'
        metrics are combined (a forward that only the main process ran would leave FSDP's state unlike the
        others')."""
        if self.evals is None or not (self.main or self.fsdp is not None):
            return {}
        rows, template = self.evals.rows, self.evals.template
        engine = self.engine if self.plan.off_policy else None  # hf: a fresh engine at the eval batch size
        if self.fsdp is None:
            with self.sampling_precision():
                rep = evaluate_model(self.unwrapped, self.tokenizer, rows, self.cfg.eval, template, engine=engine,
                                     env=self.env_eval)
            return {f"eval/{k}": v for k, v in rep.metrics.items() if k not in ("n_prompts",)}
        share = rows[self.rank :: self.world]
        with gathered(self.policy) if self.plan.gather_weights else contextlib.nullcontext(), self.sampling_precision():
            rep = evaluate_model(self.unwrapped, self.tokenizer, share or rows[:1], self.cfg.eval, template,
                                 engine=engine, env=self.env_eval)
        combined = dist.combine_shares(self.acc, rep.metrics, len(share))
        return {f"eval/{k}": v for k, v in combined.items() if k not in ("n_prompts",)} if self.main else {}

    def finish(self) -> dict:
        """The final Hugging Face directory, the critic, the before/after table, the plot and the model card."""
        self.acc.wait_for_everyone()
        result: dict = {"steps": self.step, "processes": self.world}
        export.export_final(self.acc, self.out, self.cfg, self.policy, self.unwrapped, self.tokenizer, self.critic,
                            sharded=self.fsdp is not None)
        if self.main:
            export.write_result(self.out, self.cfg, self.logger, result, self.history, self.t_start, metrics.PLOT_KEYS)
        self.acc.wait_for_everyone()
        self.engine.close()  # before the process group goes: vLLM tears down its own groups in it
        self.acc.end_training()
        return result


# ------------------------------------------------------------------------------------- helpers


def in_chunks(batch: RolloutBatch, size: int, fn) -> torch.Tensor:
    """``fn`` over micro-batches of ``size`` samples, concatenated: [B, T]."""
    B = batch.input_ids.shape[0]
    return torch.cat([fn(batch.select(torch.arange(i, min(B, i + size), device=batch.input_ids.device)))
                      for i in range(0, B, size)])


def chunked_logprobs(model, batch: RolloutBatch, rl, chunk: int | None) -> torch.Tensor:
    return in_chunks(batch, rl.micro_batch_size, lambda mb: completion_logprobs(
        model, mb, rl.temperature, chunk_tokens=chunk, top_p=rl.top_p, packed=rl.padding_free)[0])


_LAST_GOOD = collect.LAST_GOOD


def check_finite(acc, stats: UpdateStats, policy, step: int) -> None:
    """Stop on a non-finite loss, gradient norm or weight, before anything of this step is saved; every
    process stops when any finds one (FSDP2: each checks its own shard of the weights, no collective)."""
    values = stats.finite_check()
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if not bad and not all_finite(dist.local(p) for p in policy.parameters() if p.requires_grad):
        bad = ["weights"]
    if dist.any_process(acc, bool(bad)) and not bad:
        bad = ["weights or losses on another process"]
    if bad:
        shown = ", ".join(f"{k}={values[k]}" if k in values else k for k in bad)
        raise Diverged(f"step {step}: training diverged (non-finite {shown}); {_LAST_GOOD}")
