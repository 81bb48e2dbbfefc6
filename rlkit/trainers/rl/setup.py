"""Set-up of an RL run: the data, the derived ``Plan``, and builders that return the models.

Every value the run derives from its config and its data is computed once, in ``make_plan``, from explicit
inputs (the prompt rows' count and longest prompt, the evaluation prompts', whether the policy has dropout),
and fenced in a frozen ``Plan``; nothing later re-derives one. The builders are functions of their
arguments that return what they build; the run calls them in the order their random draws must keep
(``set_seed``, then policy, LoRA, critic), see ``loop.RLRun.__init__``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlkit import precision
from rlkit.allocator import keep_freed_memory
from rlkit.config import ConfigError, RunConfig
from rlkit.data import DataError, check_lengths, rl_rows
from rlkit.evaluation import check_eval_rows, eval_rows, eval_spec
from rlkit.models import context_length, load_causal_lm, lora_targets
from rlkit.rollout import engine_spec, make_engine
from rlkit.scoring import RewardSet
from rlkit.sections import given
from rlkit.templates import apply_chat, full_text, render_prompt, render_rows
from rlkit.trainers import sharding
from rlkit.trainers.critic import load_critic
from rlkit.trainers.rl import dist
from rlkit.trainers.rl.update import Critic


def check_supported(cfg: RunConfig, fsdp) -> None:
    """What the loop refuses under FSDP2, before anything starts: LoRA, the chunked LM head."""
    if fsdp is not None and cfg.model.lora is not None:
        raise ConfigError("model.lora: LoRA under FSDP is not supported by the RL loop yet; use the ddp config "
                          "(the adapter is small) or full fine-tuning under fsdp2")
    if fsdp is not None and cfg.rl.logprob_chunk is not None and given(cfg.rl, "logprob_chunk"):
        raise ConfigError("rl.logprob_chunk: not supported under FSDP (it reads the LM head's weight outside the "
                          "forward, where FSDP2 holds only a shard); leave it unset")


def build_accelerator(cfg: RunConfig):
    """The Accelerator (CPU without CUDA; bf16 autocast when train.precision resolves to bf16:
    ``rlkit.precision``), and whether it is bf16."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    keep_freed_memory()  # on a CPU: no page faults for every step's activations (rlkit.allocator)
    bf16 = precision.for_model(cfg.train.precision, cfg.model.path, cfg.model.trust_remote_code) == "bf16"
    # An earlier stage in this process (a pipeline's SFT or reward model) may have left another precision in
    # accelerate's process-wide state; the process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no"), bf16


def check_world(cfg: RunConfig, world: int) -> None:
    """A prompt count the processes cannot share, or asynchronous rollouts on several processes (their
    collectives would interleave with the update's), are refused before anything loads."""
    if cfg.rl.prompts_per_step % world:
        raise DataError(f"rl.prompts_per_step ({cfg.rl.prompts_per_step}) must be divisible by the {world} processes")
    if world > 1 and getattr(cfg.rollout, "max_staleness", 0) > 0:
        raise DataError(f"rollout.max_staleness: asynchronous rollouts run on one process for now, not {world}; "
                        "set it to 0, or launch one process")


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class PromptData:
    rows: list[dict]     # the training prompts (every source, routes tagged), checked and filtered
    longest_prompt: int  # tokens of the longest rendered prompt kept


def completion_budget(cfg: RunConfig) -> int:
    """Tokens a rollout may add after its prompt: rl.max_new_tokens, or a whole episode's (env.max_tokens)."""
    return cfg.env.budget(cfg.rl.max_new_tokens) if cfg.env is not None else cfg.rl.max_new_tokens


