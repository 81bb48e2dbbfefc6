"""The update phase: ``num_iterations`` passes over the rollout batch in mini-batches, each one optimizer step
made of micro-batches; the policy step, the critic step and the ptx step each return a typed stats object.

Per mini-batch: the ptx step (one language-modelling batch, PPO-ptx), then per micro-batch the policy step
(forward, clipped policy loss + KL in the loss + MoE router loss, backward) followed by the critic step (value
loss, backward), then the optimizer steps. The order is the RNG's order (dropout in each forward), so it is
kept. Each micro-batch's loss is weighted so that the micro-batches of every process add up to the loss of the
whole mini-batch as one process would compute it: the normaliser is the global count (as verl's agg_loss).

    stats = run_update(policy, optimizer, scheduler, acc, batch, rl, beta, critic=critic, ptx=ptx, tis_cap=cap)
    stats.metrics()   # {"policy/loss": ..., "kl/mean": ..., "critic/loss": ..., "optim/grad_norm": ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlkit import precision
from rlkit.algos import (
    aggregate,
    compute_kl,
    compute_policy_loss,
    loss_count,
    rollout_is_weights,
    value_loss,
)
from rlkit.trainers.batch import RolloutBatch, completion_logprobs
from rlkit.trainers.critic import critic_values
from rlkit.trainers.rl import dist

KL_CLAMP = 20.0  # bound on |log pi - log pi_ref| before a KL estimator (verl's choice): exp() stays finite


@dataclass
class Critic:
    """The PPO value model with its own optimizer and schedule."""

    model: torch.nn.Module  # TokenCritic, prepared by accelerate (or sharded)
    optimizer: torch.optim.Optimizer
    scheduler: object


# ------------------------------------------------------------------------------------------ stats


# the policy losses' token metrics that PolicyStats names (rlkit.algos.policy_loss); ratio_max apart (a max)
_LOSS_FIELDS = ("clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl", "ratio_mean")


@dataclass
class PolicyStats:
    """The policy step's numbers on this process, averaged over the update's optimizer steps (the log phase
    averages them over processes; ``ratio_max`` is the largest over micro-batches, and over processes).
    Token metrics are global token means; the losses are the mini-batch losses."""

    loss: float                       # the policy loss (before KL and router terms)
    entropy: float                    # per-token entropy of the policy
    grad_norm: float                  # the policy's gradient norm before clipping
    clip_frac: float | None = None    # the loss's own metrics (rlkit.algos.policy_loss), when it returns them
    clip_frac_low: float | None = None
    clip_frac_high: float | None = None
    dual_clip_frac: float | None = None
    approx_kl: float | None = None
    ratio_mean: float | None = None
    ratio_max: float | None = None
    kl: float | None = None               # mean KL to the reference (reference log-probs present)
    router_aux_loss: float | None = None  # MoE load-balancing loss (a family with a router coefficient)
    extra: dict[str, float] = field(default_factory=dict)  # any other token metric the loss returns

    def metrics(self) -> dict[str, float]:
        """Namespaced metrics that are averaged over processes."""
        out = {"policy/loss": self.loss, "policy/entropy": self.entropy}
        for k in _LOSS_FIELDS:
            if getattr(self, k) is not None:
                out[f"policy/{k}"] = getattr(self, k)
        out.update({f"policy/{k}": v for k, v in self.extra.items()})
        if self.router_aux_loss is not None:
            out["policy/router_aux_loss"] = self.router_aux_loss
        if self.kl is not None:
            out["kl/mean"] = self.kl
        out["optim/grad_norm"] = self.grad_norm
        return out

    def max_metrics(self) -> dict[str, float]:
        """Namespaced metrics whose value over processes is the largest."""
        return {"policy/ratio_max": self.ratio_max} if self.ratio_max is not None else {}


@dataclass
class CriticStats:
    loss: float                # the value loss
    clip_frac: float           # share of tokens where the value clip is active
    explained_variance: float  # NaN (constant returns) counts as 0
    value_mean: float
    grad_norm: float           # the critic's gradient norm before clipping

    def metrics(self) -> dict[str, float]:
        return {"critic/loss": self.loss, "critic/clip_frac": self.clip_frac,
                "critic/explained_variance": self.explained_variance, "critic/value_mean": self.value_mean,
                "critic/grad_norm": self.grad_norm}


@dataclass
class PtxStats:
    loss: float  # the language-modelling loss on the demonstrations (before rl.ptx.coef)

    def metrics(self) -> dict[str, float]:
        return {"policy/ptx_loss": self.loss}


@dataclass
class UpdateStats:
    policy: PolicyStats
    critic: CriticStats | None = None
    ptx: PtxStats | None = None

    def metrics(self) -> dict[str, float]:
        """Every metric averaged over processes (the ``max_metrics`` apart)."""
        out = self.policy.metrics()
        for part in (self.ptx, self.critic):
            if part is not None:
                out.update(part.metrics())
        return out

    def max_metrics(self) -> dict[str, float]:
        return self.policy.max_metrics()

    def finite_check(self) -> dict[str, float]:
        """The numbers a diverged step makes non-finite first."""
        out = {"policy/loss": self.policy.loss, "optim/grad_norm": self.policy.grad_norm}
        if self.critic is not None:
            out["critic/loss"] = self.critic.loss
        return out


class _Sums:
    """Running sums (and maxima) of device tensors, no host sync per micro-batch; ``means(count)`` divides
    every sum by the number of optimizer steps, in one transfer (float64)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.maxima: dict[str, torch.Tensor] = {}

    def add(self, key: str, value) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def keep_max(self, key: str, value: torch.Tensor) -> None:
        self.maxima[key] = value if key not in self.maxima else torch.maximum(self.maxima[key], value)

    def means(self, count: int, device) -> dict[str, float]:
        if not self.sums:
            return {}
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                              for v in self.sums.values()]).div(count).tolist()
        return dict(zip(self.sums, values))

    def policy_stats(self, count: int, device) -> PolicyStats:
        means = self.means(count, device)
        own = {k: v for k, v in means.items() if not k.startswith("loss:")}
        from_loss = {k.removeprefix("loss:"): v for k, v in means.items() if k.startswith("loss:")}
        return PolicyStats(**own, **{k: v for k, v in from_loss.items() if k in _LOSS_FIELDS},
                           ratio_max=float(self.maxima["ratio_max"]) if "ratio_max" in self.maxima else None,
                           extra={k: v for k, v in from_loss.items() if k not in _LOSS_FIELDS})


