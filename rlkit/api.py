"""The Python API: the same runs as the CLI, from a recipe name, a YAML path or a config object.

    import rlkit
    result = rlkit.grpo("r1_zero", output_dir="outputs/r1_zero_py", max_steps=10,
                        overrides={"rl.num_generations": 4})
    print(result["after/pass@1"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlkit.commands import COMMANDS
from rlkit.config import RunConfig


def load(recipe: str | Path | RunConfig, kind: str, *, model: str | None = None, dataset: str | None = None,
         output_dir: str | Path | None = None, max_steps: int | None = None,
         overrides: dict[str, Any] | None = None) -> RunConfig:
    """Resolve a recipe with overrides into a validated config (same precedence as the CLI)."""
    from rlkit.config import build_config
    from rlkit.recipe import load_config
    from rlkit.tracking import quiet_libraries

    quiet_libraries()
    flags = {"model.path": model, "data.train": dataset,
             "output_dir": str(output_dir) if output_dir is not None else None, "train.max_steps": max_steps}
    sets = [f"{k}={_yaml(v)}" for k, v in (overrides or {}).items()]
    if isinstance(recipe, RunConfig):
        from rlkit.config_files import parse_set
        from rlkit.nested import nest

        return build_config([("config", recipe.model_dump(exclude_unset=True)), ("overrides", parse_set(sets)),
                             ("arguments", nest(flags))])
    return load_config(str(recipe), default_recipe=str(recipe), sets=sets, flags=flags, kind=kind)


def _yaml(v: Any) -> str:
    import json

    return v if isinstance(v, str) else json.dumps(v)


def _run(name: str, recipe, resume: str, kwargs: dict) -> dict:
    """Load the config and run it; ``resume``: auto (resume an unchanged run), anyway (resume although
    the config changed) or overwrite (start over)."""
    return COMMANDS[name].run(load(recipe, COMMANDS[name].kind, **kwargs), resume=resume)


def sft(recipe: str | Path | RunConfig = COMMANDS["sft"].default_recipe, resume: str = "auto", **kwargs) -> dict:
    """Supervised fine-tuning; returns the headline metrics. Arguments as in :func:`load` and :func:`_run`."""
    return _run("sft", recipe, resume, kwargs)


def grpo(recipe: str | Path | RunConfig = COMMANDS["grpo"].default_recipe, resume: str = "auto", **kwargs) -> dict:
    """GRPO; returns before/after eval metrics, steps and seconds. Arguments as in :func:`load` and :func:`_run`."""
    return _run("grpo", recipe, resume, kwargs)


def rm(recipe: str | Path | RunConfig = COMMANDS["rm"].default_recipe, resume: str = "auto", **kwargs) -> dict:
    """Reward model training; returns held-out pair accuracy and margin. Arguments as in :func:`load` and
    :func:`_run`."""
    return _run("rm", recipe, resume, kwargs)


def ppo(recipe: str | Path | RunConfig = COMMANDS["ppo"].default_recipe, resume: str = "auto", **kwargs) -> dict:
    """PPO against a reward model; returns before/after eval metrics. Arguments as in :func:`load` and
    :func:`_run`."""
    return _run("ppo", recipe, resume, kwargs)


def sample(recipe: str | Path | RunConfig = COMMANDS["sample"].default_recipe, **kwargs) -> dict:
    """Rejection sampling; returns the report's numbers. Keyword arguments as in :func:`load`."""
    return _run("sample", recipe, "auto", kwargs)


def evaluate(model: str = "embedded", *, task: str = "arithmetic", data: str | None = None,
             template: str = "r1_zero", num_samples: int = 1, limit: int | None = None,
             max_new_tokens: int = 64, engine: str = "hf") -> dict:
    """Evaluate a model directory (or 'embedded') with the ``engine`` (hf or vllm); returns the report that
    ``rlkit eval --output`` writes."""
    from rlkit.config import EvalConfig
    from rlkit.evaluation import run_eval
    from rlkit.rollout import rollout_config
    from rlkit.tracking import quiet_libraries

    quiet_libraries()
    cfg = EvalConfig(task=task, num_samples=num_samples, limit=limit, max_new_tokens=max_new_tokens)
    return run_eval(model, cfg, template, data=data, rollout=rollout_config(engine=engine))
