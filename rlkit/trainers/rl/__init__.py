"""The RL loop: GRPO (and, with a value model, PPO) as configurations of one loop with named, timed phases.

    collect    → engine.generate(prompt ids, n); rewards;   RolloutBatch: token ids, loss masks, sampler
                 dynamic sampling refills the batch         log-probs, rewards (time/rollout, time/reward)
    logprobs   → old policy log-probs and truncated IS weights, only when the config needs a pass of their
                 own (time/old_logprobs); reference log-probs when rl.kl is set (time/reference)
    values     → critic values                              only when rl.advantage reads values: gae (time/values)
    advantages → ADVANTAGES[rl.advantage](...)              gae | grpo | dr_grpo | rloo | reinforce_pp
    update     → num_iterations × mini-batches of POLICY_LOSSES[rl.policy_loss] (+ KL in the loss, + value loss,
                 + ptx); typed stats (update.UpdateStats)   (time/update)
    sync       → engine.wake(); engine.sync_weights(policy) a no-op for the hf engine (it samples the policy)
    log        → metrics averaged over processes (time/log); every rl.eval_steps the held-out eval (time/eval);
                 metrics.jsonl / TensorBoard / W&B, progress bar; then an atomic checkpoint

GRPO (Shao et al. 2024) with the DAPO options (Yu et al. 2025): clip-higher (``epsilon_high``), token-mean
loss aggregation, dynamic sampling (groups whose rewards are all equal are dropped and the batch is
refilled with fresh prompts) and overlong filtering. Departures from the paper: the KL term is optional
(``rl.kl: null``, or ``rl.beta=0``, loads no reference model) and can go into the reward per token instead of the loss.

When the sampler is not the trainer (``rollout.engine: vllm``) the old log-probs are always recomputed by
the trainer, and truncated importance sampling (Yao et al. 2025) weights each token's policy loss by
``min(pi_trainer / pi_sampler, rl.tis_cap)``; ``rollout/logprob_diff`` and ``rollout/is_*`` show the gap.

The loop runs under accelerate from the first line: one process on CPU, or ``accelerate launch
--num_processes N`` for DDP on CPUs (gloo) or GPUs, or FSDP2 (``--config_file $(rlkit config-path fsdp2)``);
each process rolls out its share of the prompts (with vLLM, on its own engine or through a shared server).

    rlkit grpo --recipe r1_zero                                   # the embedded world, ~3 minutes on 2 cores
    rlkit grpo --recipe r1_zero --set rollout.engine=vllm         # vLLM in the training process
    rlkit grpo --model Qwen/Qwen2.5-0.5B --dataset math.jsonl

Modules: ``loop`` (run_rl, RLRun.fit and the phases), ``setup`` (the derived Plan and the builders),
``update`` (policy, critic and ptx steps with typed stats), ``dist`` (collectives), ``export`` (checkpoints,
the final export), ``metrics`` (the log phase's series, the progress bar's and plot's keys).
"""

from rlkit.trainers.rl.loop import RLRun, run_rl
from rlkit.trainers.rl.setup import Plan, PromptStream, PtxStream, make_plan
from rlkit.trainers.rl.update import (
    KL_CLAMP,
    Critic,
    CriticStats,
    PolicyStats,
    PtxStats,
    UpdateStats,
    run_update,
)

__all__ = [
    "KL_CLAMP",
    "Critic",
    "CriticStats",
    "Plan",
    "PolicyStats",
    "PromptStream",
    "PtxStats",
    "PtxStream",
    "RLRun",
    "UpdateStats",
    "make_plan",
    "run_rl",
    "run_update",
]
