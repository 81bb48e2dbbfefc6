"""The ``rl:`` section of rlkit grpo and rlkit ppo. Its variants (the advantage estimator, the policy loss, the
KL term) have their schemas next to their registry entries in :mod:`rlkit.algos`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rlkit.algos import (
    ADVANTAGE_SCHEMAS,
    AGGREGATIONS,
    POLICY_LOSS_SCHEMAS,
    Advantage,
    GRPOAdvantage,
    KLConfig,
    PolicyLoss,
    PPOClipLoss,
)
from rlkit.sections import Section


class PtxConfig(Section):
    """PPO-ptx (InstructGPT): a language-modelling loss on demonstrations mixed into each policy step."""

    coef: float = Field(..., gt=0, description="Weight of the language-modelling loss.")
    data: str = Field(..., description="Demonstrations (SFT format: messages or prompt/completion).")
    batch_size: int = Field(8, gt=0, description="Sequences per mini-batch.")


class DynamicSampling(Section):
    """DAPO: groups whose rewards are all equal teach nothing; they are dropped and the batch refilled."""

    max_rounds: int = Field(3, ge=0, description="Extra rollout rounds to refill the batch.")


class RLConfig(Section):
    prompts_per_step: int = Field(16, gt=0, description="Prompts per rollout batch, over all processes.")
    num_generations: int = Field(8, gt=0, description="Completions per prompt (the GRPO group size G).")
    max_new_tokens: int = Field(64, gt=0, description="Generation budget per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for rollouts (log-probs use the same).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling for rollouts.")
    advantage: Advantage = Field(
        default_factory=GRPOAdvantage, description="Advantage estimator with its knobs: grpo, dr_grpo, rloo, "
        "reinforce_pp, or gae (with a critic: the default of rlkit ppo). A bare name (rl.advantage=rloo) is that "
        "estimator with its defaults.")
    policy_loss: PolicyLoss = Field(
        default_factory=PPOClipLoss, description="Policy loss with its knobs: ppo_clip, reinforce, gspo, cispo or sapo.")
    loss_aggregation: str = Field(
        "token_mean",
        description="token_mean (DAPO), seq_mean_token_mean (GRPO), seq_mean_token_sum, seq_mean_token_sum_norm (Dr. GRPO).")
    kl: KLConfig | None = Field(
        None, description="KL to the reference model {coef, estimator, where, controller, target, horizon}; null: no "
        "KL term and no reference model (rl.beta=0.04 is short for kl.coef).")
    tis_cap: float | None = Field(
        2.0, gt=0, description="When another engine samples (vllm): truncated importance sampling cap C; each token's "
        "policy loss is weighted by min(pi_trainer / pi_sampler, C). null: no correction (old log-probs are still "
        "recomputed).")
    is_mode: Literal["truncate", "mask"] = Field(
        "truncate", description="When another engine samples: truncate weights each token by min(rho, tis_cap); mask "
        "keeps tokens with 1/tis_cap <= rho <= tis_cap at weight 1 and drops the others (IcePop / MIS).")
    is_level: Literal["token", "sequence"] = Field(
        "token", description="The ratio rho = pi_trainer / pi_sampler per token, or per sequence (the geometric mean "
        "over its tokens: the whole sequence is truncated or masked together).")
    num_iterations: int = Field(1, gt=0, description="Optimisation passes over each rollout batch (mu).")
    mini_batch_size: int | None = Field(None, gt=0, description="Samples per optimizer step (per process); default: the whole batch.")
    micro_batch_size: int = Field(32, gt=0, description="Samples per forward/backward (gradient accumulation inside a mini-batch).")
    max_grad_norm: float = Field(1.0, gt=0, allow_inf_nan=True, description="Gradient clipping (.inf: none).")
    logprob_chunk: int | None = Field(
        4096, gt=0, description="Log-probs of the loss's tokens only, through the LM head in chunks of this many "
        "tokens (full-vocabulary fp32 logits one chunk at a time); null: the whole response window at once (what "
        "FSDP2 gets unless this is set).")
    padding_free: bool = Field(
        True, description="Forward passes over the batch's sequences packed side by side without padding (position "
        "ids restarting per sequence, attention kept within each); with rl.logprob_chunk set. false: padded rows.")
    reward_scale: float = Field(1.0, description="Multiply summed rewards by this.")
    reward_clip: float | None = Field(None, gt=0, description="Clip summed rewards to [-c, c].")
    dynamic_sampling: DynamicSampling | None = Field(
        None, description="DAPO dynamic sampling ({max_rounds}); null: off (rl.dynamic_sampling=true: on, defaults).")
    overlong_filter: bool = Field(False, description="DAPO: leave truncated completions out of the loss.")
    ptx: PtxConfig | None = Field(None, description="PPO-ptx {coef, data, batch_size}; null: off.")
    eval_steps: int = Field(20, gt=0, description="Evaluate on the held-out split every N steps (and before and after).")
    log_completions: int = Field(1, ge=0, description="Print this many sample completions at each log step.")
    reward_check: bool = Field(True, description="Before training, score probe completions (honest answer, known "
                               "reward hacks) with the rewards and print a one-line summary (see `rlkit rewards check`).")

    @field_validator("loss_aggregation")
    @classmethod
    def _aggregation(cls, v: str) -> str:
        if v not in AGGREGATIONS:
            raise ValueError(f"unknown name '{v}'; known: {', '.join(AGGREGATIONS)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        adv, loss = self.advantage, self.policy_loss
        if adv.compares_group and self.num_generations < 2:
            raise ValueError(f"rl.num_generations: advantage '{adv.name}' compares samples of a prompt; needs >= 2")
        if self.dynamic_sampling is not None and self.num_generations < 2:
            raise ValueError("rl.dynamic_sampling: needs rl.num_generations >= 2")
        if loss.single_update_only and (self.num_iterations > 1 or self.mini_batch_size is not None):
            raise ValueError(f"rl.policy_loss: {loss.name} is only correct with one update per rollout batch "
                             "(rl.num_iterations 1 and no rl.mini_batch_size); use ppo_clip")
        return self


# rl sections tagged by `name`: the registry of their schemas
NAMED_VARIANTS = {"advantage": ADVANTAGE_SCHEMAS, "policy_loss": POLICY_LOSS_SCHEMAS}


def default_variant(kind: str, part: str) -> str:
    """The variant of ``rl.<part>`` a command uses when none is named: rlkit ppo's advantage is gae (with a
    critic), rlkit grpo's grpo; the policy loss is ppo_clip."""
    if part == "advantage":
        return "gae" if kind == "ppo" else "grpo"
    return "ppo_clip"
