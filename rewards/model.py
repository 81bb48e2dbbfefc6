"""A trained reward model as a reward: the score of a sequence classifier (``rlkit rm`` output) on the
prompt and completion, rendered the way TRL's RewardTrainer saw them during training.

Recipe entry: ``{name: reward_model, params: {path: outputs/rm, template: chat}}``; in a pipeline the
path can name an earlier stage (``stage:rm``). Models are loaded once per process and cached.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from rlkit.rewards import register
from rlkit.templates import full_text


@lru_cache(maxsize=4)
def _load(path: str):
    from rlkit.models import load_reward_model, load_tokenizer

    model = load_reward_model(path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    tok = load_tokenizer(path)
    tok.padding_side = "right"
    return model.eval(), tok


def rm_texts(tokenizer, prompts: list[str], completions: list[str], template: str) -> list[str]:
    """What the reward model reads: a chat conversation, or prompt + completion + EOS (as TRL trains it)."""
    return [full_text(p, c, template, tokenizer) for p, c in zip(prompts, completions)]


@torch.no_grad()
def score_texts(path: str, texts: list[str], batch_size: int = 32, max_length: int = 1024) -> list[float]:
    model, tok = _load(path)
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length, add_special_tokens=False).to(model.device)
        # Score at the last real token (right padding), independent of how the pad token is defined.
        last = enc["attention_mask"].sum(-1) - 1
        base = getattr(model, model.base_model_prefix)
        hidden = base(**enc, use_cache=False).last_hidden_state
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        out.extend(model.score(h).squeeze(-1).float().tolist())
    return out


@register("reward_model")
def reward_model(completions: list[str], prompt: list[str], path: str, template: str = "chat",
                 batch_size: int = 32, **_) -> list[float]:
    """The reward model's scalar score for each (prompt, completion); ``prompt`` is the dataset column.

    >>> reward_model(["Paris."], prompt=["Capital of France?"], path="outputs/rm")  # doctest: +SKIP
    [1.73]
    """
    return score_texts(path, rm_texts(_load(path)[1], prompt, completions, template), batch_size)


def _prepare(path: str, **_) -> None:
    _load(path)


reward_model.prepare = _prepare
