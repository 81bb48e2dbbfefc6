import json

import pytest

from rlkit.data import DataError, load_rows, prompt_rows, sft_rows
from rlkit.embedded.tasks import careful_reasoning, demonstrations, task_split


def test_arithmetic_task_splits():
    train, test = task_split("arithmetic", "train"), task_split("arithmetic", "test")
    assert len(train) == 9500 and len(test) == 500
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in test[:50]:
        assert r["prompt"] == f"What is {r['a']} + {r['b']}?" and int(r["answer"]) == r["a"] + r["b"]
    assert task_split("arithmetic", "test") == test  # deterministic


def test_careful_reasoning_is_right():
    for a, b in [(0, 0), (9, 9), (99, 99), (34, 57), (50, 50)]:
        assert careful_reasoning(a, b).endswith(f"so {a + b}")
    demo = demonstrations(n=1)[0]["messages"]
    assert demo[-1]["role"] == "assistant" and "<answer>" in demo[-1]["content"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON line"):
        load_rows(str(p))


def test_missing_file_and_columns(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question": "x", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=r"expected a 'prompt' column \(set data.prompt_column .*\); found 'question', 'answer'"):
        prompt_rows(str(p))
    with pytest.raises(DataError, match=r"expected columns 'messages' or 'prompt'\+'completion'"):
        sft_rows(str(p))


def test_row_missing_a_column(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"prompt": "x", "answer": "1"}) + "\n" + json.dumps({"prompt": "y"}) + "\n")
    with pytest.raises(DataError, match="row 2 has no 'answer' column"):
        prompt_rows(str(p))


def test_messages_must_end_with_assistant(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="row 1: the last message must be the assistant's"):
        sft_rows(str(p))


def test_parquet_and_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "What is 2 + 2?", "answer": 4}]
    pq.write_table(pa.Table.from_pylist([{**r, "answer": str(r["answer"])} for r in rows]), tmp_path / "d.parquet")
    assert [r["answer"] for r in prompt_rows(str(tmp_path / "d.parquet"))] == ["2", "4"]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert [r["answer"] for r in prompt_rows(str(tmp_path / "d.json"))] == ["2", "4"]


def test_unknown_embedded_task_and_offline_hub_name():
    with pytest.raises(DataError, match="unknown built-in task or data set 'poetry'"):
        load_rows("embedded:poetry")
    with pytest.raises(DataError, match="could not load it as a datasets name"):
        load_rows("no-such-org/no-such-dataset")