# ------------------------------------------------------------------------------- loss normaliser


def global_count(acc, mode: str, mini_mask: torch.Tensor) -> float:
    """What a mini-batch's loss divides by (``loss_count``: rlkit.algos.aggregation), summed over every
    process: as verl's agg_loss, a process with more tokens weighs more. The gradient all-reduce averages over
    processes, so each process's loss is multiplied by the world size (``acc.num_processes``) before backward."""
    return max(float(dist.global_sum(acc, loss_count(mode, mini_mask, torch.float64))), 1.0)


def share(mode: str, micro_mask: torch.Tensor, total: float, world: int) -> float:
    """A micro-batch's share of the mini-batch's ``total`` (times the world size): the weight of a per-micro-batch
    scalar (the MoE router loss, a loss's own token metrics) in the mini-batch's sum."""
    return float(loss_count(mode, micro_mask, torch.float64)) * world / total


# ---------------------------------------------------------------------------------- the steps


@dataclass
class _Context:
    """What every micro-batch step of one update reads."""

    acc: object
    rl: object
    beta: float
    aux_coef: float        # the MoE router loss's coefficient (0: none)
    router: bool           # ask the forward for router logits
    fill_old: bool         # the old log-probs (and importance weights) come from this forward
    tis_cap: float | None
    logprob_chunk: int | None  # the LM head over the loss's tokens in chunks (completion_logprobs); None: at once


def ptx_step(acc, policy, ptx, coef: float, sums: _Sums) -> None:
    """PPO-ptx: one demonstration batch's language-modelling loss, backward without gradient sync."""
    with dist.no_sync(acc, policy, False):
        loss = ptx.loss(policy, acc.device)
        acc.backward(coef * loss)
    sums.add("loss", loss.detach())


