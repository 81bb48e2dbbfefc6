"""gspo, cispo and sapo (rlkit.algos.ratio_losses) against values computed by hand, and their gradients' signs."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.algos import POLICY_LOSSES, CISPOLoss, GSPOLoss, SAPOLoss, compute_policy_loss, ppo_clip

# two sequences: the first has 2 valid tokens, the second 3
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
OLD = torch.zeros(2, 3)


def _logp(values):
    return torch.tensor(values, requires_grad=True)


def test_gspo_clips_the_sequence_ratio():
    # sequence 1: log r = (0.1, 0.3) -> s = exp(0.2); sequence 2: log r = (0, 0, 0.0003) -> s = exp(1e-4)
    logp = _logp([[0.1, 0.3, 5.0], [0.0, 0.0, 3e-4]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    cfg = GSPOLoss(epsilon=0.1, epsilon_high=0.1)
    loss, m = compute_policy_loss(cfg, logp, OLD, adv, MASK)
    s1, s2 = math.exp(0.2), math.exp(1e-4)
    # s1 > 1.1 with A > 0: clipped at 1.1 (no gradient); s2 inside the range: -A s2 = 2 s2
    per_token = [-1.1, -1.1, 2 * s2, 2 * s2, 2 * s2]
    assert loss.item() == pytest.approx(sum(per_token) / 5, rel=1e-6)
    assert m["clip_frac_high"].item() == pytest.approx(2 / 5) and m["clip_frac_low"].item() == 0
    assert m["ratio_max"].item() == pytest.approx(s1, rel=1e-6)
    loss.backward()
    g = logp.grad
    assert torch.all(g[0] == 0)  # the clipped sequence gives no gradient
    # token t of sequence 2: d/dlogp_t of (2 s2) / 5 = 2 s2 / 5 (GSPO-token: each token carries the sequence ratio)
    assert g[1].tolist() == pytest.approx([2 * s2 / 5] * 3, rel=1e-6)
    assert torch.all(g[1] > 0)  # a negative advantage pushes the log-probs down (the loss grows with them)


def test_gspo_equals_ppo_clip_on_policy_with_sequence_advantages():
    """At old == new every ratio is 1: GSPO's gradient is the policy gradient, as ppo_clip's."""
    logp = _logp([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]])
    old = logp.detach().clone()
    a, _ = compute_policy_loss("gspo", logp, old, adv, MASK)
    a.backward()
    ga = logp.grad.clone()
    logp.grad = None
    b, _ = ppo_clip(logp, old, adv, MASK)
    b.backward()
    assert torch.allclose(ga, logp.grad) and a.item() == pytest.approx(b.item())


def test_cispo_weights_every_token_by_its_capped_ratio():
    # ratios e^2 ≈ 7.39 (capped at 5), e^0 = 1, e^-1
    logp = _logp([[2.0, 0.0, 0.0], [-1.0, 0.5, 0.0]])
    adv = torch.tensor([[1.0, -1.0, 0.0], [2.0, 1.0, -1.0]])
    loss, m = compute_policy_loss(CISPOLoss(epsilon_max=5.0), logp, OLD, adv, MASK)
    w = [5.0, 1.0, math.exp(-1.0), math.exp(0.5), 1.0]
    a = [1.0, -1.0, 2.0, 1.0, -1.0]
    lp = [2.0, 0.0, -1.0, 0.5, 0.0]
    assert loss.item() == pytest.approx(sum(-wi * ai * li for wi, ai, li in zip(w, a, lp)) / 5, rel=1e-6)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 5)
    loss.backward()
    # the gradient is -w A / 5 per token: never 0 for a capped token (no token is dropped), sign -A
    expected = [[-5.0 / 5, 1.0 / 5, 0.0], [-2 * math.exp(-1.0) / 5, -math.exp(0.5) / 5, 1.0 / 5]]
    assert logp.grad.tolist()[0] == pytest.approx(expected[0], rel=1e-6)
    assert logp.grad.tolist()[1] == pytest.approx(expected[1], rel=1e-6)


def test_sapo_is_a_smooth_gate_with_the_policy_gradient_at_ratio_one():
    logp = _logp([[0.0, 1.0, 0.0], [0.0, -1.0, 0.5]])
    adv = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, 2.0]])
    cfg = SAPOLoss(temperature_pos=1.0, temperature_neg=2.0)
    loss, m = compute_policy_loss(cfg, logp, OLD, adv, MASK)

    def f(r, tau):
        return 4 / tau / (1 + math.exp(-tau * (r - 1)))

    r = [1.0, math.e, 1.0, math.exp(-1.0), math.exp(0.5)]
    a = [1.0, 1.0, -1.0, -1.0, 2.0]
    tau = [1.0, 1.0, 2.0, 2.0, 1.0]
    assert loss.item() == pytest.approx(sum(-ai * f(ri, ti) for ri, ai, ti in zip(r, a, tau)) / 5, rel=1e-6)
    assert m["clip_frac"].item() == 0
    loss.backward()
    g = logp.grad
    # d/dlogp of -A f(r) = -A * 4 sigma (1 - sigma) r; at r = 1 that is -A (the policy gradient), for any tau
    assert g[0, 0].item() == pytest.approx(-1.0 / 5) and g[1, 0].item() == pytest.approx(1.0 / 5)
    # far from r = 1 the gate fades: the token at r = e gets less than the policy gradient
    assert 0 > g[0, 1].item() > -math.e / 5


@pytest.mark.parametrize("name", ["gspo", "cispo", "sapo"])
def test_registered_with_the_ppo_metric_keys_and_is_weights(name):
    logp = _logp([[-1.0, -0.5, 0.0], [-0.2, -0.1, -0.3]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    old = logp.detach() - 0.01
    loss, m = POLICY_LOSSES[name](logp, old, adv, MASK)
    _, ppo = ppo_clip(logp, old, adv, MASK)
    assert set(m) == set(ppo)
    # an importance weight of 0 on a token removes it: the same loss as that token masked out of the numerator
    w = torch.ones(2, 3)
    w[1, 1] = 0.0
    weighted, _ = POLICY_LOSSES[name](logp, old, adv, MASK, is_weights=w)
    assert weighted.item() != pytest.approx(loss.item())
    with pytest.raises(ValueError, match=f"policy loss '{name}' got the config of 'ppo_clip'"):
        POLICY_LOSSES[name](logp, old, adv, MASK, cfg=__import__("rlkit.algos", fromlist=["PPOClipLoss"]).PPOClipLoss())


# ------------------------------------------------------------------------------------ rollout correction


def test_mask_mode_drops_exactly_the_tokens_outside_the_range():
    from rlkit.algos import masked_fraction, rollout_is_weights

    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.zeros(1, 4)
    # rho = e^0.5 ≈ 1.65 (kept at cap 2), e^1 ≈ 2.72 (dropped), e^-1 ≈ 0.37 (dropped: < 1/2), padding
    sampler = torch.tensor([[-0.5, -1.0, 1.0, 9.0]])
    w = rollout_is_weights(old, sampler, mask, 2.0, "mask", "token")
    assert w[0, :3].tolist() == [1.0, 0.0, 0.0]
    assert masked_fraction(w, mask) == pytest.approx(2 / 3)
    t = rollout_is_weights(old, sampler, mask, 2.0, "truncate", "token")
    assert t[0, :3].tolist() == pytest.approx([math.exp(0.5), 2.0, math.exp(-1.0)])


def test_sequence_level_truncates_or_masks_whole_sequences():
    from rlkit.algos import rollout_is_weights

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    old = torch.zeros(2, 3)
    # sequence 1: log rho (0.2, 1.8) -> mean 1.0 -> rho e ≈ 2.72 (outside [1/2, 2]); sequence 2: (0.3, -0.3, 0.3)
    sampler = -torch.tensor([[0.2, 1.8, 5.0], [0.3, -0.3, 0.3]])
    w = rollout_is_weights(old, sampler, mask, 2.0, "mask", "sequence")
    assert w[0, :2].tolist() == [0.0, 0.0] and w[1].tolist() == [1.0, 1.0, 1.0]
    t = rollout_is_weights(old, sampler, mask, 2.0, "truncate", "sequence")
    assert t[0, :2].tolist() == [2.0, 2.0] and t[1].tolist() == pytest.approx([math.exp(0.1)] * 3)
    with pytest.raises(ValueError, match="cap must be > 1"):
        rollout_is_weights(old, sampler, mask, 1.0, "mask")
