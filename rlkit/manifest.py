"""A pipeline's bookkeeping: stage hashes (what a stage's output depends on) and ``manifest.json``.

A stage's hash covers its resolved config minus :data:`rlkit.config.RESULT_NEUTRAL`, with stage output
directories written as ``stage:NAME`` (so moving the pipeline's output changes nothing), plus the hashes of
the stages it reads. The manifest is written atomically and read back defensively (see ``read_manifest``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rlkit.config import RESULT_NEUTRAL, RunConfig, upgrade_dump
from rlkit.nested import flatten

STAGE_REF = "stage:"


def _is_unhashed(key: str) -> bool:
    return any(key == u or key.startswith(u + ".") for u in RESULT_NEUTRAL)


def _as_refs(obj: Any, paths: dict[str, str]) -> Any:
    """Replace stage output directories (``paths``: directory -> stage name) by ``stage:NAME``."""
    if isinstance(obj, str):
        return f"{STAGE_REF}{paths[obj]}" if obj in paths else obj
    if isinstance(obj, dict):
        return {k: _as_refs(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_as_refs(v, paths) for v in obj]
    return obj


def _fields(cfg: RunConfig | dict, paths: dict[str, str]) -> dict[str, Any]:
    dump = cfg.model_dump(mode="json") if isinstance(cfg, RunConfig) else cfg
    return flatten(_as_refs(dump, paths))


def stage_hash(cfg: RunConfig | dict, input_hashes: dict[str, str], paths: dict[str, str] | None = None) -> str:
    """A stage's hash: its config without the ``RESULT_NEUTRAL`` keys, plus the hashes of the stages it reads.

    ``cfg`` is a config or its JSON dump. ``paths`` maps stage output directories to stage names; a config
    value equal to one is hashed as ``stage:NAME``, so no hash depends on where the pipeline's output is.
    """
    hashed = {k: v for k, v in _fields(cfg, paths or {}).items() if not _is_unhashed(k)}
    blob = json.dumps({"config": hashed, "inputs": input_hashes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recorded_config(entry: dict) -> dict | None:
    """The config a manifest entry ran with, as today's full dump (None when there is none)."""
    if not isinstance(entry.get("config"), dict):
        return None
    return upgrade_dump(entry["config"], source=f"manifest.json (stage {entry.get('name', '?')})")


def changes(old: RunConfig | dict, new: RunConfig | dict, paths: dict[str, str]) -> tuple[list[str], list[str]]:
    """(hashed keys, unhashed keys) whose values differ between two configs of one stage."""
    a, b = _fields(old, paths), _fields(new, paths)
    diff = sorted(k for k in set(a) | set(b) if a.get(k, ...) != b.get(k, ...))
    return [k for k in diff if not _is_unhashed(k)], [k for k in diff if _is_unhashed(k) and k != "output_dir"]


def listed(keys: list[str], most: int = 4) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def move_aside(out: Path, name: str, path: Path) -> Path:
    """Move a stage's previous output to ``OUTPUT/.superseded/NAME-<UTC time>`` (never delete it)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = out / ".superseded" / f"{name}-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = out / ".superseded" / f"{name}-{stamp}-{n}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    path.rename(dest)
    return dest


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` so that a crash leaves the old file or the new one, never a part: a temporary file,
    flushed to disk, renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_manifest(path: Path, pipeline, out: Path) -> dict:
    """The manifest of an earlier run ({} when there is none). One that cannot be read (cut off by a crash
    on a filesystem that does not keep renames atomic, or edited by hand) is kept aside as
    ``manifest.json.torn`` and each stage's state is re-read from its output directory: a stage whose
    directory holds a finished run (``rlkit_result.json``) counts as done with the config it recorded
    (``rlkit_run.json``), so the usual hash check decides whether it must run again; any other stage runs,
    resuming from its last checkpoint."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("stages", []), list) and all(
                isinstance(e, dict) and isinstance(e.get("name"), str) for e in data.get("stages", [])):
            return data
    except (OSError, ValueError):
        pass
    from rlkit.runs import RUN_FILE
    from rlkit.tracking import console

    path.replace(path.with_name(path.name + ".torn"))
    stages = []
    for s in pipeline.stages:
        d = out / s.name
        try:
            config = json.loads((d / RUN_FILE).read_text())["config"]
            metrics = json.loads((d / "rlkit_result.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            stages.append({"name": s.name, "status": "pending"})
            continue
        stages.append({"name": s.name, "kind": s.kind, "status": "done", "output": str(d), "config": config,
                       "inputs": s.refs(),
                       "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
    done = [e["name"] for e in stages if e["status"] == "done"]
    console.print(f"[yellow]{path}: unreadable (cut off by a crash?); kept as {path.name}.torn; stage state re-read "
                  f"from the output directories: {', '.join(done) or 'no stage'} finished, the rest run (resuming "
                  "from their checkpoints)[/]", soft_wrap=True)
    return {"stages": stages}
