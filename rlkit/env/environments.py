"""Environments: what a multi-turn rollout talks to, configured by the ``env:`` section.

An environment follows TRL's ``environment_factory`` convention, so a class written for TRL's GRPOTrainer plugs
in unchanged as ``env.factory: module:Class``:

- one instance per rollout (the class is called with no arguments);
- ``reset(**row)`` before the rollout, with the data row's columns; it returns ``None`` or a text that is
  appended to the last user message;
- its public methods are the tools (typed, with a Google-style docstring, as any tool);
- ``get_reward()`` (optional) scores the finished episode from the environment's state: a reward source of
  weight 1 logged under the class name (``reward/<ClassName>``), besides the recipe's ``rewards``.

rlkit adds one optional hook that TRL does not have: ``respond(text) -> str | None``, called when the model
ends a turn without a tool call; a text is the environment's next user message (a game's move, a grader's
feedback), ``None`` ends the episode. TRL would expose a public ``respond`` as a tool; rlkit does not.

``env.tools: [module:function, ...]`` adds stand-alone tools (TRL's ``tools=``); with no factory the episode's
environment is just those tools.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from rlkit.env.tools import ToolError, load_tools, tool_schema
from rlkit.errors import first_line
from rlkit.rewards import import_user_module

HOOKS = ("reset", "get_reward", "respond")  # an environment's methods that are not tools


class EnvError(ToolError):
    """An environment that cannot be imported, built or described (before training, one line)."""


def _import(spec: str, key: str):
    module, sep, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not sep or not module or not name:
        raise EnvError(f"{key}: '{spec}': expected module:Class")
    try:
        return getattr(import_user_module(module), name)
    except (ImportError, AttributeError) as e:
        raise EnvError(f"{key}: '{spec}': {first_line(e)}") from None
    except (Exception, SystemExit) as e:  # the module itself fails on import
        raise EnvError(f"{key}: '{spec}': importing it raised {type(e).__name__}: {first_line(e)}") from None


def _methods(instance) -> dict[str, Callable]:
    """The instance's tools: public functions of its class that are not hooks (TRL lists them on the class,
    so that properties are not evaluated)."""
    return {name: getattr(instance, name) for name, _ in inspect.getmembers(type(instance), inspect.isfunction)
            if not name.startswith("_") and name not in HOOKS}


@dataclass
class EnvSource:
    """Builds one environment per rollout and tells what it offers."""

    factory: Callable | None                                    # the environment class (None: tools only)
    tools: dict[str, Callable] = field(default_factory=dict)   # the stand-alone tools (env.tools)
    name: str | None = None                                     # the class name (its get_reward's reward key)
    has_reward: bool = False                                    # the environment defines get_reward
    schemas: list[dict] = field(default_factory=list)          # every tool's JSON schema, as the template gets it
    tool_timeout: float = 10.0                                  # env.tool_timeout: seconds a call may take

    def new(self):
        """A fresh environment (None without a factory)."""
        return self.factory() if self.factory is not None else None

    def tools_of(self, env) -> dict[str, Callable]:
        """The tools a rollout with ``env`` may call: the stand-alone ones and the environment's methods."""
        return {**self.tools, **(_methods(env) if env is not None else {})}


def load_env(cfg) -> EnvSource:
    """The ``env:`` section (``rlkit.env.schema.EnvConfig``) as an EnvSource; one EnvError line when the class
    or a tool cannot be imported, built or described: before any model loads."""
    tools = load_tools(list(cfg.tools))
    if cfg.factory is None:
        return EnvSource(None, tools, schemas=[tool_schema(f) for f in tools.values()], tool_timeout=cfg.tool_timeout)
    factory = _import(cfg.factory, "env.factory")
    if not callable(factory):
        raise EnvError(f"env.factory: '{cfg.factory}' is not a class or a function")
    try:
        probe = factory()
    except (Exception, SystemExit) as e:
        raise EnvError(f"env.factory: '{cfg.factory}' could not be built: {type(e).__name__}: {first_line(e)}") from None
    if not callable(getattr(probe, "reset", None)):
        raise EnvError(f"env.factory: '{cfg.factory}' has no reset method (an environment needs reset(**row))")
    methods = _methods(probe)
    both = sorted(set(methods) & set(tools))
    if both:
        raise EnvError(f"env.tools: '{both[0]}' is also a method of {type(probe).__name__}; drop one")
    schemas = [tool_schema(f) for f in tools.values()]
    for name, fn in methods.items():
        try:
            schemas.append(tool_schema(fn))
        except ToolError as e:
            raise EnvError(f"env.factory: {type(probe).__name__}.{name}: {str(e).split(': ', 1)[-1]}") from None
    return EnvSource(factory, tools, type(probe).__name__, callable(getattr(probe, "get_reward", None)), schemas,
                     cfg.tool_timeout)


def env_reward(completions: list, environments: list | None = None, **_) -> list[float | None]:
    """The environments' own scores (``get_reward()``), as a reward function (TRL passes ``environments``);
    not applicable (None) to completions without an episode (``rlkit rewards check``'s probes)."""
    if environments is None:
        return [None] * len(completions)
    return [e.get_reward() if e is not None and hasattr(e, "get_reward") else None for e in environments]
