"""Datasets: built-in tasks, local JSONL/JSON/parquet files, and `datasets` hub names.

A data spec is a string:

- ``embedded:arithmetic`` (train split) or ``embedded:arithmetic:test``: a built-in task;
- ``path/to/file.jsonl`` (one JSON object per line), ``.json`` (a list of objects) or ``.parquet``;
- ``reasoning_gym:NAME?size=N&seed=S&param=value``: a reasoning-gym task's generated problems;
- a directory written by ``datasets``' ``save_to_disk`` (a DatasetDict: its train split, or eval's split);
- anything else is a ``datasets`` name (``org/name`` or ``org/name:split``), loaded from the local cache.

Every problem is a :class:`DataError` naming the file and line (or column) and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlkit.embedded import tasks
from rlkit.errors import DataError
from rlkit.sources import REASONING_GYM, from_disk, hub_rows, reasoning_gym_rows, saved_dataset

__all__ = ["DataError", "load_rows", "prompt_rows", "rl_rows", "sft_rows", "preference_rows", "map_columns",
           "reasoning_gym_rows"]


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_embedded(spec: str) -> bool:
    return spec.startswith("embedded:")


def _embedded(spec: str, default_split: str) -> tuple[str, str]:
    parts = spec.split(":")
    if len(parts) > 3:
        raise DataError(f"{spec}: expected embedded:TASK or embedded:TASK:SPLIT")
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
    if spec.startswith(REASONING_GYM):
        return reasoning_gym_rows(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "data.jsonl").is_file() and saved_dataset(path):
        return from_disk(path, default_split)
    if path.is_dir():  # a stage's output directory, e.g. rejection samples
        if not (path / "data.jsonl").is_file():
            raise DataError(f"{path}: a data directory needs a data.jsonl file (or a datasets save_to_disk directory)")
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
    return hub_rows(spec, default_split)


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
    rows = rows[:max_samples] if max_samples else rows  # only the rows that are used are checked
    require_columns(rows, spec, ("messages",), ("prompt", "completion"))
    if "messages" in rows[0]:
        for i, r in enumerate(rows, 1):
            msgs = r["messages"]
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise DataError(f"{spec}: row {i}: 'messages' must be a list of {{role, content}} objects")
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{spec}: row {i}: the last message must be the assistant's (the demonstration)")
            if _blank(msgs[:-1]):
                raise DataError(f"{spec}: row {i}: no prompt: the messages before the assistant's are missing or empty")
            if _blank(msgs[-1:]):
                raise DataError(f"{spec}: row {i}: the assistant's message (the demonstration) is empty")
    else:
        for i, r in enumerate(rows, 1):
            for col in ("prompt", "completion"):
                v = r[col]
                if not isinstance(v, (str, list)) or isinstance(v, list) and not all(
                        isinstance(m, dict) and "role" in m and "content" in m for m in v):
                    raise DataError(f"{spec}: row {i}: '{col}' must be a string or a list of {{role, content}} chat "
                                    f"messages, got {v!r:.40}")
                if _blank(v):
                    raise DataError(f"{spec}: row {i}: the '{col}' is empty")
    return rows


def _blank(prompt) -> bool:
    """An empty prompt: blank text, or chat messages with no text in any of them.

    >>> _blank("   "), _blank([{"role": "user", "content": ""}]), _blank("2 + 2?")
    (True, True, False)
    """
    if isinstance(prompt, str):
        return not prompt.strip()
    return not any(isinstance(m, dict) and (str(m.get("content") or "").strip() or m.get("tool_calls")) for m in prompt)


def prompt_rows(spec: str, split: str = "train", answer: bool = True, data_cfg=None) -> list[dict]:
    """Rows with ``prompt`` (and ``answer``) for RL and evaluation, columns mapped by ``data_cfg``."""
    rows = load_rows(spec, default_split=split)
    return map_columns(rows, spec, data_cfg, need_answer=answer)


def map_columns(rows: list[dict], spec: str, data_cfg=None, need_answer: bool = False) -> list[dict]:
    """Rows in the shape rlkit's RL and eval code reads: ``prompt`` (a string, or a list of chat messages)
    and ``answer`` (the gold answer as a string, extracted with ``data.answer_extractor``; absent when a row
    has none and ``need_answer`` is false), other columns kept. ``data_cfg``: the ``data:`` section
    (``prompt_column``, ``answer_column``, ``answer_extractor``); None: the defaults."""
    p_col = getattr(data_cfg, "prompt_column", "prompt")
    a_col = getattr(data_cfg, "answer_column", None)
    extractor = getattr(data_cfg, "answer_extractor", "none")
    first = rows[0]
    found = ", ".join(f"'{c}'" for c in first) or "none"
    if p_col not in first:
        hint = "" if p_col != "prompt" else " (set data.prompt_column to the column that holds it)"
        raise DataError(f"{spec}: expected a '{p_col}' column{hint}; found {found}")
    if a_col is None:
        a_col = next((c for c in ("answer", "solution") if c in first), "answer")
    if need_answer and a_col not in first:
        raise DataError(f"{spec}: expected columns '{p_col}'+'{a_col}' (set data.answer_column to the gold "
                        f"answer's column); found {found}")
    out = []
    for i, r in enumerate(rows, 1):
        r = dict(r)
        prompt = r.get(p_col)
        if prompt is None:
            raise DataError(f"{spec}: row {i} has no '{p_col}' column")
        if isinstance(prompt, list):
            if not prompt or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
                raise DataError(f"{spec}: row {i}: '{p_col}' must be a string or a list of {{role, content}} messages")
        elif not isinstance(prompt, str):
            raise DataError(f"{spec}: row {i}: '{p_col}' must be a string or a list of chat messages")
        if _blank(prompt):
            raise DataError(f"{spec}: row {i}: the '{p_col}' is empty (the model would be trained on no question)")
        r["prompt"] = with_chat_turns(prompt, data_cfg)
        gold = r.get(a_col)
        if gold is None:
            if need_answer:
                raise DataError(f"{spec}: row {i} has no '{a_col}' column")
            r.pop("answer", None)
        else:
            if isinstance(gold, (dict, list, tuple)):
                raise DataError(f"{spec}: row {i}: '{a_col}' is {type(gold).__name__} {gold!r:.40}; expected the gold "
                                "answer as text or a number")
            r["answer"] = extract_answer(str(gold), extractor, f"{spec}: row {i}: '{a_col}'")
        out.append(r)
    return out


def with_chat_turns(prompt: str | list[dict], data_cfg=None) -> str | list[dict]:
    """The prompt with ``data.system_prompt`` and ``data.few_shot`` as chat turns before it (a list of
    messages); as it is when neither is set. A conversational prompt's own system message is kept.

    >>> from rlkit.config import DataConfig
    >>> cfg = DataConfig(system_prompt="Be brief.", few_shot=[{"prompt": "1 + 1?", "completion": "2"}])
    >>> [m["role"] for m in with_chat_turns("2 + 2?", cfg)]
    ['system', 'user', 'assistant', 'user']
    """
    system = getattr(data_cfg, "system_prompt", None)
    shots = getattr(data_cfg, "few_shot", None) or []
    if system is None and not shots:
        return prompt
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    head = []
    if messages[0]["role"] == "system":
        head, messages = [messages[0]], messages[1:]
    elif system is not None:
        head = [{"role": "system", "content": system}]
    for shot in shots:
        head += [{"role": "user", "content": shot.prompt}, {"role": "assistant", "content": shot.completion}]
    return head + messages


def extract_answer(text: str, extractor: str, where: str) -> str:
    r"""The gold answer in ``text``: as it is (``none``), after GSM8K's final ``####`` (``gsm8k``), or inside
    the last ``\boxed{...}`` (``boxed``, MATH).

    >>> extract_answer("3 + 4 = 7 apples.\n#### 7", "gsm8k", "row 1")
    '7'
    >>> extract_answer("so $x = \\boxed{\\frac{1}{2}}$.", "boxed", "row 1")
    '\\frac{1}{2}'
    """
    if extractor == "none":
        return text
    if extractor == "gsm8k":
        if "####" not in text:
            raise DataError(f"{where} has no '#### <answer>' line (data.answer_extractor gsm8k)")
        answer = text.rsplit("####", 1)[1].strip().replace(",", "")
        if not answer:
            raise DataError(f"{where}: nothing after '####' (data.answer_extractor gsm8k)")
        return answer
    if extractor == "boxed":
        start = text.rfind("\\boxed{")
        if start < 0:
            raise DataError(f"{where} has no \\boxed{{...}} (data.answer_extractor boxed)")
        i, depth = start + len("\\boxed{"), 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
        raise DataError(f"{where}: \\boxed{{ is not closed (data.answer_extractor boxed)")
    raise DataError(f"unknown answer extractor {extractor!r}; expected none, gsm8k or boxed")


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
        prompt = r.get("prompt") or ""
        _text(prompt, spec, i, "prompt")
        if cols == ("responses",):
            resp = r["responses"]
            if not isinstance(resp, list) or len(resp) < 2:
                n = len(resp) if isinstance(resp, list) else 0
                raise DataError(f"{spec}: row {i}: a ranking needs at least 2 responses (best first), got {n}")
            for j, x in enumerate(resp, 1):
                _text(x, spec, i, f"responses[{j}]", blank_ok=False)
            for a in range(len(resp)):
                for b in range(a + 1, len(resp)):
                    out.append({"prompt": prompt, "chosen": resp[a], "rejected": resp[b], "group": i - 1})
        else:
            for col in ("chosen", "rejected"):
                _text(r[col], spec, i, col, blank_ok=False)
            out.append({"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"], "group": i - 1})
    return out


def _text(value, spec: str, row: int, col: str, blank_ok: bool = True) -> None:
    """A preference row's field must be text (conversational message lists are not supported there yet)."""
    if isinstance(value, list):
        raise DataError(f"{spec}: row {row}: '{col}' is a list (conversational preference rows are not supported "
                        "yet); give the prompt and responses as text (data.template chat renders them as chat turns)")
    if not isinstance(value, str):
        raise DataError(f"{spec}: row {row}: '{col}' must be text, got {type(value).__name__} {value!r:.40}")
    if not blank_ok and not value.strip():
        raise DataError(f"{spec}: row {row}: '{col}' is empty")


def rl_rows(data_cfg, check=None) -> list[dict]:
    """Prompt rows for RL from ``data.train`` and the ``data.mix`` sources, each row tagged with its route.

    ``check(spec, rows) -> rows`` validates or filters each source's rows (the columns and gold answers
    the rewards need, prompt lengths), so that errors name the source file and its row.
    """
    sources = [(data_cfg.train, data_cfg.route, data_cfg.max_samples)]
    sources += [(m.data, m.route, m.max_samples) for m in data_cfg.mix]
    out = []
    for spec, route, max_n in sources:
        rows = load_rows(spec, default_split="train")
        rows = rows[:max_n] if max_n else rows
        kept = map_columns(rows, spec, data_cfg)
        if route is not None:
            for r in kept:
                r["route"] = route
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
