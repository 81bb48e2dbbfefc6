"""The fused LM head + log-softmax (rlkit.trainers.head) against the plain autograd path."""

import torch

from rlkit.trainers.head import linear_logprobs


def _plain(h, t, w, b, temperature):
    z = torch.nn.functional.linear(h, w, b).float() / temperature
    logp = z.log_softmax(-1)
    return logp.gather(-1, t[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_gradients_match_autograd_in_float64():
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda h, w, b: linear_logprobs(h, t, w, b, 0.7)[0], (h, w, b))
    lp, ent = linear_logprobs(h, t, w, b, 0.7, with_entropy=True)
    ref_lp, ref_ent = _plain(h, t, w, b, 0.7)
    assert torch.allclose(lp, ref_lp.double(), atol=1e-5) and torch.allclose(ent, ref_ent.double(), atol=1e-5)
    assert not ent.requires_grad


def test_bf16_autocast_matches_the_autocast_path_and_keeps_fp32_grads():
    """Under bf16 autocast the matmuls run in bf16 in the forward and the backward (as autocast's linear
    would), the logits and the returned log-probs are fp32, the weight's gradient is fp32."""
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(300, 32, requires_grad=True)
    t = torch.randint(0, 300, (64,))
    g = torch.randn(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = linear_logprobs(h, t, w, None, 1.0, with_entropy=True)
    (lp * g).sum().backward()
    fused = (lp.detach(), ent, h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_lp, ref_ent = _plain(h, t, w, None, 1.0)
    (ref_lp * g).sum().backward()
    assert lp.dtype == torch.float32 and fused[3].dtype == torch.float32
    assert torch.allclose(fused[0], ref_lp, atol=1e-4) and torch.allclose(fused[1], ref_ent, atol=1e-4)
    for a, b in ((fused[2], h.grad), (fused[3], w.grad)):
        assert ((a - b).norm() / b.norm()) < 1e-2
    # and bf16 did run: fp32 matmuls give other log-probs
    assert not torch.allclose(fused[0], _plain(h, t, w, None, 1.0)[0], atol=1e-4)
