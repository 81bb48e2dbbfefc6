"""The config schema: one frozen pydantic model per command, whose shape says what that command reads.

A command's model has exactly the sections and keys it reads (``extra="forbid"`` everywhere), so setting a
key a command does not read is an error, with no table of exceptions. Sections with variants are
discriminated unions whose schemas sit next to their registry entries: the advantage estimator
(``rlkit.algos.advantages``), the policy loss (``rlkit.algos.policy_loss``), the KL term
(``rlkit.algos.kl``: ``null`` means no KL and no reference model) and the rollout engine
(``rlkit.rollout.schema``). The help text of every key lives once, next to its field. The sections:
:mod:`rlkit.config.parts` and (``rl:``) :mod:`rlkit.config.rl`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rlkit.config.parts import (
    DataConfig,
    EvalConfig,
    EvalData,
    EvalSettings,
    ModelConfig,
    RewardSpec,
    RLTrain,
    RMConfig,
    RMData,
    SampleConfig,
    SampleData,
    SampleModel,
    SampleTrain,
    SFTConfig,
    SFTData,
    TrainConfig,
)
from rlkit.config.rl import NAMED_VARIANTS, RLConfig, default_variant
from rlkit.env.schema import EnvConfig
from rlkit.rollout.schema import HFRollout, Rollout
from rlkit.sections import Section, given

# ------------------------------------------------------------------------------------------ run configs


class RunConfig(Section):
    """What every command's config has; one subclass per command (``KINDS``) adds the sections it reads."""

    kind: str = Field("sft", description="What this config runs.")


class _Run(RunConfig):
    """A command that writes an output directory (every one but rlkit eval)."""

    name: str = Field("run", description="Recipe name.")
    description: str = Field("", description="One line on what the recipe does.")
    output_dir: str = Field("outputs/run", description="Where the Hugging Face output directory is written.")

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty (an unset shell variable?); give the directory to write to, e.g. outputs/run")
        return v


_REPORT_TO = Field(default_factory=lambda: ["jsonl", "tensorboard"],
                   description="Metric sinks besides stdout; tensorboard and wandb are used when installed.")
Sink = Literal["jsonl", "tensorboard", "wandb"]


def _check_eval_data(data: Section, eval: EvalSettings) -> None:
    if getattr(data, "eval", None) is not None and eval.task not in ("auto", None):
        raise ValueError(f"eval.task: '{eval.task}' is not used: data.eval is set, and is what the run evaluates on "
                         "(eval.task auto); remove one of them")


def _check_trains(kind: str, rollout: Section) -> None:
    """rollout.max_staleness overlaps generation with training: only rlkit grpo and ppo train with an engine."""
    if "max_staleness" in type(rollout).model_fields and given(rollout, "max_staleness"):
        raise ValueError(f"rollout.max_staleness: rlkit {kind} has no update to overlap the generation with; "
                         "remove it")


def _check_pushes_no_weights(kind: str, rollout: Section) -> None:
    if "sync_dir" in type(rollout).model_fields and given(rollout, "sync_dir"):
        raise ValueError(f"rollout.sync_dir: rlkit {kind} pushes no weights to the server (it samples the model the "
                         "server was started with); remove it")


def _env_scores(env: EnvConfig | None) -> bool:
    """An environment class may score episodes itself (get_reward), so ``rewards:`` may be empty."""
    return env is not None and env.factory is not None


def _check_env(env: EnvConfig | None, template: str, eval_template: str | None = None) -> None:
    if env is None:
        return
    for where, t in (("data.template", template), ("eval.template", eval_template)):
        if t not in (None, "chat"):
            raise ValueError(f"env: a multi-turn episode is a conversation rendered by the chat template (with its "
                             f"tools), so it needs {where} chat, not '{t}'")


def _check_chat_turns(data: DataConfig | EvalData, eval_template: str | None) -> None:
    for key in ("system_prompt", "few_shot"):
        if getattr(data, key):
            templates = (("data.template", getattr(data, "template", None)), ("eval.template", eval_template))
            for where, template in templates:
                if template not in (None, "chat"):
                    raise ValueError(f"data.{key}: becomes chat turns, so it needs {where} chat, not '{template}'")


class SFTRun(_Run):
    kind: Literal["sft"] = "sft"
    report_to: list[Sink] = _REPORT_TO
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: SFTData = Field(default_factory=SFTData)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    rollout: Rollout = Field(default_factory=HFRollout, description="The engine that generates for evaluation.")

    @model_validator(mode="after")
    def _check(self) -> SFTRun:
        _check_eval_data(self.data, self.eval)
        _check_trains("sft", self.rollout)
        return self


class RMRun(_Run):
    kind: Literal["rm"] = "rm"
    report_to: list[Sink] = _REPORT_TO
    model: SampleModel = Field(default_factory=SampleModel, description="The model the reward model starts from "
                               "(all weights trained: a reward model is scored by every later PPO step).")
    data: RMData = Field(default_factory=RMData)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rm: RMConfig = Field(default_factory=RMConfig)


