"""rlkit: RL post-training for language models (SFT, reward models, PPO, GRPO, the R1 pipelines)."""

__version__ = "0.1.0"
