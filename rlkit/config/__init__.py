"""Typed, validated, frozen configs: the schema of each command (:mod:`.schema`), loading layers with
``--set`` overrides and old spellings (:mod:`.loading`, :mod:`.upgrade`), and the resume policy
(:mod:`.resume`)."""

from rlkit.config.loading import applicable, build_config, check_unknown, to_yaml
from rlkit.config.resume import RESULT_NEUTRAL, RESUMABLE_CHANGES, result_differences
from rlkit.config.parts import DataConfig, EvalConfig, LoraConfig, ModelConfig, RewardSpec, TrainConfig
from rlkit.config.rl import RLConfig
from rlkit.config.schema import KINDS, EvalRun, RLRun, RMRun, RunConfig, SampleRun, SFTRun
from rlkit.config.upgrade import upgrade_dump, upgrade_layer
from rlkit.errors import ConfigError
from rlkit.rollout.schema import base_server_url, rollout_config

__all__ = ["KINDS", "RESULT_NEUTRAL", "RESUMABLE_CHANGES", "ConfigError", "DataConfig", "EvalConfig", "LoraConfig",
           "EvalRun", "ModelConfig", "RLConfig", "RLRun", "RMRun", "RewardSpec", "RunConfig", "SFTRun", "SampleRun",
           "TrainConfig", "applicable", "base_server_url", "build_config", "check_unknown", "result_differences",
           "rollout_config", "to_yaml", "upgrade_dump", "upgrade_layer"]
