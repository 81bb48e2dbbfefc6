"""Datasets: built-in tasks, local JSONL/JSON/parquet files, and `datasets` hub names.

A data spec is a string:

- ``embedded:arithmetic`` (train split) or ``embedded:arithmetic:test``: a built-in task;
- ``path/to/file.jsonl`` (one JSON object per line), ``.json`` (a list of objects) or ``.parquet``;
- anything else is a ``datasets`` name (``org/name`` or ``org/name:split``), loaded from the local cache.

Every problem is a :class:`DataError` naming the file and line (or column) and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlkit.embedded import tasks
from rlkit.errors import RlkitError


class DataError(RlkitError):
    pass


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_embedded(spec: str) -> bool:
    return spec.startswith("embedded:")


def _embedded(spec: str, default_split: str) -> tuple[str, str]:
    parts = spec.split(":")
    task = parts[1] if len(parts) > 1 else ""
    split = parts[2] if len(parts) > 2 else default_split
    if task not in tasks.TASKS:
        known = ", ".join(tasks.TASKS + tasks.DATASETS)
        raise DataError(f"{spec}: unknown built-in task or data set '{task}'; expected one of {known}")
    if split not in tasks.SPLITS:
        raise DataError(f"{spec}: unknown split '{split}'; expected one of {', '.join(tasks.SPLITS)}")
    return task, split


def read_text(path: Path) -> str:
    """A data file's text; a file that is not UTF-8 is a one-line error naming the line and byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "save the file as UTF-8") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON line ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def load_rows(spec: str, default_split: str = "train") -> list[dict]:
    """Rows of a data spec as plain dicts."""
    if is_embedded(spec):
        name = spec.split(":")[1] if ":" in spec else ""
        if name in tasks.DATASETS:
            return tasks.dataset(name)
        task, split = _embedded(spec, default_split)
        return tasks.task_split(task, split)
    path = Path(spec).expanduser()
    if path.is_dir():  # a stage's output directory, e.g. rejection samples
        if not (path / "data.jsonl").is_file():
            raise DataError(f"{path}: a data directory needs a data.jsonl file")
        path = path / "data.jsonl"
    if path.suffix in LOCAL_SUFFIXES or path.exists() or spec.startswith((".", "/", "~")):
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        if path.suffix == ".jsonl":
            rows = read_jsonl(path)
        elif path.suffix == ".json":
            try:
                rows = json.loads(read_text(path))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise DataError(f"{path}: expected a JSON list of objects (or use .jsonl)")
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as e:  # pyarrow raises several types for a bad file
                raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        else:
            raise DataError(f"{path}: unsupported data file; expected one of {', '.join(LOCAL_SUFFIXES)}")
        if not rows:
            raise DataError(f"{path}: no rows")
        return rows
    return _hub_rows(spec, default_split)


def _hub_rows(spec: str, default_split: str) -> list[dict]:
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


def require_columns(rows: list[dict], spec: str, *alternatives: tuple[str, ...]) -> tuple[str, ...]:
    """Check every row has one of the column sets; return the set the first row matches."""
    first = rows[0]
    for cols in alternatives:
        if all(c in first for c in cols):
            for i, r in enumerate(rows, 1):
                missing = [c for c in cols if c not in r or r[c] is None]
                if missing:
                    raise DataError(f"{spec}: row {i} has no '{missing[0]}' column")
            return cols
    wanted = " or ".join("+".join(f"'{c}'" for c in cols) for cols in alternatives)
    found = ", ".join(f"'{c}'" for c in first) or "none"
    raise DataError(f"{spec}: expected columns {wanted}; found {found}")


def sft_rows(spec: str, max_samples: int | None = None) -> list[dict]:
    """Rows for SFT: ``messages`` (conversational) or ``prompt`` + ``completion``.

    ``embedded:TASK`` yields the task's worked demonstrations.
    """
    if is_embedded(spec) and spec.split(":")[1] in tasks.TASKS:
        task, _ = _embedded(spec, "train")
        rows = tasks.demonstrations(task)
    else:
        rows = load_rows(spec)
    require_columns(rows, spec, ("messages",), ("prompt", "completion"))
    if "messages" in rows[0]:
        for i, r in enumerate(rows, 1):
            msgs = r["messages"]
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise DataError(f"{spec}: row {i}: 'messages' must be a list of {{role, content}} objects")
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{spec}: row {i}: the last message must be the assistant's (the demonstration)")
    return rows[:max_samples] if max_samples else rows


