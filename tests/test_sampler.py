"""The hf engine's inverse-CDF sampler draws from the distribution transformers' sampling draws from."""

import torch

from rlkit.rollout.sampler import InverseCdfSampler, nucleus_drop


def _draw(logits, temperature, top_p, n):
    sampler = InverseCdfSampler(temperature, top_p)
    scores = logits.expand(n, -1).clone()
    out = sampler(None, scores)
    token = out.argmax(-1)
    assert torch.equal(out.isfinite().sum(-1), torch.ones(n, dtype=torch.long))  # one token per row, score 0
    return token, sampler.logprobs()[:, 0]


def test_frequencies_and_logprobs_follow_temperature_and_top_p():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.3, 0.8)):
        z = logits[0] / temperature
        z = z.masked_fill(nucleus_drop(z[None], top_p)[0], float("-inf"))
        want = z.softmax(-1)
        token, lp = _draw(logits, temperature, top_p, 200_000)
        freq = torch.bincount(token, minlength=6).double() / token.numel()
        assert torch.allclose(freq, want.double(), atol=4e-3), (temperature, top_p, freq, want)
        assert torch.allclose(lp, want.log()[token])
        assert (want[token] > 0).all()  # never a token outside the nucleus


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert nucleus_drop(probs.log(), 0.8).tolist() == [[False, False, True, True]]
    assert nucleus_drop(probs.log(), 0.81).tolist() == [[False, False, False, True]]
    assert nucleus_drop(probs.log(), 0.1).tolist() == [[False, True, True, True]]  # at least one token
