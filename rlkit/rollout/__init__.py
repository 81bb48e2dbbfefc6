"""Rollout engines behind one interface: ``engine.generate(prompts, params) -> list[list[Sample]]``.

Engines: ``hf`` (transformers ``generate``). The interface carries token ids and the sampler's
log-probs so that trainers can score, and correct for, exactly what was sampled.
"""

from rlkit.rollout.base import ENGINES, Engine, Sample, SamplingParams, make_engine

__all__ = ["ENGINES", "Engine", "Sample", "SamplingParams", "make_engine"]
