"""Rollout engines behind one interface: ``engine.generate(prompt_ids, params) -> list[list[Sample]]``,
``engine.sync_weights(model)``, ``engine.sleep()``, ``engine.wake()``.

Engines: ``hf`` (transformers ``generate`` on the training model) and ``vllm`` (vLLM in the training
process, or a ``rlkit vllm-serve`` server). The interface carries token ids, the sampler's log-probs and
the finish reason so that trainers can score, and correct for, exactly what was sampled. One ``rollout:``
config section (``rlkit.rollout.schema.Rollout``, a variant per engine) picks and tunes the engine
everywhere; callers ask ``engine_spec(cfg)`` what the engine can do (``samples_itself``, ...).
"""

from rlkit.rollout.base import ENGINES, Engine, EngineSpec, Sample, SamplingParams, engine_spec, make_engine
from rlkit.rollout.schema import Rollout, rollout_config

__all__ = ["ENGINES", "Engine", "EngineSpec", "Rollout", "Sample", "SamplingParams", "engine_spec", "make_engine",
           "rollout_config"]
