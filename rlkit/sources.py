"""Data sources beyond local files: reasoning-gym tasks, ``datasets`` save_to_disk directories, and
``datasets`` names from the local cache. Each returns plain dict rows or raises a one-line DataError."""

from __future__ import annotations

from pathlib import Path

from rlkit.errors import DataError, first_line

REASONING_GYM = "reasoning_gym:"


def reasoning_gym_rows(spec: str) -> list[dict]:
    """``reasoning_gym:NAME?size=2000&seed=1&max_terms=3``: the task's procedurally generated problems as
    ``{prompt, answer, metadata}`` rows (score them with the ``reasoning_gym`` reward). Parameters other than
    size and seed go to the task's config; values are read as YAML scalars. Held-out data: another seed."""
    import yaml

    name, _, query = spec.removeprefix(REASONING_GYM).partition("?")
    params: dict = {"size": 500, "seed": 0}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise DataError(f"{spec}: expected NAME?key=value&key=value, got '{item}'")
        try:
            params[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise DataError(f"{spec}: cannot read '{item}' as a YAML value (e.g. max_terms=3, "
                            f"operators=[+,-])") from None
    try:
        import reasoning_gym
    except ImportError:
        raise DataError(f"{spec}: needs the reasoning-gym package: pip install 'rlkit[reasoning-gym]'") from None
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(name, list(DATASETS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; {len(DATASETS)} tasks, e.g. basic_arithmetic"
        raise DataError(f"{spec}: unknown reasoning-gym task '{name}'{hint}")
    try:
        ds = reasoning_gym.create_dataset(name, **params)
        rows = [{"prompt": x["question"], "answer": str(x["answer"]), "metadata": x["metadata"]} for x in ds]
    except Exception as e:  # a parameter the task does not take, or a value it refuses
        raise DataError(f"{spec}: reasoning-gym could not build '{name}' ({first_line(e)})") from None
    if not rows:
        raise DataError(f"{spec}: no rows (size={params['size']})")
    return rows


def saved_dataset(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def from_disk(path: Path, split: str) -> list[dict]:
    """A directory written by ``datasets``' ``save_to_disk``: a Dataset, or a DatasetDict and its ``split``."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a readable datasets directory ({first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no '{split}' split in this DatasetDict; it has {', '.join(ds)}")
        ds = ds[split]
    if len(ds) == 0:
        raise DataError(f"{path}: no rows")
    return [dict(r) for r in ds]


def hub_rows(spec: str, default_split: str) -> list[dict]:
    name, _, split = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split or default_split)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{spec}: not a local file and could not load it as a datasets name ({first}); "
            f"expected a .jsonl/.json/.parquet path, embedded:TASK, or a cached dataset name"
        ) from None
    return [dict(r) for r in ds]