def prompt_rows(spec: str, split: str = "train", answer: bool = True) -> list[dict]:
    """Rows with ``prompt`` (and ``answer``) for RL and evaluation."""
    rows = load_rows(spec, default_split=split)
    require_columns(rows, spec, ("prompt", "answer") if answer else ("prompt",))
    for i, r in enumerate(rows, 1):
        if not isinstance(r["prompt"], str):
            raise DataError(f"{spec}: row {i}: 'prompt' must be a string")
        if answer:
            r["answer"] = str(r["answer"])
    return rows


def preference_rows(spec: str, max_samples: int | None = None) -> list[dict]:
    """Preference data for reward modelling, as ``{prompt, chosen, rejected, group}`` pairs.

    Accepts pairwise rows ``{prompt?, chosen, rejected}`` or InstructGPT-style rankings
    ``{prompt, responses: [best, ..., worst]}``; a ranking of K responses becomes all K·(K-1)/2 pairs,
    which share a ``group`` id so that they can be kept in one batch.
    """
    rows = load_rows(spec)
    if max_samples:
        rows = rows[:max_samples]
    cols = require_columns(rows, spec, ("responses",), ("chosen", "rejected"), ("chosen",))
    if cols == ("chosen",):
        bad = next(i for i, r in enumerate(rows, 1) if "rejected" not in r)
        raise DataError(f"{spec}: row {bad} has no 'rejected' column (pairwise rows need 'chosen' and 'rejected')")
    out = []
    for i, r in enumerate(rows, 1):
        prompt = r.get("prompt", "")
        if cols == ("responses",):
            resp = r["responses"]
            if not isinstance(resp, list) or len(resp) < 2:
                n = len(resp) if isinstance(resp, list) else 0
                raise DataError(f"{spec}: row {i}: a ranking needs at least 2 responses (best first), got {n}")
            for a in range(len(resp)):
                for b in range(a + 1, len(resp)):
                    out.append({"prompt": prompt, "chosen": resp[a], "rejected": resp[b], "group": i - 1})
        else:
            out.append({"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"], "group": i - 1})
    return out


def rl_rows(data_cfg, check=None) -> list[dict]:
    """Prompt rows for RL from ``data.train`` and the ``data.mix`` sources, each row tagged with its route.

    ``check(spec, rows) -> rows`` validates or filters each source's rows (the columns and gold answers
    the rewards need, prompt lengths), so that errors name the source file and its row.
    """
    sources = [(data_cfg.train, data_cfg.route, data_cfg.max_samples)]
    sources += [(m.data, m.route, m.max_samples) for m in data_cfg.mix]
    out = []
    for spec, route, max_n in sources:
        kept = []
        rows = load_rows(spec, default_split="train")
        rows = rows[:max_n] if max_n else rows
        require_columns(rows, spec, ("prompt",))
        for i, r in enumerate(rows, 1):
            r = dict(r)
            if route is not None:
                r["route"] = route
            if not isinstance(r["prompt"], str):
                raise DataError(f"{spec}: row {i}: 'prompt' must be a string")
            if r.get("answer") is not None:
                r["answer"] = str(r["answer"])
            kept.append(r)
        out.extend(check(spec, kept) if check is not None else kept)
    return out


def check_lengths(rows: list, lengths: list[int], limit: int, spec: str, mode: str, why: str) -> list:
    """Rows whose length in tokens exceeds ``limit``: with mode 'error' the first is a DataError naming its
    row; with 'drop' they are left out with a one-line count. ``why`` completes "the row is N tokens, ..."."""
    over = [i for i, n in enumerate(lengths) if n > limit]
    if not over:
        return rows
    if mode == "error":
        i = over[0]
        raise DataError(f"{spec}: row {i + 1} is {lengths[i]} tokens, {why} ({len(over)} of {len(rows)} rows are); "
                        "shorten them or set data.on_overlong=drop to leave them out")
    if len(over) == len(rows):
        raise DataError(f"{spec}: every row is too long ({why}); nothing left to train on")
    from rlkit.tracking import console

    console.print(f"[yellow]{spec}: dropped {len(over)} of {len(rows)} rows longer than {limit} tokens ({why})[/]")
    skip = set(over)
    return [r for i, r in enumerate(rows) if i not in skip]
