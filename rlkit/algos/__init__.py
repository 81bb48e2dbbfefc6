"""The RL maths of rlkit as pure functions of tensors: no model, no I/O, no distributed imports.

Registries (``REG[name]`` returns the entry; an unknown name raises ``ValueError`` listing the known ones;
``list(REG)`` gives the sorted names, e.g. for config validation):

- ``ADVANTAGES``          advantage estimators: gae, grpo, dr_grpo, rloo, reinforce_pp
                          ``fn(*, rewards, mask, group_ids=None, values=None, token_rewards=None, cfg) -> (adv, returns)``
- ``ADVANTAGE_SCHEMAS``   their configs: ``GRPOAdvantage``, ``DrGRPOAdvantage``, ``RLOOAdvantage``,
                          ``ReinforcePPAdvantage``, ``GAEAdvantage`` (union ``Advantage``, tagged by ``name``); class
                          flags ``needs_values`` (gae: a critic; ``NEEDS_VALUES`` lists them), ``compares_group``
- ``POLICY_LOSSES``       policy losses: ppo_clip, reinforce (policy_loss.py); gspo, cispo, sapo (ratio_losses.py)
                          ``fn(logp, old_logp, advantages, mask, *, cfg, is_weights=None, aggregation="token_mean",
                          constant=None, global_count=None) -> (loss, metrics)``
- ``POLICY_LOSS_SCHEMAS`` their configs: ``PPOClipLoss``, ``ReinforceLoss``, ``GSPOLoss``, ``CISPOLoss``,
                          ``SAPOLoss`` (union ``PolicyLoss``); class flag
                          ``single_update_only`` (reinforce)
- ``AGGREGATIONS``        per-token loss -> scalar: token_mean, seq_mean_token_mean, seq_mean_token_sum,
                          seq_mean_token_sum_norm; ``entry(loss_mat, mask, *, constant=None, global_count=None)``,
                          ``entry.count(mask, dtype)`` what it divides by, ``entry.divides_by`` in words
- ``KL_ESTIMATORS``       per-token KL estimators: k1, k2, k3; ``fn(logp, ref_logp, *, clamp=None) -> kl``

The global normaliser: ``loss_count(mode, mini_batch_mask)`` (all-reduced over processes by the loop) passed
as ``global_count`` to ``aggregate``, the policy losses and ``value_loss`` makes micro-batch losses add up to
the mini-batch's (verl's ``agg_loss``).

Also ``KLConfig`` (the ``kl:`` section) with ``make_kl_controller(kl_cfg)`` -> ``FixedKL`` / ``AdaptiveKL`` and
``compute_kl``; ``value_loss``, ``explained_variance``, ``entropy_from_logits``, ``truncated_is_weights`` and
``rollout_is_weights`` (truncated or masked, per token or sequence: rlkit.algos.correction),
``group_stats`` and the masked reductions ``masked_sum``, ``masked_mean``, ``masked_var``, ``masked_whiten``.
Every estimator and loss takes its own schema as ``cfg`` (default: that schema's defaults);
``compute_advantages(schema, ...)`` and ``compute_policy_loss(schema, ...)`` dispatch on the schema's ``name``.
Each module's docstring says what it computes and where it departs from the papers.
"""

from rlkit.algos.advantages import (
    ADVANTAGE_SCHEMAS,
    ADVANTAGES,
    EPS,
    NEEDS_VALUES,
    Advantage,
    DrGRPOAdvantage,
    GAEAdvantage,
    GRPOAdvantage,
    ReinforcePPAdvantage,
    RLOOAdvantage,
    compute_advantages,
    dr_grpo,
    gae,
    grpo,
    reinforce_pp,
    rloo,
)
from rlkit.algos.aggregation import AGGREGATIONS, Aggregation, aggregate, loss_count
from rlkit.algos.kl import (
    KL_ESTIMATORS,
    AdaptiveKL,
    FixedKL,
    KLConfig,
    compute_kl,
    k1,
    k2,
    k3,
    make_kl_controller,
)
from rlkit.algos.policy_loss import (
    LOG_RATIO_CLAMP,
    POLICY_LOSS_SCHEMAS,
    POLICY_LOSSES,
    PPOClipLoss,
    ReinforceLoss,
    compute_policy_loss,
    entropy_from_logits,
    ppo_clip,
    reinforce,
    truncated_is_weights,
)
from rlkit.algos.correction import IS_LEVELS, IS_MODES, masked_fraction, rollout_is_weights
from rlkit.algos.ratio_losses import CISPOLoss, GSPOLoss, PolicyLoss, SAPOLoss, cispo, gspo, sapo
from rlkit.algos.returns import group_stats
from rlkit.algos.utils import (
    Registry,
    all_finite,
    last_token_onehot,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from rlkit.algos.value import explained_variance, value_loss

__all__ = [
    "ADVANTAGES",
    "ADVANTAGE_SCHEMAS",
    "AGGREGATIONS",
    "EPS",
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "NEEDS_VALUES",
    "POLICY_LOSSES",
    "POLICY_LOSS_SCHEMAS",
    "AdaptiveKL",
    "Advantage",
    "Aggregation",
    "DrGRPOAdvantage",
    "FixedKL",
    "GAEAdvantage",
    "GRPOAdvantage",
    "KLConfig",
    "PPOClipLoss",
    "PolicyLoss",
    "rollout_is_weights",
    "masked_fraction",
    "IS_MODES",
    "IS_LEVELS",
    "GSPOLoss",
    "CISPOLoss",
    "SAPOLoss",
    "gspo",
    "cispo",
    "sapo",
    "RLOOAdvantage",
    "Registry",
    "ReinforceLoss",
    "ReinforcePPAdvantage",
    "aggregate",
    "all_finite",
    "compute_advantages",
    "compute_kl",
    "compute_policy_loss",
    "dr_grpo",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_stats",
    "grpo",
    "k1",
    "k2",
    "k3",
    "last_token_onehot",
    "loss_count",
    "make_kl_controller",
    "masked_mean",
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
