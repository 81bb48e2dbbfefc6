"""The rollout batch that carries tensors between the phases of the RL loop, and per-token log-probs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlkit.algos import entropy_from_logits
from rlkit.rollout import Sample
from rlkit.rollout.sampler import nucleus_drop
from rlkit.trainers.head import linear_logprobs


@dataclass
class RolloutInfo:
    """What the collect phase saw beyond the tensors, for the log phase."""

    rounds: int               # rollout rounds (dynamic sampling refills the batch)
    groups_kept_frac: float   # share of prompt groups kept (1.0 without dynamic sampling)
    failures: dict[str, int] = field(default_factory=dict)  # reward name -> calls that raised or timed out
    rewards: list[float] = field(default_factory=list)      # B scaled and clipped total rewards, as trained on
    stream_pos: int = 0       # the prompt stream's position after this batch's prompts (asynchronous resume)


@dataclass
class RolloutBatch:
    """B samples, each a token sequence: a context (left-padded to P) then a response window of T positions
    (right-padded) whose tokens get log-probs. ``loss_mask`` marks the window's tokens that enter the loss:
    the model's own tokens (1), never prompt, tool or environment tokens or padding (0). A single-turn sample
    is one prompt then one completion (its mask one run of 1s); a multi-turn sample's window interleaves the
    model's turns with tool output, and its mask is not one contiguous run. Nothing here assumes either.

    The collect phase fills the first fields; each later phase of the RL loop adds its own."""

    input_ids: torch.Tensor        # [B, P+T] context then response-window tokens
    attention_mask: torch.Tensor   # [B, P+T] 1 on real (non-padding) tokens
    loss_mask: torch.Tensor        # [B, T]   1 on the model's tokens that enter the loss
    group_ids: torch.Tensor        # [B]      samples of the same prompt share an id
    rewards: torch.Tensor          # [B]      summed, weighted, scaled reward
    old_logp: torch.Tensor | None = None   # [B, T] policy log-probs before this step's updates
    ref_logp: torch.Tensor | None = None   # [B, T] reference-model log-probs
    sampler_logp: torch.Tensor | None = None  # [B, T] the rollout engine's log-probs of the sampled tokens
    policy_version: torch.Tensor | None = None  # [B] long: the optimizer step whose weights sampled each sample
    #                                             (asynchronous rollouts); None: all by the current policy
    values: torch.Tensor | None = None        # [B, T] critic values at rollout time (PPO)
    advantages: torch.Tensor | None = None    # [B, T]
    returns: torch.Tensor | None = None       # [B, T]
    token_rewards: torch.Tensor | None = None  # [B, T] per-token KL penalty added to the reward (rl.kl.where reward)
    is_weights: torch.Tensor | None = None     # [B, T] truncated importance weights trainer/sampler (vllm)
    # What the collect phase saw, for the log phase (not sliced by ``select``):
    samples: list[Sample] = field(default_factory=list)   # B responses as the engine returned them
    scores: dict[str, list] = field(default_factory=dict)  # reward name -> B scores (None: not applicable)
    routes: list[str | None] = field(default_factory=list)  # B data routes (all-scenario RL)
    info: RolloutInfo | None = None  # rollout rounds, groups kept, reward failures, the rewards

    @property
    def completion_len(self) -> int:
        """T: the width of the response window (the positions that get log-probs)."""
        return self.loss_mask.shape[1]

    @property
    def completion_mask(self) -> torch.Tensor:
        """The older name of ``loss_mask`` (read-only), kept for callers not yet moved."""
        return self.loss_mask

    def select(self, idx: torch.Tensor) -> RolloutBatch:
        """The samples at ``idx`` (a mini- or micro-batch), every tensor field sliced alike."""
        fields = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return RolloutBatch(**fields)

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})


def build_batch(prompt_ids: list[list[int]], samples: list[Sample], group_ids: list[int], rewards: list[float],
                pad_id: int, overlong_filter: bool = False) -> RolloutBatch:
    """Pad prompts on the left and completions on the right into one RolloutBatch (samples from the current
    policy). The loss mask covers each completion's model tokens (a multi-turn sample's ``mask``: its tool and
    environment tokens are 0); ``overlong_filter`` zeroes the mask of a sample cut off at the length limit."""
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(s.token_ids) for s in samples))
    B = len(samples)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.float32)
    sampler = torch.zeros((B, T), dtype=torch.float32)
    has_sampler = all(s.logprobs is not None for s in samples)
    for i, (p, s) in enumerate(zip(prompt_ids, samples)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p) : P] = 1
        n = len(s.token_ids)
        if n:
            input_ids[i, P : P + n] = torch.tensor(s.token_ids, dtype=torch.long)
            attn[i, P : P + n] = 1
            if not (overlong_filter and not s.finished):
                loss_mask[i, :n] = 1 if s.mask is None else torch.tensor(s.mask, dtype=torch.float32)
            if has_sampler:
                sampler[i, :n] = torch.tensor(s.logprobs, dtype=torch.float32)
    return RolloutBatch(input_ids, attn, loss_mask, torch.tensor(group_ids, dtype=torch.long),
                        torch.tensor(rewards, dtype=torch.float32), sampler_logp=sampler if has_sampler else None)


def sampled_log_softmax(logits: torch.Tensor, targets: torch.Tensor, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs [...] of ``targets`` under the distribution a sampler draws from with nucleus ``top_p``: the
    smallest set of most likely tokens whose probability reaches ``top_p`` (vLLM's and transformers' rule: at
    least one token), renormalised. The target itself always stays in the set, so its log-prob is finite even
    when the weights moved since it was sampled. ``top_p`` 1: the plain log-softmax."""
    if top_p < 1.0:
        drop = nucleus_drop(logits, top_p)
        drop.scatter_(-1, targets.unsqueeze(-1), False)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1), logits