def load_prompts(cfg: RunConfig, tokenizer, rewards: RewardSet, env=None) -> PromptData:
    """The training rows the rewards can score (gold answers checked, ``rewards.check_rows``), whose prompts
    leave room for rl.max_new_tokens (an episode's budget) in the model's context (too long: an error, or dropped
    with ``data.on_overlong: drop``), and the longest prompt kept (rendered with the environment's tools)."""
    context = context_length(cfg.model.path, cfg.model.trust_remote_code)
    budget = completion_budget(cfg)
    limit = None if context is None else context - budget
    kept_lengths: list[int] = []
    tools = env.schemas if env is not None else None
    what = (f"env.max_tokens {budget}" if cfg.env is not None and cfg.env.max_tokens else
            f"rl.max_new_tokens {cfg.rl.max_new_tokens}" + (f" × env.max_turns {cfg.env.max_turns}" if cfg.env else ""))

    def fits(spec: str, source_rows: list[dict]) -> list[dict]:
        rewards.check_rows(source_rows, spec)
        texts = render_rows([r["prompt"] for r in source_rows], cfg.data.template, tokenizer, spec, tools)
        lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        if limit is None:
            kept_lengths.extend(lengths)
            return source_rows
        kept = check_lengths(source_rows, lengths, limit, spec, cfg.data.on_overlong,
                             f"which with {what} exceeds the model's context of {context} tokens")
        kept_lengths.extend(n for n in lengths if n <= limit)
        return kept

    rows = rl_rows(cfg.data, check=fits)
    rewards.check_routes(rows)
    return PromptData(rows, max([0, *kept_lengths]))


@dataclass(frozen=True)
class EvalData:
    rows: list[dict]     # held-out prompts with gold answers
    template: str        # eval.template, else data.template
    longest_prompt: int  # tokens of the longest rendered prompt (0: no rows)


def eval_budget(cfg: RunConfig) -> int:
    """Tokens an evaluation rollout may add: eval.max_new_tokens, or a whole episode's."""
    return cfg.env.budget(cfg.eval.max_new_tokens) if cfg.env is not None else cfg.eval.max_new_tokens


def load_eval(cfg: RunConfig, tokenizer, env=None) -> EvalData | None:
    """The periodic evaluation's rows (``evaluation.eval_spec``: none for a user's data without data.eval),
    checked before any generation (``check_eval_rows``)."""
    spec = eval_spec(cfg)
    if not spec:
        return None
    rows = eval_rows(cfg.eval, spec, cfg.data)[1]
    template = cfg.eval.template or cfg.data.template
    longest = 0
    if rows:
        tools = env.schemas if env is not None else None
        check_eval_rows(rows, spec, template, tokenizer, cfg.model.path, eval_budget(cfg), tools)
        ids = tokenizer([render_prompt(r["prompt"], template, tokenizer, tools) for r in rows],
                        add_special_tokens=False)["input_ids"]
        longest = max(len(x) for x in ids)
    return EvalData(rows, template, longest)


# ------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Plan:
    """The run's derived values, computed once by ``make_plan`` (cleanrl's "filled in at runtime", fenced)."""

    world: int              # processes
    per_process: int        # prompts each process rolls out per step (rl.prompts_per_step / world)
    batch_size: int         # B: samples per process per step (per_process × rl.num_generations)
    mini_batch_size: int    # samples per optimizer step (rl.mini_batch_size, else B)
    n_minibatches: int      # optimizer steps per pass over the batch
    max_steps: int          # train.max_steps, else train.epochs over the prompts
    optimizer_steps: int    # max_steps × rl.num_iterations × n_minibatches: the schedules' length
    off_policy: bool        # the sampler is not the trainer (vLLM): old log-probs recomputed, importance-weighted
    tis_cap: float | None   # rl.tis_cap when off-policy (the truncated importance weights' cap), else None
    gather_weights: bool    # generation runs on the training model: FSDP2 gathers its weights around it (hf)
    shared_server: bool     # one vLLM server for every process: the main process pushes the weights
    reference_logprobs: bool  # rl.kl set: reference log-probs for the KL
    reference_copy: bool    # ... from a frozen copy of the base model (without LoRA; with it: adapter disabled)
    critic: bool            # the advantage estimator reads values (gae): a value model is trained
    old_logprobs_pass: bool  # old log-probs need a pass of their own before the update
    longest_prompt: int     # training prompts
    engine_max_len: int     # prompt + generation, training and evaluation alike
    engine_max_prompt_len: int
    async_rollouts: bool    # rollout.max_staleness 1: the next batch is generated during the update (overlap.py)
    logprob_chunk: int | None  # rl.logprob_chunk; None under FSDP2 (the LM head is sharded outside the forward)


