"""Pipelines: a recipe's stages run in order; later stages read earlier stages' outputs by name.

A pipeline recipe has ``stages:``, each a stage config (``kind: sft | rm | grpo | ppo``, optionally
``recipe: NAME`` to start from a single-stage recipe) whose string values may name an earlier stage as
``stage:NAME`` (its output directory). Keys under ``defaults:`` apply to every stage.

``OUTPUT/manifest.json`` records each stage's status, resolved config, inputs, output path, wall time and
headline metrics. Running the same command again skips finished stages whose config and inputs hash the
same, continues an interrupted stage from its checkpoint, and re-runs (from scratch) a stage whose config
or inputs changed. ``--from STAGE`` re-runs that stage and those after it; ``--only STAGE`` re-runs one.
``--set key=value`` changes the defaults of every stage (a stage's own setting wins);
``--set STAGE.key=value`` changes one stage.

    rlkit run instructgpt                 # SFT -> RM -> PPO on the embedded world
    rlkit run instructgpt --only ppo --set ppo.train.max_steps=50
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlkit.config import ConfigError, RunConfig, build_config, load_yaml, parse_set
from rlkit.recipe import recipe_path

STAGE_REF = "stage:"


@dataclass
class Stage:
    """One step of a pipeline: a config of some kind, given as overrides on an optional base recipe."""

    name: str
    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None

    def refs(self) -> list[str]:
        return sorted(set(_find_refs(self.config)))


@dataclass
class Pipeline:
    """A named list of stages; build it from YAML with :func:`load_pipeline` or directly in Python."""

    name: str
    stages: list[Stage]
    output_dir: str = "outputs/pipeline"
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    source: str = "pipeline"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        seen: list[str] = []
        for s in self.stages:
            if s.name in seen:
                raise ConfigError(f"{self.source}: stage '{s.name}' is defined twice")
            for ref in s.refs():
                if ref == s.name:
                    raise ConfigError(f"{self.source}: stage '{s.name}' refers to itself (stage:{ref}), a cycle")
                if ref not in seen:
                    later = [x.name for x in self.stages]
                    if ref in later:
                        raise ConfigError(f"{self.source}: stage '{s.name}' refers to stage '{ref}', which runs after it "
                                          "(a stage can only read earlier stages' outputs)")
                    guess = difflib.get_close_matches(ref, seen, n=1)
                    hint = f"; did you mean '{guess[0]}'?" if guess else f"; earlier stages: {', '.join(seen) or 'none'}"
                    raise ConfigError(f"{self.source}: stage '{s.name}' refers to unknown stage '{ref}'{hint}")
            seen.append(s.name)
        if not self.stages:
            raise ConfigError(f"{self.source}: a pipeline needs at least one stage under 'stages:'")

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"unknown stage '{name}'; stages: {', '.join(s.name for s in self.stages)}")

    def run(self, output_dir: str | None = None, *, start_from: str | None = None, only: str | None = None,
            sets: list[str] | None = None, on_stage: Callable[[str, str], None] | None = None) -> dict:
        """Run (or resume) the pipeline; returns the manifest."""
        return run_pipeline(self, output_dir, start_from=start_from, only=only, sets=sets, on_stage=on_stage)


def _find_refs(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj[len(STAGE_REF):]] if obj.startswith(STAGE_REF) else []
    if isinstance(obj, dict):
        return [r for v in obj.values() for r in _find_refs(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in _find_refs(v)]
    return []


def _resolve_refs(obj: Any, outputs: dict[str, str]) -> Any:
    if isinstance(obj, str) and obj.startswith(STAGE_REF):
        return outputs[obj[len(STAGE_REF):]]
    if isinstance(obj, dict):
        return {k: _resolve_refs(v, outputs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_refs(v, outputs) for v in obj]
    return obj


def is_pipeline_file(path: Path) -> bool:
    return "stages" in load_yaml(path)


def load_pipeline(name_or_path: str) -> Pipeline:
    path = recipe_path(name_or_path)
    data = load_yaml(path)
    if "stages" not in data:
        raise ConfigError(f"{path}: not a pipeline (no 'stages:'); run it with its command, e.g. rlkit {data.get('kind', 'sft')}")
    unknown = set(data) - {"name", "description", "output_dir", "defaults", "stages"}
    if unknown:
        raise ConfigError(f"{path}: unknown pipeline key '{sorted(unknown)[0]}'; expected name, description, "
                          "output_dir, defaults, stages")
    stages = []
    for i, raw in enumerate(data["stages"] or [], 1):
        if not isinstance(raw, dict) or "name" not in raw:
            raise ConfigError(f"{path}: stage {i} needs a 'name'")
        raw = dict(raw)
        name = str(raw.pop("name"))
        recipe = raw.pop("recipe", None)
        kind = raw.get("kind") or (load_yaml(recipe_path(recipe)).get("kind") if recipe else None)
        if kind is None:
            raise ConfigError(f"{path}: stage '{name}' needs a 'kind' (sft, rm, grpo, ppo) or a 'recipe'")
        raw["kind"] = kind
        stages.append(Stage(name=name, kind=kind, config=raw, recipe=recipe))
    return Pipeline(name=str(data.get("name", path.stem)), stages=stages,
                    output_dir=str(data.get("output_dir", f"outputs/{path.stem}")),
                    description=str(data.get("description", "")), defaults=data.get("defaults") or {},
                    source=str(path))


def stage_sets(pipeline: Pipeline, sets: list[str] | None) -> tuple[dict[str, dict], dict]:
    """Split ``--set`` overrides into per-stage ones (``STAGE.key=v``) and ones for every stage."""
    names = {s.name for s in pipeline.stages}
    per: dict[str, list[str]] = {}
    common: list[str] = []
    for item in sets or []:
        head = item.split(".", 1)[0]
        if head in names and "." in item.split("=", 1)[0]:
            per.setdefault(head, []).append(item.split(".", 1)[1])
        else:
            common.append(item)
    return {k: parse_set(v) for k, v in per.items()}, parse_set(common)


def stage_config(pipeline: Pipeline, stage: Stage, outputs: dict[str, str], out_dir: Path,
                 per: dict[str, dict], common: dict) -> RunConfig:
    layers: list[tuple[str, dict]] = []
    if stage.recipe:
        p = recipe_path(stage.recipe)
        layers.append((str(p), load_yaml(p)))
    layers.append((f"{pipeline.source} (defaults)", pipeline.defaults))
    layers.append(("--set", common))  # pipeline-wide overrides change the defaults; a stage's own keys win
    layers.append((f"{pipeline.source} (stage '{stage.name}')", stage.config))
    layers.append((f"--set {stage.name}.*", per.get(stage.name, {})))
    layers = [(src, _resolve_refs(layer, outputs)) for src, layer in layers]
    layers.append(("pipeline", {"output_dir": str(out_dir / stage.name), "name": f"{pipeline.name}/{stage.name}"}))
    return build_config(layers)


def _hash(cfg: RunConfig, input_hashes: list[str]) -> str:
    blob = json.dumps({"config": cfg.model_dump(mode="json"), "inputs": input_hashes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run_stage(cfg: RunConfig) -> dict:
    if cfg.kind == "sft":
        from rlkit.trainers.sft import run_sft

        return run_sft(cfg)
    if cfg.kind == "rm":
        from rlkit.trainers.rm import run_rm

        return run_rm(cfg)
    if cfg.kind == "sample":
        from rlkit.trainers.sample import run_sample

        return run_sample(cfg)
    from rlkit.trainers.rl import run_rl

    return run_rl(cfg)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_pipeline(pipeline: Pipeline, output_dir: str | None = None, *, start_from: str | None = None,
                 only: str | None = None, sets: list[str] | None = None,
                 on_stage: Callable[[str, str], None] | None = None) -> dict:
    from rlkit.tracking import quiet_libraries

    quiet_libraries()
    out = Path(output_dir or pipeline.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    old_stages = {s["name"]: s for s in old.get("stages", [])}
    per, common = stage_sets(pipeline, sets)
    unknown = set(per) - {s.name for s in pipeline.stages}
    if unknown:
        raise ConfigError(f"--set: unknown stage '{sorted(unknown)[0]}'")
    names = [s.name for s in pipeline.stages]
    for flag, value in (("--from", start_from), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: unknown stage; stages: {', '.join(names)}")

    # Resolve every config first: a bad key in the last stage fails before the first one trains.
    outputs: dict[str, str] = {s.name: str(out / s.name) for s in pipeline.stages}
    configs = {s.name: stage_config(pipeline, s, outputs, out, per, common) for s in pipeline.stages}
    hashes: dict[str, str] = {}
    for s in pipeline.stages:
        hashes[s.name] = _hash(configs[s.name], [hashes[r] for r in s.refs()])

    forced: set[str] = set()
    if start_from is not None:
        forced = set(names[names.index(start_from):])
    if only is not None:
        forced = {only}
    manifest = {"recipe": pipeline.name, "description": pipeline.description, "output_dir": str(out),
                "stages": [dict(old_stages.get(n, {"name": n, "status": "pending"})) for n in names]}
    entries = {e["name"]: e for e in manifest["stages"]}

    def save() -> None:
        tmp = manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(manifest_path)

    selected = {n for n in names if (only is None and start_from is None) or n in forced}
    for s in pipeline.stages:
        e, cfg, h = entries[s.name], configs[s.name], hashes[s.name]
        if s.name not in selected:
            continue
        for ref in s.refs():
            if ref not in selected and entries[ref].get("status") != "done":
                raise ConfigError(f"stage '{s.name}' reads stage '{ref}', which has not finished; "
                                  "run the pipeline without --from/--only first")
        if (s.name not in forced and e.get("status") == "done" and e.get("hash") == h
                and Path(cfg.output_dir).is_dir()):
            if on_stage:
                on_stage(s.name, "skipped (finished, same config)")
            continue
        fresh = s.name in forced or (e.get("hash") not in (None, h))
        if fresh and Path(cfg.output_dir).exists():
            shutil.rmtree(cfg.output_dir)
        e.update({"name": s.name, "kind": s.kind, "status": "running", "hash": h, "inputs": s.refs(),
                  "output": cfg.output_dir, "config": cfg.model_dump(mode="json"), "started": _now()})
        e.pop("error", None)
        save()
        if on_stage:
            on_stage(s.name, "running")
        t0 = time.time()
        try:
            metrics = _run_stage(cfg)
        except BaseException as exc:
            e.update({"status": "failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted",
                      "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                      "seconds": round(time.time() - t0, 1)})
            save()
            raise
        e.update({"status": "done", "finished": _now(), "seconds": round(time.time() - t0, 1),
                  "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}})
        save()
        if on_stage:
            on_stage(s.name, f"done in {e['seconds']:.0f} s")
    return manifest


__all__ = ["Pipeline", "Stage", "load_pipeline", "run_pipeline", "is_pipeline_file"]
