"""How a pipeline stage's config is made: the layers (a base recipe, the pipeline's ``defaults:``, ``--set``
for every stage, the stage's own keys, ``--set stages.NAME.*``), ``stage:NAME`` references to earlier stages'
outputs, how ``--set`` items are routed to stages, and the input files a stage reads."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlkit.config import KINDS, ConfigError, RunConfig, applicable, build_config, check_unknown, upgrade_layer
from rlkit.config.rl import NAMED_VARIANTS
from rlkit.config_files import load_yaml, parse_set
from rlkit.manifest import STAGE_REF
from rlkit.nested import flatten
from rlkit.recipe import recipe_path

if TYPE_CHECKING:
    from rlkit.pipeline import Pipeline, Stage


def check_shared(pipeline: Pipeline, layer: dict, source: str) -> None:
    """Keys for every stage (``defaults:``, ``--set defaults.*``) must exist and be read by some stage."""
    check_unknown(layer, source)
    layer, _ = upgrade_layer(layer, source)  # the keys as today's schema names them
    kept = [applicable(layer, s.kind, stage_variants(s)) for s in pipeline.stages]
    for key, value in flatten(layer).items():
        if value != {} and not any(_has_key(k, key) for k in kept):
            kinds = ", ".join(sorted({s.kind for s in pipeline.stages}))
            raise ConfigError(f"{source}: {key}: no stage of this pipeline uses this key (its stages run rlkit "
                              f"{kinds}); remove it")


def _has_key(d: dict, key: str) -> bool:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def find_refs(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj[len(STAGE_REF):]] if obj.startswith(STAGE_REF) else []
    if isinstance(obj, dict):
        return [r for v in obj.values() for r in find_refs(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in find_refs(v)]
    return []


def _resolve_refs(obj: Any, outputs: dict[str, str]) -> Any:
    if isinstance(obj, str) and obj.startswith(STAGE_REF):
        return outputs[obj[len(STAGE_REF):]]
    if isinstance(obj, dict):
        return {k: _resolve_refs(v, outputs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_refs(v, outputs) for v in obj]
    return obj


def stage_sets(pipeline: Pipeline, sets: list[str] | None) -> tuple[dict[str, dict], dict]:
    """Split ``--set`` overrides into per-stage ones and ones for every stage's defaults.

    ``stages.NAME.key=v`` is one stage and ``defaults.key=v`` every stage, always; a bare ``HEAD.key=v`` is
    a stage when HEAD names a stage and is not a config key, the defaults when HEAD is a config key and not
    a stage, and an error when it is both. Returns ``({stage: overrides}, overrides for every stage)``.
    """
    names = [s.name for s in pipeline.stages]
    config_keys = {k for model in KINDS.values() for k in model.model_fields}
    per: dict[str, list[str]] = {}
    common: list[str] = []
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        head, _, rest = key.strip().partition(".")
        if head == "stages":
            name, _, rest = rest.partition(".")
            if not rest:
                raise ConfigError(f"--set {item}: expected stages.STAGE.key=value; stages: {', '.join(names)}")
            if name not in names:
                guess = difflib.get_close_matches(name, names, n=1)
                hint = f"did you mean '{guess[0]}'?" if guess else f"stages: {', '.join(names)}"
                raise ConfigError(f"--set {item}: unknown stage '{name}'; {hint}")
            per.setdefault(name, []).append(f"{rest}={value}")
        elif head == "defaults":
            if not rest:
                raise ConfigError(f"--set {item}: expected defaults.key=value")
            common.append(f"{rest}={value}")
        elif head in names and rest:
            if head in config_keys:
                raise ConfigError(f"--set {item}: '{head}' is both a stage of this pipeline and a config section; "
                                  f"write stages.{item} for the stage or defaults.{item} for every stage")
            per.setdefault(head, []).append(f"{rest}={value}")
        elif head in names and head not in config_keys:
            raise ConfigError(f"--set {item}: expected {head}.key=value (a key of stage '{head}')")
        else:
            if head not in config_keys:
                choices = sorted(config_keys) + names + ["stages", "defaults"]
                guess = difflib.get_close_matches(head, choices, n=1)
                hint = f"did you mean '{guess[0]}'?" if guess else f"stages: {', '.join(names)}"
                raise ConfigError(f"--set {item}: '{head}' is neither a stage of this pipeline nor a config key; "
                                  f"{hint}")
            common.append(item)
    shared = parse_set(common)
    check_shared(pipeline, shared, "--set")
    return {k: parse_set(v) for k, v in per.items()}, shared


def stage_variants(stage: Stage, own: list[dict] = ()) -> dict[str, str]:
    """The rl variants (advantage, policy_loss) a stage names itself, in its recipe, its own keys or ``own``
    (its --set stages.NAME.* layer): pipeline defaults are judged against these."""
    layers = [load_yaml(recipe_path(stage.recipe))] if stage.recipe else []
    names: dict[str, str] = {}
    for layer in [*layers, stage.config, *own]:
        rl = upgrade_layer(layer)[0].get("rl")
        for part in NAMED_VARIANTS:
            if isinstance(rl, dict) and isinstance(rl.get(part), dict) and isinstance(rl[part].get("name"), str):
                names[part] = rl[part]["name"]
    return names


def stage_config(pipeline: Pipeline, stage: Stage, outputs: dict[str, str], out_dir: Path,
                 per: dict[str, dict], common: dict) -> RunConfig:
    layers: list[tuple[str, dict]] = []
    if stage.recipe:
        p = recipe_path(stage.recipe)
        layers.append((str(p), load_yaml(p)))
    # Pipeline-wide keys apply to a stage where its command reads them (with the variants the stage runs);
    # a stage's own keys win.
    variants = stage_variants(stage, [per.get(stage.name, {})])
    layers.append((f"{pipeline.source} (defaults)", applicable(pipeline.defaults, stage.kind, variants)))
    layers.append(("--set", applicable(common, stage.kind, variants)))
    layers.append((f"{pipeline.source} (stage '{stage.name}')", stage.config))
    layers.append((f"--set stages.{stage.name}.*", per.get(stage.name, {})))
    earlier = [s.name for s in pipeline.stages[: pipeline.stages.index(stage)]]
    for src, layer in layers:
        for ref in find_refs(layer):
            if ref not in earlier:
                where = "runs after it or is itself" if ref in outputs else "is not a stage of this pipeline"
                raise ConfigError(f"{src}: stage:{ref} for stage '{stage.name}': '{ref}' {where}; a stage reads "
                                  f"earlier stages' outputs only ({', '.join(earlier) or 'none before it'})")
    layers = [(src, _resolve_refs(layer, outputs)) for src, layer in layers]
    layers.append(("pipeline", {"output_dir": str(out_dir / stage.name), "name": f"{pipeline.name}/{stage.name}"}))
    return build_config(layers)


def check_inputs(name: str, cfg: RunConfig, out: Path) -> None:
    """The local files a stage reads that no stage writes must be there before the pipeline starts (a data set
    missing from the last stage would otherwise fail only after the earlier stages trained)."""
    from rlkit.data import LOCAL_SUFFIXES

    data, rl, sample = cfg.data, getattr(cfg, "rl", None), getattr(cfg, "sample", None)
    specs = [("data.train", data.train), ("data.eval", getattr(data, "eval", None)), ("model.path", cfg.model.path),
             *([("rl.ptx.data", rl.ptx.data)] if rl is not None and rl.ptx is not None else []),
             *([("sample.mix_data", sample.mix_data)] if sample is not None else []),
             *((f"data.mix[{i}].data", m.data) for i, m in enumerate(getattr(data, "mix", [])))]
    for key, spec in specs:
        if not spec or ":" in spec.split("/")[0]:  # embedded:..., reasoning_gym:..., a hub name with a split
            continue
        path = Path(spec).expanduser()
        if out.resolve() in path.resolve().parents:
            continue  # a stage's output, written before this stage runs
        if (path.suffix in LOCAL_SUFFIXES or spec.startswith((".", "/", "~"))) and not path.exists():
            raise ConfigError(f"stage '{name}': {key}: {spec} does not exist")
