"""rlkit: RL post-training for language models (SFT, reward models, PPO, GRPO, the R1 pipelines).

    import rlkit
    rlkit.grpo("r1_zero", max_steps=10)          # the same run as `rlkit grpo --recipe r1_zero --max-steps 10`
    rlkit.evaluate("outputs/r1_zero", limit=100)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that owns it; imported on first use, so `rlkit --help` starts without torch
_EXPORTS = {**{name: "rlkit.api" for name in ("evaluate", "grpo", "ppo", "rm", "sample", "sft")},
            **{name: "rlkit.pipeline" for name in ("Pipeline", "Stage", "load_pipeline")}}

__all__ = ["Pipeline", "Stage", "__version__", "evaluate", "grpo", "load_pipeline", "ppo", "rm", "sample", "sft"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rlkit' has no attribute {name!r}")
