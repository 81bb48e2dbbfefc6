"""Atomic checkpoints for exact resume.

``OUTPUT/checkpoint-N/`` holds the policy in Hugging Face format (loads with ``from_pretrained``) and
``rlkit_state/``: optimizer, scheduler, per-process RNG states and ``state.json`` (step, data position,
KL coefficient, ...). A checkpoint is written as ``checkpoint-N.tmp`` and renamed when complete, so a
crash mid-write never leaves a directory that resume would pick up.

Nothing is unpickled on resume: optimizer and scheduler states are read with ``torch.load(...,
weights_only=True)`` (tensors, numbers, strings and containers only), RNG states are JSON plus a
safetensors file, and a file that needs more than that is a :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from rlkit.errors import RlkitError

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # rlkit's and the Trainer's


class CheckpointError(RlkitError):
    """A checkpoint file that cannot be read safely."""


def save_rng_state(directory: Path, rank: int) -> None:
    """Python and numpy RNG states as JSON, torch (and CUDA) generator states as safetensors."""
    from safetensors.torch import save_file

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (directory / f"rng_{rank}.json").write_text(json.dumps({
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(directory / f"rng_{rank}.safetensors"))


def load_rng_state(directory: Path, rank: int) -> bool:
    """Restore this process's RNG states; False when the checkpoint has none for this rank."""
    from safetensors.torch import load_file

    js, st = directory / f"rng_{rank}.json", directory / f"rng_{rank}.safetensors"
    if not (js.is_file() and st.is_file()):
        return False
    try:
        state = json.loads(js.read_text())
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        tensors = load_file(str(st))
        torch.set_rng_state(tensors["torch"])
    except Exception as e:  # a torn or edited file: name it rather than guess
        raise CheckpointError(f"{js.parent}: unreadable RNG state ({type(e).__name__}: {e})") from None
    cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return True


def safe_load(path: Path):
    """``torch.load`` of tensors and plain containers only: a file that would need to unpickle arbitrary
    objects (and could run code) is refused with a one-line error."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refusing to load: the file holds more than tensors and plain values "
                              f"(weights_only load failed: {first[:200]})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).strip()[:200]})") from None


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = []
    for p in out.iterdir():
        m = CHECKPOINT_NAME.match(p.name)
        if m and (p / "rlkit_state" / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def tmp_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}.tmp"


def begin(output_dir: str | Path, step: int) -> Path:
    """Create a fresh temporary directory for the checkpoint of ``step`` (main process only)."""
    tmp = tmp_dir(output_dir, step)
    for stale in Path(output_dir).glob("checkpoint-*.tmp"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    (tmp / "rlkit_state").mkdir(parents=True)
    return tmp


def save_process_state(tmp: Path, rank: int) -> None:
    save_rng_state(tmp / "rlkit_state", rank)


def save_main_state(tmp: Path, model, tokenizer, optimizer, scheduler, state: dict,
                    extra: dict | None = None, state_dict: dict | None = None, sharded: bool = False) -> None:
    """Policy (HF format), tokenizer, optimizer, scheduler, state.json; ``extra``: more objects with a
    ``state_dict`` (a critic's optimizer, say), saved as ``rlkit_state/<name>.pt``. ``sharded`` (FSDP2):
    ``state_dict`` is the gathered full model, and the optimizers are in per-process shard files
    (:func:`save_optimizer_shards`)."""
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if not sharded:
        torch.save(optimizer.state_dict(), tmp / "rlkit_state" / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "rlkit_state" / "scheduler.pt")
    for name, obj in (extra or {}).items():
        if not (sharded and "optimizer" in name):
            torch.save(obj.state_dict(), tmp / "rlkit_state" / f"{name}.pt")
    (tmp / "rlkit_state" / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def save_optimizer_shards(tmp: Path, rank: int, optimizer, extra: dict | None = None) -> None:
    """This process's shard of each optimizer (FSDP2) as plain tensors: ``rlkit_state/optimizer.rank<R>.pt``."""
    from rlkit.trainers.sharding import local_optimizer_state

    torch.save(local_optimizer_state(optimizer), tmp / "rlkit_state" / f"optimizer.rank{rank}.pt")
    for name, obj in (extra or {}).items():
        if "optimizer" in name:
            torch.save(local_optimizer_state(obj), tmp / "rlkit_state" / f"{name}.rank{rank}.pt")


def commit(output_dir: str | Path, step: int, keep: int) -> Path:
    """Rename the finished temporary directory into place and prune old checkpoints (main process)."""
    final = Path(output_dir) / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    tmp_dir(output_dir, step).rename(final)
    done = sorted((int(m.group(1)), p) for p in Path(output_dir).iterdir() if (m := CHECKPOINT_NAME.match(p.name)))
    for _, p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def apply_learning_rate(optimizer, scheduler, lr: float) -> None:
    """After a checkpoint's optimizer and scheduler are loaded: make ``lr`` the peak learning rate (a run
    resumed with a changed train.learning_rate), keeping the schedule's position."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps it
    groups = optimizer.param_groups
    old = [g.get("initial_lr", g["lr"]) for g in groups]
    if all(o == lr for o in old):
        return
    for g, o in zip(groups, old):
        g["lr"] = g["lr"] * lr / o if o else lr
        g["initial_lr"] = lr
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr] * len(groups)
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in groups]


def load_state(ckpt: Path, rank: int, optimizer, scheduler, extra: dict | None = None,
               world: int | None = None) -> dict:
    """Restore optimizer, scheduler, ``extra`` objects and this process's RNG; return state.json.
    ``world``: a sharded (FSDP2) run of that many processes, whose optimizers are in shard files."""
    st = ckpt / "rlkit_state"
    try:
        state = json.loads((st / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{st / 'state.json'}: unreadable ({e})") from None
    shards = sorted(st.glob("optimizer.rank*.pt"))
    if world is not None or shards:
        if world is None or len(shards) != world:
            wrote = f"{len(shards)} sharded processes (FSDP2)" if shards else "an unsharded run"
            now = f"FSDP2 over {world} processes" if world is not None else "not sharded"
            raise CheckpointError(f"{ckpt}: written by {wrote}; resume it with the same accelerate config and "
                                  f"number of processes (this run: {now})")
        from rlkit.trainers.sharding import load_local_optimizer_state

        load_local_optimizer_state(optimizer, safe_load(st / f"optimizer.rank{rank}.pt"))
    else:
        optimizer.load_state_dict(safe_load(st / "optimizer.pt"))
    scheduler.load_state_dict(safe_load(st / "scheduler.pt"))
    for name, obj in (extra or {}).items():
        if world is not None and "optimizer" in name:
            load_local_optimizer_state(obj, safe_load(st / f"{name}.rank{rank}.pt"))
        else:
            obj.load_state_dict(safe_load(st / f"{name}.pt"))
    load_rng_state(st, rank)
    return state