def needs_reference_copy(cfg: RunConfig) -> bool:
    """No KL (rl.kl null): no reference; with LoRA the reference is the policy, adapter disabled."""
    return cfg.rl.kl is not None and cfg.model.lora is None


def make_plan(cfg: RunConfig, world: int, prompts: PromptData, evals: EvalData | None, policy_dropout: bool,
              sharded: bool = False) -> Plan:
    rl, t = cfg.rl, cfg.train
    per_process = rl.prompts_per_step // world
    B = per_process * rl.num_generations
    mini = rl.mini_batch_size or B
    n_minibatches = math.ceil(B / mini)
    max_steps = t.max_steps or max(1, math.ceil(t.epochs * len(prompts.rows) / rl.prompts_per_step))
    engine = engine_spec(cfg.rollout)
    off_policy = not engine.samples_itself
    # A separate pass for the old log-probs only when the update cannot take them from its own forward: it
    # updates more than once per batch, the KL goes into the reward, or (with another sampler, whose tokens
    # are importance-weighted) dropout would make the update's forward differ from the policy that sampled.
    old_pass = (rl.num_iterations > 1 or n_minibatches > 1 or (rl.kl is not None and rl.kl.where == "reward")
                or (off_policy and policy_dropout))
    max_len = prompts.longest_prompt + max(completion_budget(cfg), eval_budget(cfg))
    max_prompt = prompts.longest_prompt
    if evals is not None and evals.rows:
        max_len = max(max_len, evals.longest_prompt + eval_budget(cfg))
        max_prompt = max(max_prompt, evals.longest_prompt)
    return Plan(world=world, per_process=per_process, batch_size=B, mini_batch_size=mini,
                n_minibatches=n_minibatches, max_steps=max_steps,
                optimizer_steps=max_steps * rl.num_iterations * n_minibatches, off_policy=off_policy,
                tis_cap=rl.tis_cap if off_policy else None, gather_weights=engine.needs_gathered_weights,
                shared_server=engine.shared_across_processes,
                reference_logprobs=rl.kl is not None, reference_copy=needs_reference_copy(cfg),
                critic=rl.advantage.needs_values, old_logprobs_pass=old_pass,
                longest_prompt=prompts.longest_prompt, engine_max_len=max_len, engine_max_prompt_len=max_prompt,
                async_rollouts=getattr(cfg.rollout, "max_staleness", 0) > 0,
                logprob_chunk=None if sharded else rl.logprob_chunk)


# ---------------------------------------------------------------------------------------- models


def build_policy(cfg: RunConfig, resume_from: Path | None, reference: bool,
                 resolved: str = "fp32") -> tuple[torch.nn.Module, object]:
    """The policy (with a LoRA adapter when model.lora is set; the resumed weights when ``resume_from``) and,
    when ``reference``, a frozen copy of the base model. Trained weights are fp32 (master weights, whatever
    model.dtype loads; bf16 compute is autocast's); a frozen base under LoRA is held in bf16 when the run
    computes in bf16 on a GPU, else in fp32; the frozen reference in bf16 whenever the run computes in bf16
    (``precision.forward_only``). ``resolved``: the run's precision (``build_accelerator``'s)."""
    frozen = precision.frozen_dtype(resolved)
    policy = load_causal_lm(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code)
    policy = policy.to(frozen if cfg.model.lora is not None else torch.float32)
    precision.fp32_attention_on_cpu(policy, resolved)
    ref = None
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
        if reference:
            ref = precision.forward_only(copy.deepcopy(policy).eval().requires_grad_(False), resolved)
        if resume_from is not None:
            policy = load_causal_lm(str(resume_from), cfg.model.dtype, cfg.model.trust_remote_code).float()
            precision.fp32_attention_on_cpu(policy, resolved)
    if cfg.train.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.config.use_cache = True
    return policy, ref