def policy_step(ctx: _Context, policy, batch: RolloutBatch, idx: torch.Tensor, mb: RolloutBatch, last: bool,
                total: float, tokens: float, sums: _Sums) -> None:
    """One micro-batch's policy loss (+ KL in the loss, + the router's loss), backward."""
    acc, rl = ctx.acc, ctx.rl
    mask = mb.loss_mask
    with dist.no_sync(acc, policy, last):
        # the LM head runs outside the prepared model's forward (the chunked head): autocast it too
        with precision.autocast("bf16" if acc.mixed_precision == "bf16" else "fp32", acc.device):
            logp, ent, router_aux = completion_logprobs(policy, mb, rl.temperature, with_entropy=True,
                                                        chunk_tokens=ctx.logprob_chunk, with_aux=True,
                                                        router_logits=ctx.router, top_p=rl.top_p,
                                                        packed=rl.padding_free)
        is_w = mb.is_weights
        if ctx.fill_old:  # the weights have not moved yet: this forward's log-probs are the old ones
            old = logp.detach()
            batch.old_logp[idx] = old
            if ctx.tis_cap is not None:
                is_w = batch.is_weights[idx] = rollout_is_weights(old, mb.sampler_logp, mask, ctx.tis_cap,
                                                                  rl.is_mode, rl.is_level)
        else:
            old = mb.old_logp if mb.old_logp is not None else logp.detach()
        world, agg, const = acc.num_processes, rl.loss_aggregation, float(rl.max_new_tokens)
        # each loss term divided once by the mini-batch's global normaliser, times the world size (DDP averages)
        pl, pm = compute_policy_loss(rl.policy_loss, logp, old, mb.advantages, mask, is_weights=is_w,
                                     aggregation=agg, constant=const, global_count=total)
        loss = pl
        kl_tok = None
        if mb.ref_logp is not None:
            kl_tok = compute_kl(rl.kl.estimator, logp, mb.ref_logp, clamp=KL_CLAMP)
            if rl.kl.where == "loss" and ctx.beta > 0:
                loss = loss + ctx.beta * aggregate(kl_tok, mask, agg, const, global_count=total)
        w = share(agg, mask, total, world)
        if router_aux is not None:  # MoE load balancing, as the family's own training adds it (one per micro-batch)
            loss = loss + ctx.aux_coef * router_aux * (w / world)
        acc.backward(loss * world)
    wt = share("token_mean", mask, tokens, world)  # the loss's own token metrics: the global token mean
    sums.add("loss", pl.detach() * world)
    if router_aux is not None:
        sums.add("router_aux_loss", router_aux.detach() * w)
    sums.add("entropy", aggregate(ent, mask, "token_mean", global_count=tokens) * world)
    for k, v in pm.items():  # every metric the loss returns ("loss:" keeps them apart from the step's own)
        if k == "ratio_max":
            sums.keep_max(k, v.detach())
        else:
            sums.add(f"loss:{k}", v.detach() * wt)
    if kl_tok is not None:
        sums.add("kl", aggregate(kl_tok.detach(), mask, "token_mean", global_count=tokens) * world)


def critic_step(acc, critic: Critic, mb: RolloutBatch, rl, last: bool, total: float, sums: _Sums) -> None:
    """One micro-batch's value loss, normalised like the policy loss (by the mini-batch's global count),
    backward."""
    world = acc.num_processes
    w = share(rl.loss_aggregation, mb.loss_mask, total, world)
    with dist.no_sync(acc, critic.model, last):
        v = critic_values(critic.model, mb)
        vl, vm = value_loss(v, mb.values, mb.returns, mb.loss_mask, clip=rl.advantage.value_clip,
                            aggregation=rl.loss_aggregation, constant=float(rl.max_new_tokens), global_count=total)
        acc.backward(vl * world)
    sums.add("loss", vl.detach() * world)
    for k, name in (("vf_clip_frac", "clip_frac"), ("explained_variance", "explained_variance"),
                    ("value_mean", "value_mean")):
        # every process must report the same keys; NaN (constant returns) counts as 0
        sums.add(name, torch.nan_to_num(torch.as_tensor(vm.get(k, 0.0), dtype=torch.float32).detach()) * w)


