"""Rollout engines behind one interface: ``engine.generate(prompt_ids, params) -> list[list[Sample]]``,
``engine.sync_weights(model)``, ``engine.sleep()``, ``engine.wake()``.

Engines: ``hf`` (transformers ``generate`` on the training model) and ``vllm`` (vLLM in the training
process, or a ``rlkit vllm-serve`` server). The interface carries token ids, the sampler's log-probs and
the finish reason so that trainers can score, and correct for, exactly what was sampled. One ``rollout:``
config section (``rlkit.config.RolloutConfig``) picks and tunes the engine everywhere.
"""

from rlkit.rollout.base import ENGINES, Engine, Sample, SamplingParams, make_engine

__all__ = ["ENGINES", "Engine", "Sample", "SamplingParams", "make_engine"]
