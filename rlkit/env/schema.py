"""The ``env:`` config section: multi-turn rollouts with tools and environments (``null``: one turn)."""

from __future__ import annotations

from pydantic import Field, model_validator

from rlkit.sections import Section


class EnvConfig(Section):
    factory: str | None = Field(
        None, description="A TRL environment_factory class, module:Class: one instance per rollout, reset(**row) "
        "first, its public methods the tools, its get_reward() a reward (reward/<ClassName>).")
    tools: list[str] = Field(default_factory=list, description="Tool functions, module:function (TRL's tools=): "
                             "type hints and a Google-style docstring give each its JSON schema.")
    max_turns: int = Field(4, gt=0, description="Model turns per episode at most; an episode still calling tools at "
                           "the limit ends there (env/truncated).")
    max_tokens: int | None = Field(None, gt=0, description="Tokens an episode may add after its prompt, the model's "
                                   "and the tools' together (default: max_new_tokens × max_turns).")
    tool_timeout: float = Field(10.0, gt=0, description="Seconds a tool call may take; a slower call is answered "
                                "with an error observation.")

    @model_validator(mode="after")
    def _something(self) -> EnvConfig:
        if self.factory is None and not self.tools:
            raise ValueError("env: give env.factory (module:Class) or env.tools ([module:function, ...]), or set "
                             "env: null for one-turn rollouts")
        return self

    def budget(self, max_new_tokens: int) -> int:
        """The episode's token budget after the prompt."""
        return self.max_tokens if self.max_tokens is not None else max_new_tokens * self.max_turns