def _optimizer_step(acc, model, optimizer, scheduler, max_grad_norm: float) -> torch.Tensor:
    """Clip, step, schedule, clear; returns the gradient norm before clipping."""
    norm = dist.full(acc.clip_grad_norm_(model.parameters(), max_grad_norm)).detach()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


# ----------------------------------------------------------------------------------- the phase


def run_update(policy, optimizer, scheduler, acc, batch: RolloutBatch, rl, beta: float,
               critic: Critic | None = None, ptx=None, tis_cap: float | None = None,
               logprob_chunk: int | None | str = "rl") -> UpdateStats:
    """num_iterations passes over the batch in mini-batches; each mini-batch is one optimizer step made of
    micro-batches whose losses are weighted so that they add up to the mini-batch loss. ``batch.is_weights``
    (truncated importance sampling against the sampler) weights the policy loss per token.

    One pass in one mini-batch over a batch with sampler log-probs and no old ones (another sampler, no
    dropout): the old log-probs are this forward's (the weights have not moved yet); they and the importance
    weights (``rollout_is_weights``: truncated at ``tis_cap`` or masked, rl.is_mode) are written into ``batch``
    for the log phase. ``logprob_chunk``: the LM head's chunk (the plan's; by default ``rl.logprob_chunk``)."""
    B = batch.input_ids.shape[0]
    device = batch.input_ids.device
    mini = rl.mini_batch_size or B
    fill_old = batch.old_logp is None and batch.sampler_logp is not None and rl.num_iterations == 1 and mini >= B
    config = acc.unwrap_model(policy).config.get_text_config()
    aux_coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    # MoE: the router's load-balancing loss whenever the family computes one and its coefficient is set, as TRL's
    # SFTTrainer adds it (whatever the config's output_router_logits, which the released configs leave off)
    router = aux_coef > 0 and hasattr(config, "output_router_logits")
    if fill_old:
        batch.old_logp = torch.zeros_like(batch.loss_mask)
        if tis_cap is not None:
            batch.is_weights = torch.ones_like(batch.loss_mask)
    ctx = _Context(acc, rl, beta, aux_coef, router, fill_old, tis_cap,
                   rl.logprob_chunk if logprob_chunk == "rl" else logprob_chunk)
    pol, crit, lm = _Sums(), _Sums(), _Sums()
    count = 0
    for _ in range(rl.num_iterations):
        order = torch.randperm(B).to(device) if mini < B else torch.arange(B, device=device)
        for m0 in range(0, B, mini):
            mini_idx = order[m0 : m0 + mini]
            mini_mask = batch.loss_mask[mini_idx]
            total = global_count(acc, rl.loss_aggregation, mini_mask)
            tokens = global_count(acc, "token_mean", mini_mask)
            micro_starts = list(range(0, len(mini_idx), rl.micro_batch_size))
            if ptx is not None:
                ptx_step(acc, policy, ptx, rl.ptx.coef, lm)
            for ci, c0 in enumerate(micro_starts):
                idx = mini_idx[c0 : c0 + rl.micro_batch_size]
                mb = batch.select(idx)
                last = ci == len(micro_starts) - 1
                policy_step(ctx, policy, batch, idx, mb, last, total, tokens, pol)
                if critic is not None:
                    critic_step(acc, critic, mb, rl, last, total, crit)
            pol.add("grad_norm", _optimizer_step(acc, policy, optimizer, scheduler, rl.max_grad_norm))
            if critic is not None:
                crit.add("grad_norm", _optimizer_step(acc, critic.model, critic.optimizer, critic.scheduler,
                                                      rl.max_grad_norm))
            count += 1
    return UpdateStats(pol.policy_stats(count, acc.device),
                       critic=CriticStats(**crit.means(count, acc.device)) if critic is not None else None,
                       ptx=PtxStats(**lm.means(count, acc.device)) if ptx is not None else None)