def completion_logprobs(model, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False,
                        chunk_tokens: int | None = None, with_aux: bool = False, router_logits: bool = False,
                        top_p: float = 1.0, packed: bool = False) -> tuple:
    """Log-probs [B, T] of the response window's tokens (T = ``batch.completion_len``) under ``model``
    (logits divided by the sampling temperature, as the sampler saw them), and optionally the per-token
    entropy [B, T]. With ``with_aux`` a third value: the MoE router's load-balancing loss (a scalar) when the
    model computes one (its config's ``output_router_logits``, or ``router_logits`` asks for it in this
    forward), else None.

    With ``top_p`` < 1 the log-probs are those of the nucleus the sampler drew from (``sampled_log_softmax``),
    as vLLM reports them (``processed_logprobs``), and the entropy is that distribution's.

    Position ids follow the attention mask, so left padding gives the same positions as generation.
    Only the last T+1 positions go through the LM head. With ``chunk_tokens``, only the positions whose token
    enters the loss (``loss_mask``; padding, prompt and tool tokens get log-prob 0) go through the LM head, in
    chunks of that many tokens (the head and the log-softmax fused, ``rlkit.trainers.head``; with ``top_p`` < 1
    under activation checkpointing), so full-vocabulary logits exist for one chunk at a time, in the forward
    and in the backward pass, and always in fp32 (the head's matmul may be bf16).
    ``packed`` (with ``chunk_tokens``): the forward runs over the sequences packed without padding
    (``rlkit.trainers.packing``); the log-probs are the padded forward's.
    """
    T = batch.completion_len
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    targets = batch.input_ids[:, -T:]
    extra = {"output_router_logits": True} if router_logits else {}
    if chunk_tokens is None:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=_last(T + 1, batch.input_ids), **extra)
        logits = out.logits[:, -(T + 1) : -1, :].float() / temperature
        logp, logits = sampled_log_softmax(logits, targets, top_p)
        ent = entropy_from_logits(logits.detach()) if with_entropy else None
        return (logp, ent, getattr(out, "aux_loss", None)) if with_aux else (logp, ent)
    # The forward still goes through the (possibly DDP-wrapped) module; it computes logits for one position.
    keep = batch.loss_mask > 0                       # [B, T]: the tokens whose log-probs are read
    if packed:
        from rlkit.trainers.packing import pack

        pk = pack(batch, pad_id=0)  # any real token id: padding after a row's last sequence is its own
        out = model(input_ids=pk.input_ids, position_ids=pk.position_ids, use_cache=False,
                    logits_to_keep=_ONE_POSITION.to(pk.input_ids.device), output_hidden_states=True, **extra)
        hidden = out.hidden_states[-1]
        flat_h, flat_t = hidden[pk.rows, pk.cols], pk.targets   # [N, H], [N] in the order of hidden[keep]
    else:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=_ONE_POSITION.to(batch.input_ids.device),
                    output_hidden_states=True, **extra)
        hidden = out.hidden_states[-1][:, -(T + 1) : -1, :]
        flat_h, flat_t = hidden[keep], targets[keep]     # [N, H], [N]
    head = _unwrap(model).get_output_embeddings()
    lps, ents = [], []
    for i in range(0, flat_t.shape[0], chunk_tokens):
        h, tg = flat_h[i : i + chunk_tokens], flat_t[i : i + chunk_tokens]
        if top_p >= 1.0:  # the head and the log-softmax fused, the logits recomputed in the backward
            lp, en = linear_logprobs(h, tg, head.weight, head.bias, temperature, with_entropy)
        elif torch.is_grad_enabled():
            lp, en = torch.utils.checkpoint.checkpoint(_head_logprobs, h, tg, head.weight, head.bias, temperature,
                                                       with_entropy, top_p, use_reentrant=False)
        else:  # nothing to recompute for a backward
            lp, en = _head_logprobs(h, tg, head.weight, head.bias, temperature, with_entropy, top_p)
        lps.append(lp)
        ents.append(en)
    zeros = hidden.new_zeros(keep.shape, dtype=torch.float32)
    # logp: 0 where nothing was read, with the gradient flowing only into the kept tokens
    logp = zeros.masked_scatter(keep, torch.cat(lps)) if lps else zeros + 0.0 * hidden.sum()
    ent = (zeros.masked_scatter(keep, torch.cat(ents).detach()) if lps else zeros) if with_entropy else None
    return (logp, ent, getattr(out, "aux_loss", None)) if with_aux else (logp, ent)


