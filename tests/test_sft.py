import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkit.embedded import model_dir

from conftest import assert_clean_error

FAST = ["--set", "train.batch_size=8", "--set", "eval.limit=8", "--set", "train.logging_steps=1"]


def _changed(a_dir, b_dir) -> bool:
    a = AutoModelForCausalLM.from_pretrained(a_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(b_dir).state_dict()
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_sft_default_world_trains_saves_and_loads(cli, tmp_path):
    out = tmp_path / "sft"
    r = cli("sft", "--output-dir", out, "--max-steps", 3, *FAST)
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and model.config.architectures == ["LlamaForCausalLM"]
    assert _changed(model_dir(), out)
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "rlkit" in card
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in rows) and any("eval/pass@1" in r for r in rows)
    assert (out / "training.png").stat().st_size > 0
    result = json.loads((out / "rlkit_result.json").read_text())
    assert result["steps"] == 3


def test_sft_resumes_from_last_checkpoint(cli, tmp_path):
    out = tmp_path / "sft"
    r = cli("sft", "--output-dir", out, "--max-steps", 2, "--set", "train.save_steps=2", *FAST)
    assert r.exit_code == 0, r.output
    assert (out / "checkpoint-2").is_dir()
    r = cli("sft", "--output-dir", out, "--max-steps", 4, "--set", "train.save_steps=2", *FAST)
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.output and "checkpoint-2" in r.output
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_sft_prompt_completion_jsonl_r1_template_with_lora(cli, tmp_path):
    data = tmp_path / "pc.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "completion": f"<think> double </think> <answer> {2 * i} </answer>"}
            for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "lora"
    r = cli("sft", "--dataset", data, "--output-dir", out, "--max-steps", 2, "--set", "data.template=r1_zero",
            "--set", "model.lora.r=4", "--set", "eval.task=null", "--set", "train.batch_size=4")
    assert r.exit_code == 0, r.output
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert _changed(model_dir(), out)  # merged weights differ from the base


def test_sft_bad_inputs(cli, tmp_path):
    assert_clean_error(cli("sft", "--dataset", tmp_path / "none.jsonl"), "none.jsonl", "not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{oops\n')
    assert_clean_error(cli("sft", "--dataset", bad), "bad.jsonl:2", "malformed JSON")
    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"question": "q", "response": "r"}\n')
    assert_clean_error(cli("sft", "--dataset", cols), "cols.jsonl", "expected columns", "'question'")
    assert_clean_error(cli("sft", "--model", tmp_path / "no-model"), "no-model", "does not exist")
    assert_clean_error(cli("sft", "--model", "./also/missing"), "does not exist")


@pytest.mark.slow
def test_sft_console_script_subprocess(rlkit_proc, tmp_path):
    """The real console script, as a user runs it: exits 0 and writes a loadable model."""
    out = tmp_path / "sft"
    p = rlkit_proc("sft", "--output-dir", out, "--max-steps", 1, *FAST)
    assert p.returncode == 0, p.stderr
    AutoModelForCausalLM.from_pretrained(out)
    p = rlkit_proc("sft", "--set", "nope=1")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "unknown key 'nope'" in p.stderr
