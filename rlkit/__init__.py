"""rlkit: RL post-training for language models (SFT, reward models, PPO, GRPO, the R1 pipelines).

    import rlkit
    rlkit.grpo("r1_zero", max_steps=10)          # the same run as `rlkit grpo --recipe r1_zero --max-steps 10`
    rlkit.evaluate("outputs/r1_zero", limit=100)
"""

__version__ = "0.1.0"

from rlkit.api import evaluate, grpo, ppo, rm, sample, sft  # noqa: E402
from rlkit.pipeline import Pipeline, Stage, load_pipeline  # noqa: E402

__all__ = ["Pipeline", "Stage", "__version__", "evaluate", "grpo", "load_pipeline", "ppo", "rm", "sample", "sft"]
