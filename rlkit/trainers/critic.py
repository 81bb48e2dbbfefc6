"""The PPO value model: a sequence classifier's backbone and scalar head, read at every completion token.

InstructGPT initialises the value function from the reward model; ``rl.advantage.value_model: policy`` starts from
the policy's weights with a fresh head instead, said in one line ("critic: value head initialised new (1 × H)");
any other weight missing from, or left over in, the checkpoint is an error. The module wraps the classifier so
that accelerate/DDP sees one ``forward`` and synchronises its gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from rlkit.trainers.batch import RolloutBatch


class TokenCritic(nn.Module):
    def __init__(self, seq_cls_model):
        super().__init__()
        self.model = seq_cls_model

    def forward(self, input_ids, attention_mask, n_completion: int) -> torch.Tensor:
        """Values [B, T]: V(s_t) read at the position that predicts completion token t."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
        h = hidden[:, -(n_completion + 1) : -1]
        return self.model.score(h).squeeze(-1).float()


def critic_values(critic, batch: RolloutBatch) -> torch.Tensor:
    return critic(batch.input_ids, batch.attention_mask, batch.completion_len)


def load_critic(value_model: str, policy_path: str, dtype: str, trust_remote_code: bool) -> TokenCritic:
    from rlkit.models import load_reward_model

    if value_model == "policy":
        model = load_reward_model(policy_path, dtype, trust_remote_code, init=True, head="critic: value head")
    else:
        model = load_reward_model(value_model, dtype, trust_remote_code)
    return TokenCritic(model)