# The positions the model's own LM head runs over, as an index tensor: transformers slices the hidden states with
# an int ``logits_to_keep`` (a strided view), which a bf16-weight linear on a CPU turns into a bmm against the
# head's weight expanded per row (copied: 1.9 s of a SmolLM2 reference pass of 2.1 s); indexing copies the few
# rows instead. The chunked path reads the hidden states and discards this one position's logits.
_ONE_POSITION = torch.zeros(1, dtype=torch.long)


def _last(n: int, input_ids: torch.Tensor) -> torch.Tensor:
    L = input_ids.shape[1]
    return torch.arange(L - n, L, device=input_ids.device)


def _head_logprobs(h, targets, weight, bias, temperature: float, with_entropy: bool, top_p: float = 1.0):
    # the hidden states may be float32 (mixed precision: a norm's output) while the head is bfloat16
    logits = torch.nn.functional.linear(h.to(weight.dtype), weight, bias).float() / temperature
    lp, logits = sampled_log_softmax(logits, targets, top_p)
    ent = entropy_from_logits(logits) if with_entropy else torch.zeros_like(targets, dtype=lp.dtype)
    return lp, ent


def _unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "get_output_embeddings") else model


@dataclass
class ScoredGroup:
    """One prompt's G samples as rolled out and scored (the collect phase's unit; dynamic sampling keeps or
    drops whole groups)."""

    prompt_ids: list[int]
    samples: list[Sample]                 # G
    totals: list[float]                   # G weighted reward sums
    scores: dict[str, list]               # reward name -> G scores (None: not applicable)
    route: str | None = None              # the data route (all-scenario RL)


def batch_from_groups(groups: list[ScoredGroup], pad_id: int, reward_scale: float = 1.0,
                      reward_clip: float | None = None, overlong_filter: bool = False) -> RolloutBatch:
    """The groups' samples as one RolloutBatch (group ids in order), each total reward scaled by
    ``reward_scale`` then clipped to ``±reward_clip``; ``samples``, ``scores`` and ``routes`` filled."""
    prompt_ids, samples, gids, totals, routes = [], [], [], [], []
    scores: dict[str, list] = {}
    for gi, group in enumerate(groups):
        routes.extend([group.route] * len(group.samples))
        for j, s in enumerate(group.samples):
            prompt_ids.append(s.prompt_ids or group.prompt_ids)
            samples.append(s)
            gids.append(gi)
            r = group.totals[j] * reward_scale
            totals.append(max(-reward_clip, min(reward_clip, r)) if reward_clip else r)
        for k, v in group.scores.items():
            scores.setdefault(k, []).extend(v)
    batch = build_batch(prompt_ids, samples, gids, totals, pad_id, overlong_filter)
    batch.samples, batch.scores, batch.routes = samples, scores, routes
    batch.info = RolloutInfo(rounds=0, groups_kept_frac=1.0, rewards=totals)
    return batch
