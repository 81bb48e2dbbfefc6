"""rlkit.algos: every expected value below is worked out by hand in the test, on tiny literal tensors.

The variants are configured by their schemas (GRPOAdvantage, PPOClipLoss, KLConfig, ...); a call without one
uses that schema's defaults."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from rlkit.algos import (
    ADVANTAGE_SCHEMAS,
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    NEEDS_VALUES,
    POLICY_LOSS_SCHEMAS,
    POLICY_LOSSES,
    AdaptiveKL,
    Advantage,
    DrGRPOAdvantage,
    FixedKL,
    GAEAdvantage,
    GRPOAdvantage,
    KLConfig,
    PolicyLoss,
    PPOClipLoss,
    ReinforceLoss,
    ReinforcePPAdvantage,
    RLOOAdvantage,
    aggregate,
    compute_advantages,
    compute_kl,
    compute_policy_loss,
    entropy_from_logits,
    explained_variance,
    loss_count,
    make_kl_controller,
    masked_mean,
    masked_sum,
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
    cfg = GRPOAdvantage(std_normalize="batch")
    adv, _ = ADVANTAGES["grpo"](rewards=REWARDS, mask=MASK, group_ids=GROUPS, cfg=cfg)
    # batch std of [1,0,1,1]: mean .75, squares .0625+.5625+.0625+.0625 = .75, /3 = .25 -> std .5
    close(adv[:, 0], [1.0, -1.0, 0.0, 0.0])
    adv, _ = ADVANTAGES["grpo"](rewards=REWARDS, mask=MASK, group_ids=GROUPS, cfg=GRPOAdvantage(std_normalize="none"))
    close(adv[:, 0], [0.5, -0.5, 0.0, 0.0])


def test_grpo_non_contiguous_group_ids_and_singleton():
    # ids 7 and 3 interleaved; id 5 alone -> 0 (std undefined)
    adv, _ = ADVANTAGES["grpo"](
        rewards=torch.tensor([1.0, 2.0, 0.0, 4.0, 9.0]),
        mask=torch.ones(5, 1),
        group_ids=torch.tensor([7, 3, 7, 3, 5]),
        cfg=GRPOAdvantage(),
    )
    # group 7: {1, 0} -> +-1/sqrt2; group 3: {2, 4}: mean 3, std sqrt2 -> -+1/sqrt2
    close(adv[:, 0], [S, -S, -S, S, 0.0])


def test_grpo_advantages_sum_to_zero_per_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=g)
    groups = torch.arange(6).repeat_interleave(4)[torch.randperm(24, generator=g)]
    mask = torch.ones(24, 1)
    for std_normalize in ("group", "batch", "none"):
        adv, _ = ADVANTAGES["grpo"](rewards=rewards, mask=mask, group_ids=groups, cfg=GRPOAdvantage(std_normalize=std_normalize))
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
    cfg = GAEAdvantage(gamma=0.5, lam=0.5, whiten=False)
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
    kw = {"rewards": torch.tensor([3.0]), "mask": torch.ones(1, 2), "values": torch.zeros(1, 2), "token_rewards": torch.tensor([[-1.0, 0.0]])}
    adv, ret = ADVANTAGES["gae"](**kw, cfg=GAEAdvantage(lam=1.0, whiten=False))
    close(adv, [[2.0, 3.0]])
    close(ret, [[2.0, 3.0]])
    adv, ret = ADVANTAGES["gae"](**kw, cfg=GAEAdvantage(lam=1.0, whiten=True))
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
        cfg=ReinforcePPAdvantage(gamma=0.5),
    )
    close(ret, [[0.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
    sd = math.sqrt(0.7)
    close(adv, [[-0.8 / sd, -0.8 / sd, 0.2 / sd], [0.2 / sd, 1.2 / sd, 0.0]])


def test_all_masked_row_gets_zero_advantage_everywhere():
    mask = torch.tensor([[1, 1], [0, 0]])
    for name in ADVANTAGES:
        adv, ret = compute_advantages(  # the schema of a bare name, as the config loader builds it
            ADVANTAGE_SCHEMAS[name](), rewards=torch.tensor([1.0, 0.0]), mask=mask, group_ids=torch.tensor([0, 0]), values=torch.ones(2, 2)
        )
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all(), name
        assert (adv[1] == 0).all() and (ret[1] == 0).all(), name


def test_unknown_names_list_known_ones():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'grpoo'; known: dr_grpo, gae, grpo, reinforce_pp, rloo"):
        ADVANTAGES["grpoo"]
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; known: k1, k2, k3"):
        KL_ESTIMATORS["k4"]
    with pytest.raises(ValueError, match=r"known: cispo, gspo, ppo_clip, reinforce, sapo"):
        POLICY_LOSSES["ppo"]
    with pytest.raises(ValueError, match=r"known: seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm, token_mean"):
        aggregate(torch.ones(1, 1), torch.ones(1, 1), "mean")
    with pytest.raises(ValidationError, match=r"'fixed' or 'adaptive'"):
        KLConfig(coef=0.1, controller="pid")
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'; known: dr_grpo, gae, grpo, reinforce_pp, rloo"):
        ADVANTAGE_SCHEMAS["ppo"]
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo'; known: cispo, gspo, ppo_clip, reinforce, sapo"):
        POLICY_LOSS_SCHEMAS["ppo"]
    with pytest.raises(ValueError, match=r"unknown loss aggregation 'sum'"):
        loss_count("sum", torch.ones(1, 1))
    with pytest.raises(ValidationError, match="std_normalize"):
        GRPOAdvantage(std_normalize="global")


# ------------------------------------------------------------------------------------------- schemas


def test_each_advantage_variant_has_exactly_the_knobs_its_estimator_reads():
    keys = {name: tuple(ADVANTAGE_SCHEMAS[name].model_fields) for name in ADVANTAGE_SCHEMAS}
    assert keys == {
        "grpo": ("name", "std_normalize"),
        "dr_grpo": ("name",),
        "rloo": ("name",),
        "reinforce_pp": ("name", "gamma"),
        "gae": ("name", "gamma", "lam", "whiten", "value_model", "value_learning_rate", "value_clip"),
    }
    assert list(ADVANTAGE_SCHEMAS) == list(ADVANTAGES)  # a schema for every estimator, under its name
    for name in ADVANTAGE_SCHEMAS:
        assert ADVANTAGE_SCHEMAS[name]().name == name
        assert all(f.description for f in ADVANTAGE_SCHEMAS[name].model_fields.values()), name
    assert {n for n in ADVANTAGE_SCHEMAS if ADVANTAGE_SCHEMAS[n].needs_values} == {"gae"} == set(NEEDS_VALUES)
    assert {n for n in ADVANTAGE_SCHEMAS if ADVANTAGE_SCHEMAS[n].compares_group} == {"grpo", "dr_grpo", "rloo"}
    g = GAEAdvantage()
    assert (g.gamma, g.lam, g.whiten, g.value_model, g.value_learning_rate, g.value_clip) == (1.0, 0.95, True, "policy", None, 0.2)
    assert ReinforcePPAdvantage().gamma == 1.0 and GRPOAdvantage().std_normalize == "group"


def test_advantage_union_picks_the_variant_by_name_and_refuses_other_knobs():
    ta = TypeAdapter(Advantage)
    assert ta.validate_python({"name": "gae", "lam": 0.9}) == GAEAdvantage(lam=0.9)
    assert isinstance(ta.validate_python({"name": "rloo"}), RLOOAdvantage)
    with pytest.raises(ValidationError, match="std_normalize"):  # dr_grpo never divides by a std
        ta.validate_python({"name": "dr_grpo", "std_normalize": "batch"})
    with pytest.raises(ValidationError, match="lam"):  # reinforce_pp has no lambda
        ReinforcePPAdvantage(lam=0.9)
    with pytest.raises(ValidationError, match="eps"):  # not a user knob
        GRPOAdvantage(eps=0.1)
    for bad in ({"gamma": 1.5}, {"lam": -0.1}, {"value_clip": 0.0}, {"value_learning_rate": 0.0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            GAEAdvantage(**bad)
    with pytest.raises(ValidationError):
        GAEAdvantage(gamma=float("nan"))
    with pytest.raises(ValidationError, match="name"):
        ta.validate_python({"name": "ppo"})
    with pytest.raises(ValidationError, match="frozen"):
        GAEAdvantage().lam = 0.5


def test_compute_advantages_takes_the_schema_as_name_or_as_cfg():
    kw = {"rewards": REWARDS, "mask": MASK, "group_ids": GROUPS}
    by_schema, _ = compute_advantages(GRPOAdvantage(std_normalize="none"), **kw)
    by_cfg, _ = compute_advantages("grpo", cfg=GRPOAdvantage(std_normalize="none"), **kw)
    close(by_schema, by_cfg)
    close(by_schema[:, 0], [0.5, -0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="advantage estimator 'grpo' got the config of 'gae'"):
        compute_advantages("grpo", cfg=GAEAdvantage(), **kw)
    assert DrGRPOAdvantage.compares_group and not DrGRPOAdvantage.needs_values


def test_policy_loss_schemas():
    assert {n: tuple(POLICY_LOSS_SCHEMAS[n].model_fields) for n in POLICY_LOSS_SCHEMAS} == {
        "ppo_clip": ("name", "epsilon", "epsilon_high", "dual_clip"),
        "reinforce": ("name",),
        "gspo": ("name", "epsilon", "epsilon_high"),
        "cispo": ("name", "epsilon_max"),
        "sapo": ("name", "temperature_pos", "temperature_neg"),
    }
    assert list(POLICY_LOSS_SCHEMAS) == list(POLICY_LOSSES)
    assert ReinforceLoss.single_update_only and not PPOClipLoss.single_update_only
    ta = TypeAdapter(PolicyLoss)
    assert ta.validate_python({"name": "ppo_clip", "epsilon_high": 0.28}) == PPOClipLoss(epsilon_high=0.28)
    with pytest.raises(ValidationError, match="epsilon"):  # reinforce has no clip
        ta.validate_python({"name": "reinforce", "epsilon": 0.2})
    with pytest.raises(ValidationError, match=r"epsilon_high: must be >= epsilon \(clip-higher\)"):
        PPOClipLoss(epsilon=0.3, epsilon_high=0.2)
    for bad in ({"epsilon": 0.0}, {"epsilon": 1.0}, {"epsilon_high": 0.0}, {"dual_clip": 1.0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            PPOClipLoss(**bad)
    assert PPOClipLoss(epsilon_high=float("inf")).upper == math.inf  # .inf: no upper clip
    with pytest.raises(ValidationError):
        PPOClipLoss(epsilon=float("nan"))
    c = PPOClipLoss(epsilon=0.2, epsilon_high=0.28)
    close([c.lower, c.upper], [0.8, 1.28])
    # no upper clip: A=+1, r=100 is not clipped
    loss, met = POLICY_LOSSES["ppo_clip"](_logp([100.0]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1),
                                          cfg=PPOClipLoss(epsilon_high=float("inf")))
    close(loss, -100.0, tol=1e-3)
    close(met["clip_frac"], 0.0)
    args = (_logp([1.5]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="policy loss 'reinforce' got the config of 'ppo_clip'"):
        POLICY_LOSSES["reinforce"](*args, cfg=PPOClipLoss())
    loss, _ = compute_policy_loss(PPOClipLoss(epsilon=0.1), *args)  # the schema names the loss
    close(loss, -1.1)
    loss, _ = compute_policy_loss("ppo_clip", *args)  # no schema: PPOClipLoss()'s epsilon 0.2
    close(loss, -1.2)


def test_a_call_without_cfg_uses_its_schemas_defaults():
    kw = {"rewards": REWARDS, "mask": MASK, "group_ids": GROUPS, "values": torch.rand(4, 3), "token_rewards": torch.rand(4, 3)}
    for name in ADVANTAGES:
        for a, b in zip(ADVANTAGES[name](**kw), ADVANTAGES[name](**kw, cfg=ADVANTAGE_SCHEMAS[name]())):
            assert torch.equal(a, b), name
    assert not torch.equal(ADVANTAGES["gae"](**kw)[0], ADVANTAGES["gae"](**kw, cfg=GAEAdvantage(lam=1.0))[0])  # lam 0.95
    args = (GX, GOLD, GA, GM)
    for name in POLICY_LOSSES:
        lo, mo = POLICY_LOSSES[name](*args, is_weights=GW, aggregation="seq_mean_token_mean")
        ln, mn = compute_policy_loss(POLICY_LOSS_SCHEMAS[name](), *args, is_weights=GW, aggregation="seq_mean_token_mean")
        assert torch.equal(lo, ln) and mo.keys() == mn.keys() and all(torch.equal(mo[k], mn[k]) for k in mo), name
        assert torch.equal(POLICY_LOSSES[name](*args)[0], POLICY_LOSSES[name](*args, aggregation="token_mean")[0]), name


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
    down = make_kl_controller(KLConfig(coef=0.1, controller="adaptive", target=6.0, horizon=10000))
    down.update(3.0, n_steps=256)
    close(down.value, 0.1 * 0.99488, tol=1e-9)
    fixed = make_kl_controller(KLConfig(coef=0.05))
    assert isinstance(fixed, FixedKL) and fixed.update(100.0, 256) == 0.05
    assert FixedKL(0.0).update(3.0, 256) == 0.0  # no KL section: the loop's FixedKL(0.0)
    with pytest.raises(TypeError, match="make_kl_controller takes a KLConfig, got str"):  # no (kind, coef, ...) form
        make_kl_controller("fixed")
    with pytest.raises(TypeError):
        make_kl_controller("adaptive", 0.1, target=6.0, horizon=10000)
    with pytest.raises(ValidationError, match="target: the adaptive KL controller needs a target"):
        KLConfig(coef=0.1, controller="adaptive")


def test_kl_config():
    kl = KLConfig(coef=0.05)
    assert (kl.estimator, kl.where, kl.controller, kl.target, kl.horizon) == ("k3", "loss", "fixed", None, 10000)
    assert all(f.description for f in KLConfig.model_fields.values())
    # a full dump (every key at its default) loads; a value the fixed controller would ignore is refused
    assert KLConfig(**kl.model_dump()) == kl
    with pytest.raises(ValidationError, match=r"horizon: only used by the adaptive KL controller \(controller: adaptive\)"):
        KLConfig(coef=0.05, horizon=500)
    with pytest.raises(ValidationError, match=r"target: only used by the adaptive KL controller"):
        KLConfig(coef=0.05, target=6.0)
    for bad in ({"coef": 0.0}, {"coef": 0.1, "estimator": "k4"}, {"coef": 0.1, "where": "advantage"},
                {"coef": 0.1, "controller": "adaptive", "target": 0.0}, {"coef": 0.1, "horizon": 0}):
        with pytest.raises(ValidationError):
            KLConfig(**bad)
    with pytest.raises(ValidationError, match="coef"):
        KLConfig()
    ad = make_kl_controller(KLConfig(coef=0.1, controller="adaptive", target=6.0, horizon=500))
    assert isinstance(ad, AdaptiveKL) and (ad.value, ad.target, ad.horizon) == (0.1, 6.0, 500.0)
    logp, ref = torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, 0.0]])
    close(compute_kl(KLConfig(coef=0.1, estimator="k2"), logp, ref), [[0.5, 0.5]])


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


# -------------------------------------------------------------------------------- global normaliser

# Six ragged rows (one all-masked, junk under the padding), split unevenly into micro-batches and "processes".
G = torch.Generator().manual_seed(3)
GL = torch.randn(6, 5, generator=G)
GM = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
GL[GM == 0] = 1e4
SPLITS = [(0, 1), (1, 3), (3, 6)]  # micro-batches of 1, 2 and 3 rows
PROCESSES = [[(0, 1), (1, 3)], [(3, 4), (4, 6)]]  # two processes, two micro-batches each
MODES = [(m, 4.0 if AGGREGATIONS[m].needs_constant else None) for m in AGGREGATIONS]


def test_loss_count_by_hand():
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert {mode: float(loss_count(mode, m)) for mode in AGGREGATIONS} == {
        "token_mean": 4.0,  # valid tokens
        "seq_mean_token_mean": 2.0,  # sequences with a valid token
        "seq_mean_token_sum": 2.0,
        "seq_mean_token_sum_norm": 3.0,  # all sequences (the constant divides the numerator too)
    }
    assert loss_count("token_mean", m, dtype=torch.float64).dtype == torch.float64
    L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    close(aggregate(L, m, "token_mean", global_count=8), 10 / 8)
    close(aggregate(L, m, "seq_mean_token_mean", global_count=torch.tensor(4)), (2 + 4) / 4)
    close(aggregate(L, m, "seq_mean_token_sum", global_count=5.0), (6 + 4) / 5)
    close(aggregate(L, m, "seq_mean_token_sum_norm", constant=4, global_count=10), 10 / (10 * 4))
    close(aggregate(L, torch.zeros_like(m), "token_mean", global_count=0), 0.0)  # nothing valid anywhere: 0


@pytest.mark.parametrize("mode,constant", MODES)
def test_micro_batches_with_the_global_count_add_up_to_the_whole_batch(mode, constant):
    whole = aggregate(GL, GM, mode, constant)
    n = loss_count(mode, GM)
    parts = sum(aggregate(GL[a:b], GM[a:b], mode, constant, global_count=n) for a, b in SPLITS)
    close(parts, whole, tol=1e-6)
    # the processes' counts summed (the loop's all-reduce) normalise each process's micro-batches
    n = sum(loss_count(mode, GM[p[0][0] : p[-1][1]]) for p in PROCESSES)
    parts = sum(aggregate(GL[a:b], GM[a:b], mode, constant, global_count=n) for p in PROCESSES for a, b in p)
    close(parts, whole, tol=1e-6)
    # each micro-batch's own count does not add up (the test can tell)
    local = sum(aggregate(GL[a:b], GM[a:b], mode, constant) for a, b in SPLITS)
    assert abs(float(local - whole)) > 1e-3


def _old_aggregate(L, m, mode, constant):
    """The aggregations as they were before the global normaliser, verbatim."""
    nonempty = (m != 0).any(dim=-1)
    return {
        "token_mean": lambda: masked_mean(L, m),
        "seq_mean_token_mean": lambda: masked_mean(masked_mean(L, m, dim=-1), nonempty),
        "seq_mean_token_sum": lambda: masked_mean(masked_sum(L, m, dim=-1), nonempty),
        "seq_mean_token_sum_norm": lambda: masked_sum(L, m) / (L.shape[0] * constant),
    }[mode]()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_local_count_is_bit_identical_to_before(dtype):
    g = torch.Generator().manual_seed(4)
    L = (torch.randn(7, 33, generator=g) * 3).to(dtype)
    m = (torch.rand(7, 33, generator=g) > 0.3).long()
    m[2] = 0
    for mode in AGGREGATIONS:
        for constant in (16.0, 64.0, 3.0):
            assert torch.equal(aggregate(L, m, mode, constant), _old_aggregate(L, m, mode, constant)), (mode, constant)


def _loss_and_grad(fn, micro: bool, mode, constant):
    """fn(rows, global_count) -> loss on those rows; the whole batch, or its micro-batches with the global count."""
    x = GX.clone().requires_grad_(True)
    if micro:
        n = loss_count(mode, GM)
        loss = sum(fn(x, a, b, mode, constant, n) for a, b in SPLITS)
    else:
        loss = fn(x, 0, 6, mode, constant, None)
    loss.backward()
    return loss.detach(), x.grad


GX = torch.randn(6, 5, generator=G) * 0.3  # log-probs / values
GOLD = GX + torch.randn(6, 5, generator=G) * 0.2  # old log-probs / old values: ratios around 1, some clipped
GA = torch.randn(6, 5, generator=G)  # advantages / returns
GW = torch.rand(6, 5, generator=G) + 0.5  # importance weights


def _ppo(x, a, b, mode, constant, n):
    cfg = PPOClipLoss(epsilon=0.1, epsilon_high=0.15, dual_clip=2.0)
    return POLICY_LOSSES["ppo_clip"](x[a:b], GOLD[a:b], GA[a:b], GM[a:b], cfg=cfg, is_weights=GW[a:b],
                                     aggregation=mode, constant=constant, global_count=n)[0]


def _reinforce(x, a, b, mode, constant, n):
    return compute_policy_loss(ReinforceLoss(), x[a:b], GOLD[a:b], GA[a:b], GM[a:b], aggregation=mode,
                               constant=constant, global_count=n)[0]


def _value(x, a, b, mode, constant, n):
    return value_loss(x[a:b], GOLD[a:b], GA[a:b], GM[a:b], clip=0.1, aggregation=mode, constant=constant,
                      global_count=n)[0]


@pytest.mark.parametrize("fn", [_ppo, _reinforce, _value], ids=["ppo_clip", "reinforce", "value_loss"])
@pytest.mark.parametrize("mode,constant", MODES)
def test_losses_with_the_global_count_add_up_to_the_whole_batch(fn, mode, constant):
    whole, g_whole = _loss_and_grad(fn, False, mode, constant)
    parts, g_parts = _loss_and_grad(fn, True, mode, constant)
    close(parts, whole, tol=1e-6)
    close(g_parts, g_whole, tol=1e-6)
    assert float(g_whole.abs().max()) > 1e-3  # a real gradient


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
    cfg = PPOClipLoss(epsilon=0.2, epsilon_high=0.28)
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
    cfg = PPOClipLoss(dual_clip=3.0)
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
    with pytest.raises(ValidationError, match="dual_clip"):
        PPOClipLoss(dual_clip=0.5)


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


def test_seq_mean_token_sum_norm_through_the_loss():
    logp = torch.zeros(2, 3, requires_grad=True)  # ratio 1 -> per-token loss -A
    adv = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    args = (logp, torch.zeros(2, 3), adv, torch.tensor([[1, 1, 1], [1, 0, 0]]))
    loss, _ = POLICY_LOSSES["ppo_clip"](*args, cfg=PPOClipLoss(), aggregation="seq_mean_token_sum_norm", constant=4)
    close(loss, -(3 + 2) / (2 * 4))
    with pytest.raises(ValueError, match="constant"):
        POLICY_LOSSES["ppo_clip"](*args, cfg=PPOClipLoss(), aggregation="seq_mean_token_sum_norm")


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
