"""Pipelines: a recipe's stages run in order; later stages read earlier stages' outputs by name.

A pipeline recipe has ``stages:``, each a stage config (``kind: sft | rm | grpo | ppo | sample``, the
commands of :mod:`rlkit.commands`; optionally ``recipe: NAME`` to start from a single-stage recipe) whose
string values may name an earlier stage as ``stage:NAME`` (its output directory). Keys under ``defaults:``
(and ``--set defaults.*``) apply to each stage whose command reads them (:func:`rlkit.config.applicable`);
a key that no stage reads is an error.

``OUTPUT/manifest.json`` records each stage's status, resolved config, inputs, output path, wall time and
headline metrics. Running the same command again skips finished stages whose hash is the same, continues
an interrupted stage from its checkpoint, and re-runs (from scratch) a stage whose hash changed.
``--from STAGE`` re-runs that stage and those after it; ``--only STAGE`` re-runs one.

What the hash covers: what changes the weights or data a stage produces, i.e. its resolved config minus
:data:`rlkit.config.RESULT_NEUTRAL` (names, where outputs go, logging, checkpoint cadence, metric sinks,
the reward probe, and every evaluation setting: ``eval.*``, ``rl.eval_steps``), plus the hashes of the
outputs of the stages it reads. Those outputs' paths enter as ``stage:NAME``, so moving the whole output
directory changes no hash. Changing only a result-neutral key skips a finished stage and says which keys
it ignored (the recorded metrics keep the old evaluation settings; ``rlkit eval OUTPUT/STAGE``
re-evaluates), and resumes an interrupted one. (An RL stage that evaluates with sampling shares the random
stream with its rollouts, so there another eval setting would give an equally valid but not bit-identical
run; the stage is still not re-run for it.) The comparison re-hashes the config the manifest recorded for
the stage by today's rules, so manifests of older rlkit versions and fields added to rlkit since do not
re-run a finished stage; each entry records the hashes of the inputs it read (``input_hashes``), so a
stage that read an earlier version of an input re-runs even after ``--only``.

A finished stage's output is never deleted: when the stage must run again (its hash changed, or
``--from``/``--only``), the old output moves to ``OUTPUT/.superseded/STAGE-<UTC time>/`` and the manifest
lists it under the stage's ``superseded``; delete those directories yourself once you no longer need them.

``--set`` overrides, each ``KEY.PATH=VALUE`` (routed to the stages in :mod:`rlkit.stage_config`):

- ``--set defaults.train.max_steps=5``: a default of every stage that reads it (a stage's own setting wins);
- ``--set stages.ppo.train.max_steps=50``: one stage;
- ``--set train.max_steps=5`` (the head is a config key, not a stage): the same as ``defaults.``;
- ``--set ppo.train.max_steps=50`` (the head is a stage, not a config key): the same as ``stages.ppo.``;
- a head that is both, e.g. ``sft`` in ``instructgpt`` (a stage and the ``sft:`` config section), is an
  error that names both spellings.

    rlkit run instructgpt                 # SFT -> RM -> PPO on the embedded world
    rlkit run instructgpt --only ppo --set ppo.train.max_steps=50
    rlkit run instructgpt --set stages.sft.data.train=demos.jsonl
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlkit.commands import COMMANDS, for_kind
from rlkit.config import ConfigError, RunConfig
from rlkit.config_files import load_yaml
from rlkit.errors import RunInterrupted
from rlkit.manifest import (changes, listed, move_aside, read_manifest, recorded_config,
                            stage_hash, write_atomic)
from rlkit.recipe import recipe_path
from rlkit.stage_config import check_inputs, check_shared, find_refs, stage_config, stage_sets

STAGE_NAME = re.compile(r"[^./\\\x00][^/\\\x00]{0,99}")  # a directory name: no separator, not hidden, not . or ..


@dataclass
class Stage:
    """One step of a pipeline: a config of some kind, given as overrides on an optional base recipe."""

    name: str
    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None

    def refs(self) -> list[str]:
        return sorted(set(find_refs(self.config)))


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
        kinds = [c.kind for c in COMMANDS.values()]
        for s in self.stages:
            if not isinstance(s.name, str) or not STAGE_NAME.fullmatch(s.name):
                raise ConfigError(f"{self.source}: stage name {s.name!r}: a stage's name is a directory name under the "
                                  "pipeline's output, not a path: no '/' or '\\', not starting with '.', at most 100 "
                                  "characters")
            if s.name in seen:
                raise ConfigError(f"{self.source}: stage '{s.name}' is defined twice")
            if s.kind not in kinds:
                raise ConfigError(f"{self.source}: stage '{s.name}': unknown kind '{s.kind}'; "
                                  f"kinds: {', '.join(kinds)}")
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
        check_shared(self, self.defaults, f"{self.source} (defaults)")

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"unknown stage '{name}'; stages: {', '.join(s.name for s in self.stages)}")

    def run(self, output_dir: str | None = None, *, start_from: str | None = None, only: str | None = None,
            sets: list[str] | None = None, on_stage: Callable[[str, str], None] | None = None) -> dict:
        """Run (or resume) the pipeline; returns the manifest."""
        return run_pipeline(self, output_dir, start_from=start_from, only=only, sets=sets, on_stage=on_stage)


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
    if not isinstance(data["stages"] or [], list):
        raise ConfigError(f"{path}: stages: expected a list of stages (- name: ..., kind: ...), got "
                          f"{type(data['stages']).__name__}")
    if not isinstance(data.get("defaults") or {}, dict):
        raise ConfigError(f"{path}: defaults: expected a mapping of config keys, got {type(data['defaults']).__name__}")
    for key in ("name", "description", "output_dir"):
        if key in data and not (key == "description" and data[key] is None) and not (
                isinstance(data[key], str) and (data[key].strip() or key == "description")):
            raise ConfigError(f"{path}: {key}: expected a non-empty string, got {data[key]!r}")
    stages = []
    for i, raw in enumerate(data["stages"] or [], 1):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), (str, int)) or isinstance(raw.get("name"), bool):
            raise ConfigError(f"{path}: stage {i} needs a 'name'")
        raw = dict(raw)
        name = str(raw.pop("name"))
        recipe = raw.pop("recipe", None)
        if recipe is not None:
            if not isinstance(recipe, str):
                raise ConfigError(f"{path}: stage '{name}': recipe: expected a recipe name or file, got {recipe!r}")
            if is_pipeline_file(recipe_path(recipe)):
                raise ConfigError(f"{path}: stage '{name}': recipe '{recipe}' is a pipeline; a stage starts from a "
                                  "single-stage recipe (sft, rm, ppo, r1_zero, ...)")
        kind = raw.get("kind") or (load_yaml(recipe_path(recipe)).get("kind") if recipe else None)
        if kind is None:
            raise ConfigError(f"{path}: stage '{name}' needs a 'kind' "
                              f"({', '.join(c.kind for c in COMMANDS.values())}) or a 'recipe'")
        raw["kind"] = kind
        stages.append(Stage(name=name, kind=kind, config=raw, recipe=recipe))
    return Pipeline(name=str(data.get("name", path.stem)), stages=stages,
                    output_dir=str(data.get("output_dir", f"outputs/{path.stem}")),
                    description=str(data.get("description", "")), defaults=data.get("defaults") or {},
                    source=str(path))


def _run_stage(cfg: RunConfig) -> dict:
    return for_kind(cfg.kind).run(cfg)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_pipeline(pipeline: Pipeline, output_dir: str | None = None, *, start_from: str | None = None,
                 only: str | None = None, sets: list[str] | None = None,
                 on_stage: Callable[[str, str], None] | None = None) -> dict:
    from rlkit.tracking import quiet_libraries

    quiet_libraries()
    if output_dir is not None and not str(output_dir).strip():
        raise ConfigError("--output-dir: empty (an unset shell variable?); give the directory to write to")
    out = Path(output_dir or pipeline.output_dir)
    per, common = stage_sets(pipeline, sets)
    names = [s.name for s in pipeline.stages]
    for flag, value in (("--from", start_from), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: unknown stage; stages: {', '.join(names)}")

    # Resolve every config first: a bad key, or an input file that is not there, in the last stage fails before
    # the first one trains (and before the output directory is made)
    outputs: dict[str, str] = {s.name: str(out / s.name) for s in pipeline.stages}
    configs = {s.name: stage_config(pipeline, s, outputs, out, per, common) for s in pipeline.stages}
    from rlkit.runs import prepare_output_dir

    manifest_path = out / "manifest.json"
    old = read_manifest(manifest_path, pipeline, out) if (out / "manifest.json").is_file() else {}
    old_stages = {s["name"]: s for s in old.get("stages", [])}
    for s in pipeline.stages:  # the stages this run may train: asked for (--only/--from), or not finished before
        if only is not None or start_from is not None:
            will_run = s.name == only or start_from is not None and names.index(s.name) >= names.index(start_from)
        else:
            will_run = old_stages.get(s.name, {}).get("status") != "done"
        if will_run:
            check_inputs(s.name, configs[s.name], out)
    prepare_output_dir(out, markers=("manifest.json", "manifest.json.torn"))

    forced: set[str] = set()
    if start_from is not None:
        forced = set(names[names.index(start_from):])
    if only is not None:
        forced = {only}
    manifest = {"recipe": pipeline.name, "description": pipeline.description, "output_dir": str(out),
                "stages": [dict(old_stages.get(n, {"name": n, "status": "pending"})) for n in names]}
    entries = {e["name"]: e for e in manifest["stages"]}
    # Stage output directories, today's and those earlier runs recorded (OUTPUT may have moved since).
    paths = {e["output"]: n for n, e in old_stages.items() if isinstance(e.get("output"), str)}
    paths.update({path: n for n, path in outputs.items()})
    recorded_cfgs = {n: recorded_config(e) for n, e in old_stages.items()}
    # The hash of what each stage's output holds, by today's rules: its recorded config re-hashed, with the
    # hashes of the outputs it read (an input that has changed since it read it counts as stale).
    recorded: dict[str, str | None] = {}
    recorded_ins: dict[str, dict[str, str | None]] = {}
    for n, e in old_stages.items():
        read = e.get("input_hashes")  # absent in manifests of older rlkit: take the inputs as they are now
        recorded_ins[n] = {r: recorded.get(r) if read is None or read.get(r) == old_stages.get(r, {}).get("hash")
                           else f"stale:{read.get(r)}" for r in e.get("inputs") or []}
        ok = recorded_cfgs[n] is not None and None not in recorded_ins[n].values()
        recorded[n] = stage_hash(recorded_cfgs[n], recorded_ins[n], paths) if ok else None
        if recorded[n] is not None and n in entries:  # keep the manifest's hashes in today's terms
            entries[n].update({"hash": recorded[n], "input_hashes": recorded_ins[n]})

    def save() -> None:
        write_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")

    selected = {n for n in names if (only is None and start_from is None) or n in forced}
    effective: dict[str, str] = {}  # the hash of each stage's output once this run has passed it
    for s in pipeline.stages:
        e, cfg = entries[s.name], configs[s.name]
        h = stage_hash(cfg, {r: effective[r] for r in s.refs()}, paths)
        if s.name not in selected:
            effective[s.name] = recorded.get(s.name) or h
            continue
        effective[s.name] = h
        for ref in s.refs():
            if ref not in selected and (entries[ref].get("status") != "done" or not Path(outputs[ref]).is_dir()):
                raise ConfigError(f"stage '{s.name}' reads stage '{ref}', which has not finished; "
                                  "run the pipeline without --from/--only first")
        before = recorded.get(s.name)
        cfg_old = recorded_cfgs.get(s.name)
        changed_keys, cosmetic = changes(cfg_old, cfg, paths) if cfg_old is not None else ([], [])
        if (s.name not in forced and e.get("status") == "done" and before == h
                and Path(cfg.output_dir).is_dir()):
            if on_stage:
                note = (f"; not re-run for {listed(cosmetic)} (they do not change its output)" if cosmetic else "")
                on_stage(s.name, f"skipped (finished, same config){note}")
            continue
        fresh = s.name in forced or (e.get("status") not in (None, "pending") and before != h)
        if fresh and Path(cfg.output_dir).exists():
            if s.name in forced:
                why = "re-run requested"
            elif changed_keys:
                why = f"config changed ({listed(changed_keys)})"
            else:
                ins = [r for r in s.refs() if recorded_ins.get(s.name, {}).get(r) != effective[r]]
                why = f"input changed ({listed(ins)})" if ins and before is not None else "changed since it ran"
            dest = move_aside(out, s.name, Path(cfg.output_dir))
            e.setdefault("superseded", []).append(str(dest))
            if on_stage:
                on_stage(s.name, f"{why}; previous output moved to {dest}")
        e.update({"name": s.name, "kind": s.kind, "status": "running", "hash": h, "inputs": s.refs(),
                  "input_hashes": {r: effective[r] for r in s.refs()}, "output": cfg.output_dir,
                  "config": cfg.model_dump(mode="json"), "started": _now()})
        for stale in ("error", "finished", "metrics"):
            e.pop(stale, None)
        save()
        if on_stage:
            on_stage(s.name, "running")
        t0 = time.time()
        try:
            metrics = _run_stage(cfg)
        except BaseException as exc:
            e.update({"status": "interrupted" if isinstance(exc, (KeyboardInterrupt, RunInterrupted)) else "failed",
                      "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                      "seconds": round(time.time() - t0, 1)})
            save()
            raise
        e.update({"status": "done", "finished": _now(), "seconds": round(time.time() - t0, 1),
                  "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}})
        save()
        if on_stage:
            on_stage(s.name, f"done in {e['seconds']:.0f} s")
    save()
    return manifest


__all__ = ["Pipeline", "Stage", "load_pipeline", "run_pipeline", "is_pipeline_file"]
