import json

from conftest import assert_clean_error


def test_eval_embedded_base_model_r1_zero(cli, tmp_path):
    """The embedded base model leaves room for RL: low but non-zero greedy accuracy, some good format."""
    out = tmp_path / "eval.json"
    r = cli("eval", "--task", "arithmetic", "--limit", 200, "--output", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert report["template"] == "r1_zero" and m["n_prompts"] == 200
    assert 0.05 <= m["pass@1"] <= 0.50, m
    assert m["format"] > 0, m
    assert "pass@1" in r.output


def test_eval_sampled_k(cli, tmp_path):
    out = tmp_path / "eval.json"
    r = cli("eval", "--limit", 16, "--num-samples", 4, "--output", out)
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())["metrics"]
    assert {"pass@1", "avg@4", "pass@4", "format@4", "format"} <= set(m)
    assert m["pass@4"] >= m["avg@4"]  # at least one right among 4 is never rarer than the mean


def test_eval_jsonl(cli, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}) + "\n" for i in range(6)))
    out = tmp_path / "e.json"
    r = cli("eval", "--data", data, "--output", out, "--template", "chat")
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["metrics"]["n_prompts"] == 6 and report["template"] == "chat"


def test_eval_bad_inputs(cli, tmp_path):
    assert_clean_error(cli("eval", tmp_path / "nomodel"), "nomodel", "does not exist")
    cols = tmp_path / "c.jsonl"
    cols.write_text('{"prompt": "q"}\n')
    assert_clean_error(cli("eval", "--data", cols), "c.jsonl", "'answer'")
    assert_clean_error(cli("eval", "--task", "poetry"), "unknown built-in task or data set 'poetry'")
    assert_clean_error(cli("eval", "--template", "fancy"), "data.template", "r1_zero")  # --template sets it
    not_lm = tmp_path / "cls"
    from transformers import LlamaConfig, LlamaForSequenceClassification

    LlamaForSequenceClassification(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, num_labels=1)).save_pretrained(not_lm)
    assert_clean_error(cli("eval", not_lm, "--limit", 2), "expected a causal language model")
