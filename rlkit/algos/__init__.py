"""The RL maths of rlkit as pure functions of tensors: no model, no I/O, no distributed imports.

Registries (``REG[name]`` returns the function; an unknown name raises ``ValueError`` listing the
known ones; ``list(REG)`` gives the sorted names, e.g. for config validation):

- ``ADVANTAGES``      advantage estimators: gae, grpo, dr_grpo, rloo, reinforce_pp (``NEEDS_VALUES``: those
                      that read a critic's values)
                      ``fn(*, rewards, mask, group_ids=None, values=None, token_rewards=None, cfg) -> (adv, returns)``
- ``KL_ESTIMATORS``   per-token KL estimators: k1, k2, k3
                      ``fn(logp, ref_logp, *, clamp=None) -> kl``
- ``KL_CONTROLLERS``  KL coefficient controllers: fixed, adaptive (built by ``make_kl_controller``)
- ``POLICY_LOSSES``   policy losses: ppo_clip, reinforce
                      ``fn(logp, old_logp, advantages, mask, *, cfg, is_weights=None) -> (loss, metrics)``
- ``AGGREGATIONS``    per-token loss -> scalar: token_mean, seq_mean_token_mean, seq_mean_token_sum,
                      seq_mean_token_sum_norm; ``fn(loss_mat, mask, *, constant=None) -> loss``

Also ``value_loss``, ``explained_variance``, ``entropy_from_logits``, ``truncated_is_weights`` and the
masked reductions ``masked_sum``, ``masked_mean``, ``masked_var``, ``masked_whiten``. Each module's
docstring says what it computes and where it departs from the papers.
"""

from rlkit.algos.advantages import (
    ADVANTAGES,
    NEEDS_VALUES,
    AdvantageConfig,
    compute_advantages,
    dr_grpo,
    gae,
    get_advantage,
    group_stats,
    grpo,
    reinforce_pp,
    rloo,
)
from rlkit.algos.kl import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    AdaptiveKL,
    FixedKL,
    compute_kl,
    k1,
    k2,
    k3,
    make_kl_controller,
)
from rlkit.algos.policy_loss import (
    AGGREGATIONS,
    POLICY_LOSSES,
    PolicyLossConfig,
    aggregate,
    compute_policy_loss,
    entropy_from_logits,
    explained_variance,
    ppo_clip,
    reinforce,
    truncated_is_weights,
    value_loss,
)
from rlkit.algos.utils import Registry, all_finite, last_token_onehot, masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "NEEDS_VALUES",
    "POLICY_LOSSES",
    "AdaptiveKL",
    "AdvantageConfig",
    "FixedKL",
    "PolicyLossConfig",
    "Registry",
    "aggregate",
    "compute_advantages",
    "compute_kl",
    "compute_policy_loss",
    "dr_grpo",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "get_advantage",
    "group_stats",
    "grpo",
    "k1",
    "k2",
    "k3",
    "last_token_onehot",
    "make_kl_controller",
    "masked_mean",
    "all_finite",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_clip",
    "reinforce",
    "reinforce_pp",
    "rloo",
    "truncated_is_weights",
    "value_loss",
]