def has_dropout(model) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def build_optimizer(model, lr: float, t, opt_steps: int):
    """AdamW over the trainable parameters and train.lr_scheduler over ``opt_steps`` optimizer steps. AdamW's
    fused kernel where every parameter is a plain fp32 tensor (not FSDP2's DTensor shards): on a CPU 0.08 s a
    step for SmolLM2-135M against the foreach loop's 0.40 s."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    plain = all(type(p.data) is torch.Tensor and p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay, **({"fused": True} if plain else {}))
    sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=int(t.warmup_ratio * opt_steps),
                          num_training_steps=opt_steps)
    return opt, sched


def prepare(acc, model, lr: float, t, opt_steps: int, fsdp, bf16: bool):
    """The model on the accelerator with its optimizer and schedule: sharded first under FSDP2 (the optimizer
    is built on the shards), else prepared by accelerate (DDP)."""
    if fsdp is not None:
        model = sharding.shard(model.to(acc.device), fsdp, bf16)
        opt, sched = build_optimizer(model, lr, t, opt_steps)
    else:
        opt, sched = build_optimizer(model, lr, t, opt_steps)
        model, opt = acc.prepare(model, opt)
    return model, opt, sched


def place_reference(acc, ref, fsdp, bf16: bool):
    """The frozen reference on the device (sharded like the policy under FSDP2)."""
    if ref is not None:
        ref.to(acc.device)
        if fsdp is not None:
            sharding.shard(ref, fsdp, bf16)
    return ref


def build_critic(cfg: RunConfig, acc, resume_from: Path | None, pad_token_id: int, opt_steps: int, fsdp,
                 bf16: bool) -> Critic:
    """The value model (rl.advantage.value_model, or the checkpoint's critic on resume) with its optimizer."""
    gae = cfg.rl.advantage
    critic = load_critic(str(resume_from / "critic") if resume_from is not None else gae.value_model,
                         cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code).float()  # fp32 masters
    critic.model.config.pad_token_id = pad_token_id
    precision.fp32_attention_on_cpu(critic.model, "bf16" if bf16 else "fp32")
    model, opt, sched = prepare(acc, critic, gae.value_learning_rate or cfg.train.learning_rate, cfg.train,
                                opt_steps, fsdp, bf16)
    return Critic(model, opt, sched)


def build_engine(cfg: RunConfig, plan: Plan, tokenizer, model, acc, sharded: bool):
    """The configured rollout engine, sampling from ``model``'s current weights. Every process syncs its own
    engine; a server shared by all processes gets the main process's weights."""
    main = acc.is_main_process
    engine = make_engine(cfg.rollout, tokenizer, model=model if main or not plan.shared_server else None,
                         model_path=cfg.model.path, max_batch=max(plan.batch_size, 1), max_len=plan.engine_max_len,
                         seed=cfg.train.seed, dtype=cfg.model.dtype, max_prompt_len=plan.engine_max_prompt_len)
    if plan.shared_server:
        if not main:
            dist.join_gather(sharded, model)
        acc.wait_for_everyone()  # the server holds the weights before any process samples
    return engine


# --------------------------------------------------------------------------------------- streams


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


class PtxStream:
    """PPO-ptx: demonstrations as full sequences for a language-modelling loss, in a fixed cycling order."""

    def __init__(self, ptx, tokenizer, template: str, seed: int):
        """``ptx``: the ``rl.ptx`` section (its data and batch size)."""
        from rlkit.data import sft_rows

        rows = sft_rows(ptx.data)
        texts = [apply_chat(tokenizer, r["messages"], generation_prompt=False) if "messages" in r
                 else full_text(r["prompt"], r["completion"], template, tokenizer) for r in rows]
        self.ids = [tokenizer(x, add_special_tokens=False)["input_ids"][:512] for x in texts]
        self.batch, self.pad, self.pos = ptx.batch_size, tokenizer.pad_token_id, 0
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
