"""Loss aggregation (``AGGREGATIONS``): a per-token loss matrix -> a scalar, and what each mode divides by.

Every mode is ``numerator(loss_mat, mask) / count`` (Dr. GRPO's also divides by ``constant``), and the entry
says what its count is, so a caller can normalise by the count of a larger batch::

    aggregate(loss_mat, mask, mode, constant)                       # numerator / this micro-batch's count
    aggregate(loss_mat, mask, mode, constant, global_count=n)       # numerator / n, n = loss_count(mode, whole)

- ``token_mean``: sum over all valid tokens / number of valid tokens (DAPO, Yu et al. 2025: every token weighs
  the same, long answers are not down-weighted).
- ``seq_mean_token_mean``: per-sequence mean over its tokens, then mean over sequences (GRPO as in Shao et
  al. 2024; Liu et al. 2025 show it biases toward long wrong answers).
- ``seq_mean_token_sum``: per-sequence sum, then mean over sequences.
- ``seq_mean_token_sum_norm``: sum over all valid tokens / (B * constant), ``constant`` = the maximum
  generation length (Dr. GRPO, Liu et al. 2025): a normaliser that does not depend on the data.
  ``constant`` is required (verl falls back to the padded width T, which changes batch to batch).

Counts: valid tokens (token_mean); sequences with at least one valid token (the two seq_mean modes: an
all-zero row, e.g. a filtered overlong sample, is absent); all sequences B (seq_mean_token_sum_norm, whose
point is a fixed denominator). A batch with no valid token gives a loss of 0.

The global normaliser: split a mini-batch into micro-batches (and processes), pass every micro-batch the
mini-batch's ``loss_count`` (summed over processes), and the micro-batch losses add up to the mini-batch's
loss exactly, for every mode (the per-sequence means of the seq_mean modes live inside a row, so splitting
by rows keeps them whole).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rlkit.algos.utils import Registry, masked_mean, masked_sum

_TINY = 1e-12  # floor of a count: nothing valid -> 0 / _TINY = 0, as the masked reductions


@dataclass(frozen=True)
class Aggregation:
    """One aggregation mode: ``numerator(loss_mat, mask) / (count(mask) [* constant])``.

    Attributes:
        divides_by: what the count is, in words (for docs and messages).
        numerator: ``(loss_mat Tensor[B, T], mask Tensor[B, T]) -> Tensor[]``; additive over rows.
        count: ``(mask Tensor[B, T], dtype) -> Tensor[]``; additive over rows.
        needs_constant: the count is also multiplied by ``constant`` (required, > 0).
    """

    divides_by: str
    numerator: Callable[[Tensor, Tensor], Tensor]
    count: Callable[[Tensor, torch.dtype], Tensor]
    needs_constant: bool = False

    def __call__(self, loss_mat: Tensor, mask: Tensor, *, constant: float | None = None,
                 global_count: Tensor | float | None = None) -> Tensor:
        """``aggregate`` with this mode (no shape check): Tensor[B, T] x2 -> Tensor[]."""
        if self.needs_constant and (constant is None or constant <= 0):
            raise ValueError("aggregation 'seq_mean_token_sum_norm' needs constant > 0 (the max generation length)")
        num = self.numerator(loss_mat, mask)
        if global_count is None:
            n = self.count(mask, num.dtype)
        else:  # in at least float32 (a bf16 count of 1001 tokens would be 1000)
            # the global normaliser, as verl's agg_loss: a process with more tokens weighs more (DDP then averages
            # gradients over processes, so the loop multiplies the loss by the world size)
            n = torch.as_tensor(global_count, device=num.device).to(torch.promote_types(num.dtype, torch.float32))
        if self.needs_constant:
            n = n * constant
        return (num / n.clamp_min(_TINY)).to(num.dtype)


def _tokens(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return mask.to(dtype).sum()


def _nonempty(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return (mask != 0).any(dim=-1).to(dtype).sum()


def _rows(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.tensor(mask.shape[0], dtype=dtype, device=mask.device)


def _seq_total(per_seq: Tensor, mask: Tensor) -> Tensor:
    return masked_sum(per_seq, (mask != 0).any(dim=-1))


AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")
AGGREGATIONS.register("token_mean")(Aggregation("valid tokens", masked_sum, _tokens))
AGGREGATIONS.register("seq_mean_token_mean")(Aggregation(
    "sequences with a valid token", lambda x, m: _seq_total(masked_mean(x, m, dim=-1), m), _nonempty))
AGGREGATIONS.register("seq_mean_token_sum")(Aggregation(
    "sequences with a valid token", lambda x, m: _seq_total(masked_sum(x, m, dim=-1), m), _nonempty))
AGGREGATIONS.register("seq_mean_token_sum_norm")(Aggregation(
    "all sequences (times constant)", masked_sum, _rows, needs_constant=True))


def loss_count(mode: str, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """What aggregation ``mode`` divides a batch with this mask by (before ``constant``); no host sync.

    Args:
        mode: a name in ``AGGREGATIONS``.
        mask: Tensor[B, T] 0/1 of the whole mini-batch (this process's share; all-reduce the result).
        dtype: of the count; float32 is exact up to 2**24.
    Returns:
        Tensor[] on ``mask``'s device: valid tokens, sequences with a valid token, or sequences.
    """
    return AGGREGATIONS[mode].count(mask, dtype)


def aggregate(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    constant: float | None = None,
    global_count: Tensor | float | None = None,
) -> Tensor:
    """``AGGREGATIONS[mode]``: the per-token loss as a scalar, divided by the local or the global count.

    Global normaliser (verl's ``agg_loss``): divide by the whole mini-batch's count over all processes, so a
    process with more tokens weighs more; DDP averages gradients over processes, so the loop multiplies by
    the world size.

    Args:
        loss_mat: Tensor[B, T] per-token loss.
        mask: Tensor[B, T] 0/1.
        mode: a name in ``AGGREGATIONS``.
        constant: the normaliser of ``seq_mean_token_sum_norm``; ignored by the other modes.
        global_count: ``loss_count(mode, mini_batch_mask)`` summed over processes (Tensor[] or float);
            None = this batch's own count.
    Returns:
        Tensor[] scalar.
    """
    if loss_mat.shape != mask.shape or loss_mat.dim() != 2:
        raise ValueError(f"loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    return AGGREGATIONS[mode](loss_mat, mask, constant=constant, global_count=global_count)
