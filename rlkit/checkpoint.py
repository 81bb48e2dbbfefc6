"""Atomic checkpoints for exact resume.

``OUTPUT/checkpoint-N/`` holds the policy in Hugging Face format (loads with ``from_pretrained``) and
``rlkit_state/``: optimizer, scheduler, per-process RNG states and ``state.json`` (step, data position,
KL coefficient, ...). A checkpoint is written as ``checkpoint-N.tmp`` and renamed when complete, so a
crash mid-write never leaves a directory that resume would pick up.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "rlkit_state" / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def tmp_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}.tmp"


def begin(output_dir: str | Path, step: int) -> Path:
    """Create a fresh temporary directory for the checkpoint of ``step`` (main process only)."""
    tmp = tmp_dir(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "rlkit_state").mkdir(parents=True)
    return tmp


def save_process_state(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / "rlkit_state" / f"rng_{rank}.pt")


def save_main_state(tmp: Path, model, tokenizer, optimizer, scheduler, state: dict,
                    extra: dict | None = None) -> None:
    """Policy (HF format), tokenizer, optimizer, scheduler, state.json; ``extra``: more objects with a
    ``state_dict`` (a critic's optimizer, say), saved as ``rlkit_state/<name>.pt``."""
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "rlkit_state" / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "rlkit_state" / "scheduler.pt")
    for name, obj in (extra or {}).items():
        torch.save(obj.state_dict(), tmp / "rlkit_state" / f"{name}.pt")
    (tmp / "rlkit_state" / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def commit(output_dir: str | Path, step: int, keep: int) -> Path:
    """Rename the finished temporary directory into place and prune old checkpoints (main process)."""
    final = Path(output_dir) / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    tmp_dir(output_dir, step).rename(final)
    done = sorted((int(_NAME.match(p.name).group(1)), p) for p in Path(output_dir).iterdir() if _NAME.match(p.name))
    for _, p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_state(ckpt: Path, rank: int, optimizer, scheduler, extra: dict | None = None) -> dict:
    """Restore optimizer, scheduler, ``extra`` objects and this process's RNG; return state.json."""
    st = ckpt / "rlkit_state"
    optimizer.load_state_dict(torch.load(st / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(st / "scheduler.pt", weights_only=False))
    for name, obj in (extra or {}).items():
        obj.load_state_dict(torch.load(st / f"{name}.pt", weights_only=False))
    rng = st / f"rng_{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((st / "state.json").read_text())