class RLRun(_Run):
    """rlkit grpo and rlkit ppo: one loop; they differ in the default advantage estimator (grpo: group
    advantages, no critic; ppo: gae with a critic)."""

    kind: Literal["grpo", "ppo"] = "grpo"
    report_to: list[Sink] = _REPORT_TO
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: RLTrain = Field(default_factory=RLTrain)
    rl: RLConfig = Field(default_factory=RLConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    rollout: Rollout = Field(default_factory=HFRollout, description="The engine that generates rollouts and evaluations.")
    rewards: list[RewardSpec] = Field(default_factory=list, description="Rewards for RL: [{name, weight, params}].")
    env: EnvConfig | None = Field(None, description="Multi-turn rollouts with tools or an environment; null: one turn.")

    @model_validator(mode="before")
    @classmethod
    def _default_variants(cls, data: Any) -> Any:
        """The variants a key under rl.advantage / rl.policy_loss tunes when no name is given: the command's
        default estimator (ppo: gae, grpo: grpo) and ppo_clip."""
        if not isinstance(data, dict) or not isinstance(data.get("rl", {}), dict):
            return data
        rl = dict(data.get("rl", {}))
        for part in NAMED_VARIANTS:
            default = default_variant(data.get("kind", "grpo"), part)
            if part not in rl:
                rl[part] = {"name": default}
            elif isinstance(rl[part], dict) and "name" not in rl[part]:
                rl[part] = {"name": default, **rl[part]}
        return {**data, "rl": rl}

    @model_validator(mode="after")
    def _check(self) -> RLRun:
        from rlkit.rollout import engine_spec

        for key in ("is_mode", "is_level"):
            if engine_spec(self.rollout).samples_itself and given(self.rl, key):
                raise ValueError(f"rl.{key}: only used when another engine samples (rollout.engine vllm); the "
                                 f"{self.rollout.engine} engine samples the policy itself, so there is nothing to correct")
        if self.rl.is_mode == "mask" and self.rl.tis_cap is not None and self.rl.tis_cap <= 1:
            raise ValueError(f"rl.tis_cap: {self.rl.tis_cap} with rl.is_mode mask keeps ratios in [1/cap, cap]; it must "
                             "be > 1")
        if self.rl.tis_cap is None and (given(self.rl, "is_mode") or given(self.rl, "is_level")):
            raise ValueError("rl.is_mode / rl.is_level: rl.tis_cap is null (no correction); give it a cap")
        if engine_spec(self.rollout).samples_itself and given(self.rl, "tis_cap"):
            raise ValueError("rl.tis_cap: only used when another engine samples (rollout.engine vllm); the "
                             f"{self.rollout.engine} engine samples the policy itself, so there is nothing to correct")
        _check_eval_data(self.data, self.eval)
        _check_env(self.env, self.data.template, self.eval.template)
        if not self.rewards and not _env_scores(self.env):
            raise ValueError("rewards: ppo needs a reward, e.g. [{name: reward_model, params: {path: outputs/rm}}]"
                             if self.kind == "ppo" else "rewards: grpo needs at least one reward")
        _check_chat_turns(self.data, self.eval.template)
        return self


class SampleRun(_Run):
    kind: Literal["sample"] = "sample"
    model: SampleModel = Field(default_factory=SampleModel)
    data: SampleData = Field(default_factory=SampleData)
    train: SampleTrain = Field(default_factory=SampleTrain)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    rollout: Rollout = Field(default_factory=HFRollout, description="The engine that generates the samples.")
    rewards: list[RewardSpec] = Field(default_factory=list, description="Rewards to filter the samples by.")
    env: EnvConfig | None = Field(None, description="Sample whole multi-turn episodes with tools or an environment "
                                  "(kept ones become SFT conversations with their tool turns).")

    @model_validator(mode="after")
    def _check(self) -> SampleRun:
        _check_pushes_no_weights("sample", self.rollout)
        _check_trains("sample", self.rollout)
        _check_env(self.env, self.data.template)
        if not self.rewards and not _env_scores(self.env):
            raise ValueError("rewards: rejection sampling needs the rewards to filter by")
        names = {r.alias or r.name for r in self.rewards}
        for key in self.sample.thresholds:
            # an environment's get_reward is a reward too, named after its class: checked when it is loaded
            if key not in names and not _env_scores(self.env):
                raise ValueError(f"sample.thresholds: '{key}' is not one of the listed rewards ({', '.join(sorted(names))})")
        return self


class EvalRun(RunConfig):
    """rlkit eval on its own (a training recipe given to it is read as that recipe's command reads it)."""

    kind: Literal["eval"] = "eval"
    model: SampleModel = Field(default_factory=SampleModel)
    data: EvalData = Field(default_factory=EvalData)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    rollout: Rollout = Field(default_factory=HFRollout, description="The engine that generates the completions.")
    env: EnvConfig | None = Field(None, description="Evaluate whole multi-turn episodes with tools or an environment.")

    @model_validator(mode="after")
    def _check(self) -> EvalRun:
        _check_pushes_no_weights("eval", self.rollout)
        _check_trains("eval", self.rollout)
        _check_eval_data(self.data, self.eval)
        _check_env(self.env, self.data.template)
        _check_chat_turns(self.data, None)
        return self


# kind -> the config model of the command that runs it
KINDS: dict[str, type[RunConfig]] = {"sft": SFTRun, "rm": RMRun, "grpo": RLRun, "ppo": RLRun, "sample": SampleRun,
                                     "eval": EvalRun}
