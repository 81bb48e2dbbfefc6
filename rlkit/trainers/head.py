"""The LM head and the log-softmax in one autograd step: the log-probs (and the entropy) of a chunk of hidden
states' target tokens, with the chunk's full-vocabulary logits alive only inside the forward and inside the
backward (recomputed there), never saved between them (Liger's fused linear cross-entropy idea).

    lp, ent = linear_logprobs(h, targets, head.weight, head.bias, temperature=0.9, with_entropy=True)

Against ``checkpoint(linear -> log_softmax -> gather)`` it skips the log-softmax's recompute and its backward
kernel: the gradient of ``lp = z[t] - logsumexp(z)`` with respect to the logits ``z`` is ``onehot(t) - softmax(z)``,
one exp over the recomputed logits. The logits are fp32 whatever the matmul's dtype; under autocast the matmuls
run in the autocast dtype (the inputs are cast explicitly, in the forward and again in the backward, which autograd
runs outside the autocast region). The entropy carries no gradient (the RL losses read it as a metric or under
``detach``).
"""

from __future__ import annotations

import torch


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    kind = weight.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def _logits(h, weight, bias, dtype, temperature: float) -> torch.Tensor:
    with torch.autocast(weight.device.type, enabled=False):
        z = torch.nn.functional.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    z = z.to(torch.promote_types(z.dtype, torch.float32))             # fp32 (fp64 stays fp64)
    return z.div_(temperature) if temperature != 1.0 else z


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, targets, weight, bias, temperature: float, with_entropy: bool):
        dtype = _compute_dtype(weight)
        z = _logits(h, weight, bias, dtype, temperature)                  # [N, V] fp32
        lse = torch.logsumexp(z, dim=-1)
        lp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        if with_entropy:
            z.sub_(lse.unsqueeze(-1))                                       # log p
            ent = -(z.exp() * z).sum(-1)
        else:
            ent = torch.zeros_like(lp)
        ctx.save_for_backward(h, targets, weight, bias, lse)
        ctx.dtype, ctx.temperature = dtype, temperature
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, _grad_ent):
        h, targets, weight, bias, lse = ctx.saved_tensors
        dtype, temperature = ctx.dtype, ctx.temperature
        z = _logits(h, weight, bias, dtype, temperature)
        g = z.sub_(lse.unsqueeze(-1)).exp_()                                # softmax
        gl = grad_lp.to(g.dtype).unsqueeze(-1)
        g.mul_(-gl).scatter_add_(-1, targets.unsqueeze(-1), gl)             # (onehot - softmax) * d lp
        if temperature != 1.0:
            g.div_(temperature)                                             # d lp / d (h W^T) = g / T
        gc = g.to(dtype)
        with torch.autocast(weight.device.type, enabled=False):
            grad_h = gc @ weight.to(dtype) if ctx.needs_input_grad[0] else None
            grad_w = gc.t() @ h.to(dtype) if ctx.needs_input_grad[2] else None
        grad_b = g.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None
        return (None if grad_h is None else grad_h.to(h.dtype), None,
                None if grad_w is None else grad_w.to(weight.dtype), grad_b, None, None)


def linear_logprobs(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    temperature: float = 1.0, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [N] of ``targets`` [N] under ``softmax(h @ weight.T + bias) / temperature`` for hidden states
    ``h`` [N, H], and the entropy [N] of that distribution (zeros without ``with_entropy``; no gradient)."""
    return _LinearLogprobs.apply(h, targets, weight, bias, float(temperature), bool(with_entropy))
