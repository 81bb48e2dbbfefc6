"""rlkit.algos: every expected value below is worked out by hand in the test, on tiny literal tensors."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.algos import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    AdaptiveKL,
    AdvantageConfig,
    FixedKL,
    PolicyLossConfig,
    aggregate,
    compute_advantages,
    entropy_from_logits,
    explained_variance,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    truncated_is_weights,
    value_loss,
)

S = 1 / math.sqrt(2)  # unbiased std of {1, 0} is sqrt(0.5); (1 - 0.5) / sqrt(0.5) = 1/sqrt(2)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------ fixtures

# Two prompts, two samples each: rewards [1, 0 | 1, 1]; ragged lengths 3, 2, 1, 3.
REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0])
GROUPS = torch.tensor([0, 0, 1, 1])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])


# ------------------------------------------------------------------------------------- masked utils


def test_masked_reductions_ignore_padding_even_nan():
    x = torch.tensor([[1.0, 3.0, float("nan")], [5.0, float("inf"), 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, m), 3.0)  # (1 + 3 + 5) / 3
    close(masked_mean(x, m, dim=-1), [2.0, 5.0])
    close(masked_var(x, m, unbiased=False), 8 / 3)  # deviations -2, 0, 2
    close(masked_var(x, m), 4.0)  # 8 / (3 - 1)
    close(masked_mean(x, torch.zeros_like(m)), 0.0)  # nothing valid -> 0, not nan
    close(masked_var(torch.tensor([2.0, 9.0]), torch.tensor([1, 0])), 0.0)  # n = 1 -> 0
    w = masked_whiten(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0]), eps=0.0)
    close(w, [-S, S, 0.0])  # mean 2, unbiased std sqrt(2); padding -> 0


# ---------------------------------------------------------------------------------------- advantages


def test_grpo_group_std_unbiased_and_padding_zero():
    adv, ret = ADVANTAGES["grpo"](rewards=REWARDS, mask=MASK, group_ids=GROUPS)
    # group 0: mean 0.5, unbiased std sqrt(0.5) -> +-1/sqrt(2); group 1: all equal -> 0
    close(adv, [[S, S, S], [-S, -S, 0], [0, 0, 0], [0, 0, 0]])
    close(ret, [[1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 1]])


def test_grpo_batch_std_and_none():
    cfg = AdvantageConfig(std_normalize="batch", eps=0.0)
    adv, _ = ADVANTAGES["grpo"](rewards=REWARDS, mask=MASK, group_ids=GROUPS, cfg=cfg)
    # batch std of [1,0,1,1]: mean .75, squares .0625+.5625+.0625+.0625 = .75, /3 = .25 -> std .5
    close(adv[:, 0], [1.0, -1.0, 0.0, 0.0])
    adv, _ = ADVANTAGES["grpo"](rewards=REWARDS, mask=MASK, group_ids=GROUPS, cfg=AdvantageConfig(std_normalize="none"))
    close(adv[:, 0], [0.5, -0.5, 0.0, 0.0])


def test_grpo_non_contiguous_group_ids_and_singleton():
    # ids 7 and 3 interleaved; id 5 alone -> 0 (std undefined)
    adv, _ = ADVANTAGES["grpo"](
        rewards=torch.tensor([1.0, 2.0, 0.0, 4.0, 9.0]),
        mask=torch.ones(5, 1),
        group_ids=torch.tensor([7, 3, 7, 3, 5]),
        cfg=AdvantageConfig(eps=0.0),
    )
    # group 7: {1, 0} -> +-1/sqrt2; group 3: {2, 4}: mean 3, std sqrt2 -> -+1/sqrt2
    close(adv[:, 0], [S, -S, -S, S, 0.0])


def test_grpo_advantages_sum_to_zero_per_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=g)
    groups = torch.arange(6).repeat_interleave(4)[torch.randperm(24, generator=g)]
    mask = torch.ones(24, 1)
    for std_normalize in ("group", "batch", "none"):
        adv, _ = ADVANTAGES["grpo"](rewards=rewards, mask=mask, group_ids=groups, cfg=AdvantageConfig(std_normalize=std_normalize))
        for gid in range(6):
            assert abs(adv[groups == gid, 0].sum().item()) < 1e-5


def test_token_rewards_are_summed_over_valid_tokens_for_outcome_estimators():
    # row 0: 1 + (-0.1 - 0.1) = 0.8; the 0.5 sits on padding and is ignored. row 1: 0.
    adv, ret = ADVANTAGES["dr_grpo"](
        rewards=torch.tensor([1.0, 0.0]),
        mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
        group_ids=torch.tensor([0, 0]),
        token_rewards=torch.tensor([[-0.1, -0.1, 0.5], [0.0, 0.0, 0.0]]),
    )
    close(adv, [[0.4, 0.4, 0.0], [-0.4, -0.4, -0.4]])  # mean 0.4
    close(ret, [[0.8, 0.8, 0.0], [0.0, 0.0, 0.0]])


def test_rloo_leave_one_out():
    adv, _ = ADVANTAGES["rloo"](
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 5.0]),
        mask=torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1], [1, 1]]),
        group_ids=torch.tensor([0, 0, 0, 1, 1, 2]),
    )
    # group 0 {1,0,0}: 1 - mean(0,0) = 1; 0 - mean(1,0) = -0.5 (x2). group 1 {1,0}: +-1. group 2 alone: 0.
    close(adv, [[1, 1], [-0.5, 0], [-0.5, -0.5], [1, 1], [-1, -1], [0, 0]])


def test_gae_two_steps_by_hand_with_ragged_row():
    # Row 0 (length 2): values [1, 2], reward 4 at the last token, gamma = lam = 0.5.
    #   t=1: delta = 4 + 0.5*0 - 2 = 2            A1 = 2
    #   t=0: delta = 0 + 0.5*2 - 1 = 0            A0 = 0 + 0.5*0.5*2 = 0.5
    #   returns = A + V = [1.5, 4]  (= lambda-return: 0.5*(0 + 0.5*2) + 0.5*(0 + 0.5*4) = 1.5)
    # Row 1 (length 1, then padding holding junk 99s): value 1, reward 3 -> A0 = 3 - 1 = 2, returns [3, 0].
    cfg = AdvantageConfig(gamma=0.5, lam=0.5, whiten=False)
    adv, ret = ADVANTAGES["gae"](
        rewards=torch.tensor([4.0, 3.0]),
        mask=torch.tensor([[1, 1], [1, 0]]),
        values=torch.tensor([[1.0, 2.0], [1.0, 99.0]]),
        token_rewards=torch.tensor([[0.0, 0.0], [0.0, 99.0]]),
        cfg=cfg,
    )
    close(adv, [[0.5, 2.0], [2.0, 0.0]])
    close(ret, [[1.5, 4.0], [3.0, 0.0]])


def test_gae_token_rewards_and_whitening():
    # One row, 2 tokens, gamma = lam = 1, values 0: token rewards [-1, 0] + reward 3 at the end.
    # A1 = 3, A0 = -1 + 3 = 2; returns = [2, 3]. Whitened: mean 2.5, unbiased std 1/sqrt2 -> [-1/sqrt2, 1/sqrt2].
    kw = dict(rewards=torch.tensor([3.0]), mask=torch.ones(1, 2), values=torch.zeros(1, 2), token_rewards=torch.tensor([[-1.0, 0.0]]))
    adv, ret = ADVANTAGES["gae"](**kw, cfg=AdvantageConfig(whiten=False))
    close(adv, [[2.0, 3.0]])
    close(ret, [[2.0, 3.0]])
    adv, ret = ADVANTAGES["gae"](**kw, cfg=AdvantageConfig(whiten=True, eps=0.0))
    close(adv, [[-S, S]])
    close(ret, [[2.0, 3.0]])  # returns are never whitened


def test_gae_needs_values():
    with pytest.raises(ValueError, match="needs values"):
        ADVANTAGES["gae"](rewards=REWARDS, mask=MASK)


def test_reinforce_pp_discounted_returns_whitened_over_batch():
    # gamma 0.5. Row 0 (3 tokens): token rewards [0, -0.5, 0] + 1 at t=2 -> returns t2=1, t1=-0.5+0.5=0, t0=0.
    # Row 1 (2 tokens, 1 pad): reward 2 at t=1 -> returns [1, 2, 0].
    # Valid returns {0, 0, 1, 1, 2}: mean 0.8; squares .64+.64+.04+.04+1.44 = 2.8, /4 = 0.7.
    adv, ret = ADVANTAGES["reinforce_pp"](
        rewards=torch.tensor([1.0, 2.0]),
        mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        token_rewards=torch.tensor([[0.0, -0.5, 0.0], [0.0, 0.0, 7.0]]),
        cfg=AdvantageConfig(gamma=0.5, eps=0.0),
    )
    close(ret, [[0.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
    sd = math.sqrt(0.7)
    close(adv, [[-0.8 / sd, -0.8 / sd, 0.2 / sd], [0.2 / sd, 1.2 / sd, 0.0]])


def test_all_masked_row_gets_zero_advantage_everywhere():
    mask = torch.tensor([[1, 1], [0, 0]])
    for name in ADVANTAGES:
        adv, ret = compute_advantages(
            name, rewards=torch.tensor([1.0, 0.0]), mask=mask, group_ids=torch.tensor([0, 0]), values=torch.ones(2, 2)
        )
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all(), name
        assert (adv[1] == 0).all() and (ret[1] == 0).all(), name


def test_unknown_names_list_known_ones():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'grpoo'; known: dr_grpo, gae, grpo, reinforce_pp, rloo"):
        ADVANTAGES["grpoo"]
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; known: k1, k2, k3"):
        KL_ESTIMATORS["k4"]
    with pytest.raises(ValueError, match=r"known: ppo_clip, reinforce"):
        POLICY_LOSSES["ppo"]
    with pytest.raises(ValueError, match=r"known: seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm, token_mean"):
        aggregate(torch.ones(1, 1), torch.ones(1, 1), "mean")
    with pytest.raises(ValueError, match=r"unknown KL controller 'pid'; known: adaptive, fixed"):
        make_kl_controller("pid", 0.1)
    with pytest.raises(ValueError, match="std_normalize"):
        AdvantageConfig(std_normalize="global")
    with pytest.raises(ValueError, match="known"):
        PolicyLossConfig(aggregation="sum")


# ------------------------------------------------------------------------------------------------ KL


def test_kl_estimators_known_values():
    logp = torch.tensor([[0.0, -1.0, -0.5]])
    ref = torch.tensor([[-1.0, 0.0, -0.5]])  # d = logp - ref = [1, -1, 0]
    close(KL_ESTIMATORS["k1"](logp, ref), [[1.0, -1.0, 0.0]])
    close(KL_ESTIMATORS["k2"](logp, ref), [[0.5, 0.5, 0.0]])
    # k3 = exp(-d) + d - 1: d=1 -> e^-1; d=-1 -> e - 2; d=0 -> 0
    close(KL_ESTIMATORS["k3"](logp, ref), [[math.exp(-1), math.e - 2, 0.0]])
    # clamp bounds the log-ratio before the formula: d = 30 -> 2
    close(KL_ESTIMATORS["k1"](torch.tensor([30.0]), torch.tensor([0.0]), clamp=2.0), [2.0])


def test_k3_nonnegative_and_finite_with_clamp():
    g = torch.Generator().manual_seed(1)
    logp, ref = torch.randn(64, 8, generator=g) * 3, torch.randn(64, 8, generator=g) * 3
    assert (KL_ESTIMATORS["k3"](logp, ref) >= 0).all()
    logp = torch.tensor([-200.0], requires_grad=True)
    kl = KL_ESTIMATORS["k3"](logp, torch.tensor([0.0]), clamp=10.0)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(logp.grad).all()


def test_adaptive_kl_moves_toward_target():
    # e = clip(12/6 - 1, +-0.2) = 0.2 -> mult = 1 + 0.2 * 256 / 10000 = 1.00512
    up = AdaptiveKL(init_coef=0.1, target=6.0, horizon=10000)
    up.update(12.0, n_steps=256)
    close(up.value, 0.1 * 1.00512, tol=1e-9)
    # e = clip(3/6 - 1) = -0.2 -> mult = 0.99488
    down = make_kl_controller("adaptive", 0.1, target=6.0, horizon=10000)
    down.update(3.0, n_steps=256)
    close(down.value, 0.1 * 0.99488, tol=1e-9)
    fixed = make_kl_controller("fixed", 0.05)
    assert isinstance(fixed, FixedKL) and fixed.update(100.0, 256) == 0.05
    with pytest.raises(ValueError, match="target"):
        make_kl_controller("adaptive", 0.1)


# ----------------------------------------------------------------------------------------- aggregate


def test_aggregation_modes_on_ragged_mask():
    L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(aggregate(L, m, "token_mean"), 2.5)  # (1+2+3+4) / 4
    close(aggregate(L, m, "seq_mean_token_mean"), 3.0)  # (2 + 4) / 2
    close(aggregate(L, m, "seq_mean_token_sum"), 5.0)  # (6 + 4) / 2
    close(aggregate(L, m, "seq_mean_token_sum_norm", constant=4), 1.25)  # 10 / (2 * 4)
    with pytest.raises(ValueError, match="constant"):
        aggregate(L, m, "seq_mean_token_sum_norm")
    # An all-masked row (junk values) is absent from the seq means but counts in Dr. GRPO's B.
    L3 = torch.cat([L, torch.tensor([[7.0, float("nan"), 9.0]])])
    m3 = torch.cat([m, torch.zeros(1, 3, dtype=m.dtype)])
    close(aggregate(L3, m3, "token_mean"), 2.5)
    close(aggregate(L3, m3, "seq_mean_token_mean"), 3.0)
    close(aggregate(L3, m3, "seq_mean_token_sum"), 5.0)
    close(aggregate(L3, m3, "seq_mean_token_sum_norm", constant=4), 10 / 12)
    for mode in AGGREGATIONS:
        close(aggregate(L, torch.zeros_like(m), mode, constant=4), 0.0)


# -------------------------------------------------------------------------------------- policy loss


def _logp(ratios):
    return torch.log(torch.tensor([ratios], dtype=torch.float32)).requires_grad_(True)


def test_ppo_clip_values_and_clip_fraction():
    # Four valid tokens + one pad. old_logp = 0, so ratio = exp(logp).
    #   A=+1, r=1.5 -> clipped at 1.2 (high)  loss -1.2
    #   A=-1, r=0.5 -> clipped at 0.8 (low)   loss  0.8
    #   A=+1, r=0.5 -> not clipped            loss -0.5
    #   A=-1, r=1.1 -> not clipped            loss  1.1
    logp = _logp([1.5, 0.5, 0.5, 1.1, 9.0])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, met = POLICY_LOSSES["ppo_clip"](logp, torch.zeros(1, 5), adv, mask)
    close(loss, (-1.2 + 0.8 - 0.5 + 1.1) / 4)
    close(met["clip_frac"], 0.5)
    close(met["clip_frac_high"], 0.25)
    close(met["clip_frac_low"], 0.25)
    close(met["dual_clip_frac"], 0.0)
    close(met["ratio_mean"], (1.5 + 0.5 + 0.5 + 1.1) / 4)
    loss.backward()
    # clipped tokens and padding get no gradient; d(-A r)/dlogp = -A r / 4 elsewhere
    close(logp.grad, [[0.0, 0.0, -0.5 / 4, 1.1 / 4, 0.0]])


def test_ppo_clip_higher_is_asymmetric():
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28)
    mask = torch.ones(1, 2)
    # A=+1, r=1.25: inside 1.28 -> not clipped (a symmetric 0.2 would clip at 1.2)
    loss, met = POLICY_LOSSES["ppo_clip"](_logp([1.25, 1.25]), torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), mask, cfg=cfg)
    close(loss, -1.25)
    close(met["clip_frac"], 0.0)
    loss, _ = POLICY_LOSSES["ppo_clip"](_logp([1.25, 1.25]), torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), mask)
    close(loss, -1.2)
    # A=-1, r=0.75: the low side still clips at 0.8
    loss, met = POLICY_LOSSES["ppo_clip"](_logp([0.75, 0.75]), torch.zeros(1, 2), torch.tensor([[-1.0, -1.0]]), mask, cfg=cfg)
    close(loss, 0.8)
    close(met["clip_frac_low"], 1.0)


def test_dual_clip_caps_negative_advantage_with_big_ratio():
    # A = -1 everywhere. r = 5 > c = 3: loss min(max(5, 1.2), 3) = 3, no gradient.
    # r = 2 < c: loss 2 (the ordinary PPO branch). Mean = 2.5.
    cfg = PolicyLossConfig(dual_clip=3.0)
    logp = _logp([5.0, 2.0])
    loss, met = POLICY_LOSSES["ppo_clip"](logp, torch.zeros(1, 2), torch.tensor([[-1.0, -1.0]]), torch.ones(1, 2), cfg=cfg)
    close(loss, 2.5)
    close(met["dual_clip_frac"], 0.5)
    loss.backward()
    close(logp.grad, [[0.0, 2.0 / 2]])
    # without the dual clip the same batch costs (5 + 2) / 2
    loss, _ = POLICY_LOSSES["ppo_clip"](_logp([5.0, 2.0]), torch.zeros(1, 2), torch.tensor([[-1.0, -1.0]]), torch.ones(1, 2))
    close(loss, 3.5)
    # positive advantages are untouched by the dual clip: A=+1, r=5 -> -1.2
    loss, met = POLICY_LOSSES["ppo_clip"](_logp([5.0]), torch.zeros(1, 1), torch.tensor([[1.0]]), torch.ones(1, 1), cfg=cfg)
    close(loss, -1.2)
    close(met["dual_clip_frac"], 0.0)
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossConfig(dual_clip=0.5)


def test_is_weights_and_reinforce():
    logp = _logp([0.5, 0.25])
    adv = torch.tensor([[2.0, -1.0]])
    w = truncated_is_weights(torch.log(torch.tensor([[0.6, 0.3]])), torch.log(torch.tensor([[0.2, 0.3]])), cap=2.0)
    close(w, [[2.0, 1.0]])  # 0.6/0.2 = 3 capped at 2; 0.3/0.3 = 1
    # ppo_clip at ratio 1 (old = logp): per token -A; weighted: (-2*2 + 1*1) / 2
    loss, _ = POLICY_LOSSES["ppo_clip"](logp, logp.detach(), adv, torch.ones(1, 2), is_weights=w)
    close(loss, (-4.0 + 1.0) / 2)
    # reinforce: -A * logp = (-2 ln .5 + ln .25) / 2 = 0; its gradient is -A / 2
    loss, met = POLICY_LOSSES["reinforce"](logp, logp.detach(), adv, torch.ones(1, 2))
    close(loss, 0.0)
    loss.backward()
    close(logp.grad, [[-1.0, 0.5]])
    close(met["approx_kl"], 0.0)


def test_approx_kl_metric_is_k3():
    # r = 2: r - 1 - ln r = 1 - ln 2
    _, met = POLICY_LOSSES["ppo_clip"](_logp([2.0]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    close(met["approx_kl"], 1 - math.log(2))


def test_seq_mean_token_sum_norm_through_config():
    cfg = PolicyLossConfig(aggregation="seq_mean_token_sum_norm", aggregation_constant=4)
    logp = torch.zeros(2, 3, requires_grad=True)  # ratio 1 -> per-token loss -A
    adv = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    loss, _ = POLICY_LOSSES["ppo_clip"](logp, torch.zeros(2, 3), adv, torch.tensor([[1, 1, 1], [1, 0, 0]]), cfg=cfg)
    close(loss, -(3 + 2) / (2 * 4))
    with pytest.raises(ValueError, match="aggregation_constant"):
        PolicyLossConfig(aggregation="seq_mean_token_sum_norm")


# ------------------------------------------------------------------------------------ value, entropy


def test_value_loss_clipping():
    # token 0: V=2, V_old=1, R=3, c=0.5: unclipped (2-3)^2 = 1; clipped V=1.5 -> 2.25; max 2.25 (clip active)
    # token 1: V=1.2, V_old=1, R=0: inside the clip range -> 1.44 both
    # token 2: padding with junk
    values = torch.tensor([[2.0, 1.2, 50.0]], requires_grad=True)
    old, ret, mask = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[3.0, 0.0, -50.0]]), torch.tensor([[1, 1, 0]])
    loss, met = value_loss(values, old, ret, mask, clip=0.5)
    close(loss, 0.5 * (2.25 + 1.44) / 2)
    close(met["vf_clip_frac"], 0.5)
    loss.backward()
    close(values.grad, [[0.0, 0.5 * 2 * 1.2 / 2, 0.0]])  # clipped token gets no gradient
    loss, met = value_loss(values, old, ret, mask, clip=None)
    close(loss, 0.5 * (1.0 + 1.44) / 2)
    close(met["vf_clip_frac"], 0.0)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    close(explained_variance(ret, ret, mask), 1.0)  # perfect critic
    close(explained_variance(torch.full_like(ret, 3.0), ret, mask), 0.0)  # the mean: no better than a constant
    assert torch.isnan(explained_variance(ret, torch.ones_like(ret), mask))  # Var[R] = 0: undefined


def test_entropy_from_logits():
    close(entropy_from_logits(torch.zeros(2, 4)), [math.log(4)] * 2)
    close(entropy_from_logits(torch.tensor([0.0, 0.0, float("-inf")])), math.log(2))
    close(entropy_from_logits(torch.tensor([1000.0, 0.0])), 0.0)  # stable for large logits
