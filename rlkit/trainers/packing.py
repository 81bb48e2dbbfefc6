"""Padding-free forward passes: a rollout batch's sequences packed into as few rows as the longest one needs.

A ``RolloutBatch`` row is left-padded to the longest prompt and right-padded to the longest response, so a
forward over it computes every padding position too. Packed, each sequence (its prompt then its response's
real tokens) sits whole in one row beside others, its position ids restarting at 0; with no attention mask,
transformers reads the restarts as sequence boundaries and keeps attention inside each sequence
(``masking_utils.find_packed_sequence_indices``), for sdpa and eager attention alike. The rows are as long as
the longest sequence, filled first-fit-decreasing, so attention's cost per row is never above the padded
batch's.

    packed = pack(batch, pad_id)
    hidden = model(input_ids=packed.input_ids, position_ids=packed.position_ids, ...).hidden_states[-1]
    h = hidden[packed.rows, packed.cols]    # [N, H]: the states that predict the loss's N tokens, in the
    #                                         order of batch.loss_mask's nonzero entries (row-major)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor     # [R, C] sequences side by side (pad_id after the last one of a row)
    position_ids: torch.Tensor  # [R, C] 0, 1, ... within each sequence; 0 on the padding after them
    rows: torch.Tensor          # [N] the row of the state that predicts each kept token
    cols: torch.Tensor          # [N] its column
    targets: torch.Tensor       # [N] the kept tokens
    tokens: int                 # real tokens packed (the padded batch held B x (P + T) positions)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most ``capacity`` total length, longest first, each into the first
    bin with room."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack(batch, pad_id: int) -> Packed:
    """``batch``'s real tokens in packed rows, and where the states predicting its kept tokens
    (``loss_mask`` > 0) are."""
    attn = batch.attention_mask
    device = attn.device
    B, L = attn.shape
    T = batch.completion_len
    P = L - T
    starts = (attn.cumsum(-1) == 0).sum(-1).tolist()  # left padding before each sequence
    lengths = attn.sum(-1).tolist()
    capacity = max(1, max(lengths))
    bins = first_fit_decreasing(lengths, capacity)
    ids = torch.full((len(bins), capacity), pad_id, dtype=batch.input_ids.dtype, device=device)
    pos = torch.zeros((len(bins), capacity), dtype=torch.long, device=device)
    row_of, col_of = [0] * B, [0] * B
    for r, members in enumerate(bins):
        offset = 0
        for i in members:
            n = lengths[i]
            ids[r, offset : offset + n] = batch.input_ids[i, starts[i] : starts[i] + n]
            pos[r, offset : offset + n] = torch.arange(n, device=device)
            row_of[i], col_of[i] = r, offset
            offset += n
    keep = batch.loss_mask > 0
    b_idx, j_idx = keep.nonzero(as_tuple=True)  # row-major: the order of hidden[keep] in the padded layout
    row_t = torch.tensor(row_of, device=device)
    col_t = torch.tensor(col_of, device=device)
    start_t = torch.tensor(starts, device=device)
    # window token j of sample i sits at P + j in its padded row, at col_of[i] + (P + j - start_i) packed; the
    # state one position earlier predicts it
    cols = col_t[b_idx] + (P + j_idx - start_t[b_idx]) - 1
    return Packed(ids, pos, row_t[b_idx], cols, batch.input_ids[b_idx, P + j_idx], int(sum(lengths)))
