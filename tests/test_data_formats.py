"""The data formats people already have: GSM8K-style parquet, MATH-style JSONL, TRL's conversational prompts
with a `solution` column, and `datasets` directories saved with `save_to_disk`. Each trains (GRPO, two
steps) and evaluates; a bad mapping is one line naming the row or column."""

from __future__ import annotations

import json

import pytest

from rlkit.embedded.tasks import task_split

from conftest import assert_clean_error

RL = ["--max-steps", 2, "--set", "rl.prompts_per_step=4", "--set", "rl.num_generations=4",
      "--set", "rl.log_completions=0", "--set", "rl.reward_check=false"]


def _pairs(split: str, n: int) -> list[tuple[str, str]]:
    return [(r["prompt"], r["answer"]) for r in task_split("arithmetic", split)[:n]]


def _gsm8k(split, n):
    return [{"question": q, "answer": f"Add the numbers.\n#### {a}"} for q, a in _pairs(split, n)]


def _math(split, n):
    return [{"problem": q, "solution": f"The sum is $\\boxed{{{a}}}$.", "level": "Level 1"} for q, a in _pairs(split, n)]


def _trl(split, n):
    return [{"prompt": [{"role": "user", "content": q}], "solution": a} for q, a in _pairs(split, n)]


def _write(path, rows):
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _result(out):
    return json.loads((out / "rlkit_result.json").read_text())


FORMATS = {
    "gsm8k_parquet": (_gsm8k, ".parquet", ["--set", "data.prompt_column=question", "--set", "data.answer_extractor=gsm8k",
                                           "--set", "data.template=r1_zero"]),
    "math_jsonl": (_math, ".jsonl", ["--set", "data.prompt_column=problem", "--set", "data.answer_column=solution",
                                     "--set", "data.answer_extractor=boxed", "--set", "data.template=r1_zero"]),
    "trl_conversational": (_trl, ".jsonl", ["--set", "data.template=chat"]),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_format_trains_and_evaluates(cli, tmp_path, name):
    make, suffix, mapping = FORMATS[name]
    train = _write(tmp_path / f"train{suffix}", make("train", 64))
    held = _write(tmp_path / f"test{suffix}", make("test", 16))
    out = tmp_path / "grpo"
    r = cli("grpo", "--dataset", train, "--output-dir", out, *RL, "--set", f"data.eval={held}", *mapping)
    assert r.exit_code == 0, r.output
    result = _result(out)
    assert "before/pass@1" in result and "after/pass@1" in result  # evaluated on the mapped held-out file
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/accuracy" in row for row in rows if "reward/total" in row)  # gold answers reached the reward

    report = tmp_path / "eval.json"
    r = cli("eval", str(out), "--dataset", held, "--output", report, *mapping)
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    assert data["metrics"]["n_prompts"] == 16
    golds = {e["answer"] for e in data["examples"]}
    assert golds <= {a for _, a in _pairs("test", 16)}  # the extracted answer, not the whole solution text


def test_save_to_disk_directory(cli, tmp_path):
    """A DatasetDict saved with save_to_disk: training reads its train split, evaluation its test split."""
    import datasets

    d = tmp_path / "ds"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": q, "answer": a} for q, a in _pairs("train", 64)]),
        "test": datasets.Dataset.from_list([{"prompt": q, "answer": a} for q, a in _pairs("test", 12)]),
    }).save_to_disk(str(d))
    out = tmp_path / "grpo"
    r = cli("grpo", "--dataset", d, "--output-dir", out, *RL, "--set", f"data.eval={d}")
    assert r.exit_code == 0, r.output
    assert "after/pass@1" in _result(out)
    report = tmp_path / "eval.json"
    assert cli("eval", str(out), "--dataset", d, "--output", report).exit_code == 0
    assert json.loads(report.read_text())["metrics"]["n_prompts"] == 12
    single = tmp_path / "single"
    datasets.Dataset.from_list([{"prompt": "What is 1 + 1?", "answer": "2"}]).save_to_disk(str(single))
    r = cli("eval", "--dataset", single, "--max-new-tokens", 4)
    assert r.exit_code == 0, r.output


def test_bad_mappings_are_one_line(cli, tmp_path):
    gsm = _write(tmp_path / "gsm.parquet", _gsm8k("train", 8))
    assert_clean_error(cli("grpo", "--dataset", gsm, *RL), "gsm.parquet", "'prompt' column", "data.prompt_column",
                       "'question'")
    assert_clean_error(cli("grpo", "--dataset", gsm, *RL, "--set", "data.prompt_column=query"), "'query' column")
    bad = _gsm8k("train", 8)
    bad[5]["answer"] = "no final line"
    gsm_bad = _write(tmp_path / "gsm_bad.parquet", bad)
    assert_clean_error(cli("grpo", "--dataset", gsm_bad, *RL, "--set", "data.prompt_column=question",
                           "--set", "data.answer_extractor=gsm8k"), "gsm_bad.parquet: row 6", "####")
    math = _write(tmp_path / "math.jsonl", _math("train", 8))
    assert_clean_error(cli("grpo", "--dataset", math, *RL, "--set", "data.prompt_column=problem",
                           "--set", "data.answer_extractor=gsm8k"), "math.jsonl: row 1", "####")
    trl = _write(tmp_path / "trl.jsonl", _trl("train", 8))
    assert_clean_error(cli("grpo", "--dataset", trl, *RL, "--set", "data.template=r1_zero"),
                       "conversational prompt", "data.template chat")
    assert_clean_error(cli("eval", "--dataset", math, "--set", "data.prompt_column=problem",
                           "--set", "data.answer_column=answer"), "math.jsonl", "'answer'", "data.answer_column")
    import datasets

    only_train = tmp_path / "only_train"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "x", "answer": "1"}])}).save_to_disk(
        str(only_train))
    assert_clean_error(cli("eval", "--dataset", only_train), "only_train", "no 'test' split", "train")


def test_chat_template_that_opens_think_itself():
    """Qwen3 and the R1 distills put `<think>` in the generation prompt: the completion starts inside the think
    block, and the format rewards and eval's format check count the prefilled tag (through the real path:
    the tokenizer's chat template, render_prompt, the reward set, score_groups, evaluate's format check)."""
    from transformers import AutoTokenizer

    from rlkit.config import RewardSpec
    from rlkit.embedded import model_dir
    from rlkit.rewards.format import is_well_formed
    from rlkit.rollout import Sample
    from rlkit.scoring import RewardSet, score_groups
    from rlkit.templates import render_prompt

    tok = AutoTokenizer.from_pretrained(model_dir())
    tok.chat_template = tok.chat_template.replace("{{ '<|im_start|>assistant\n' }}",
                                                  "{{ '<|im_start|>assistant\n<think>\n' }}")
    prompt = render_prompt([{"role": "user", "content": "What is 3 + 4?"}], "chat", tok)
    assert prompt.endswith("<think>\n")
    samples = [Sample(" 3 + 4 = 7 </think> <answer> 7 </answer>", [1]),            # well formed after the prefill
               Sample("<think> 3 + 4 = 7 </think> <answer> 7 </answer>", [1]),     # reopened: one block, fine
               Sample(" 3 + 4 = 7 <answer> 7 </answer>", [1])]                      # never closed the think block
    rewards = RewardSet([RewardSpec(name="think_format"), RewardSpec(name="tag_count"), RewardSpec(name="accuracy")])
    scored = score_groups(rewards, [{"prompt": "What is 3 + 4?", "answer": "7"}], [prompt], [samples])
    assert scored.per_reward["think_format"] == [1.0, 1.0, 0.0]
    assert scored.per_reward["tag_count"] == [1.0, 1.0, 0.75]
    assert scored.per_reward["accuracy"] == [1.0, 1.0, 1.0]
    assert [is_well_formed(s.text, prompt) for s in samples] == [True, True, False]
    plain = render_prompt([{"role": "user", "content": "What is 3 + 4?"}], "chat",
                          AutoTokenizer.from_pretrained(model_dir()))
    assert not is_well_formed(samples[0].text, plain)  # without the prefill the same text is malformed


RG = "reasoning_gym:basic_arithmetic?size={n}&seed={seed}&max_terms=2&max_digits=1"


def test_reasoning_gym_task_trains_and_evaluates(cli, tmp_path):
    """A reasoning-gym task as RL and eval data, scored by the task's own checker (the reasoning_gym reward
    in training, the same scorer in eval)."""
    from rlkit.data import prompt_rows
    from rlkit.rewards.reasoning_tasks import reasoning_gym_score

    rows = prompt_rows(RG.format(n=4, seed=3))
    assert rows[0]["metadata"]["source_dataset"] == "basic_arithmetic" and rows[0]["prompt"].startswith("Calculate")
    gold = rows[0]["answer"]
    scores = reasoning_gym_score([f"<think> x </think> <answer> {gold} </answer>", "<answer> 99999 </answer>",
                                  f" {gold}"], answer=[gold] * 3, metadata=[rows[0]["metadata"]] * 3)
    assert scores == [1.0, 0.0, 1.0]  # inside <answer>, or the whole completion when there is no block

    out = tmp_path / "grpo"
    r = cli("grpo", "--dataset", RG.format(n=64, seed=1), "--output-dir", out, *RL,
            "--set", f"data.eval={RG.format(n=12, seed=2)}",
            "--set", "rewards=[{name: reasoning_gym}, {name: think_format, weight: 0.2}]")
    assert r.exit_code == 0, r.output
    assert "after/pass@1" in _result(out)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/reasoning_gym" in row for row in steps if "reward/total" in row)
    report = tmp_path / "eval.json"
    assert cli("eval", str(out), "--dataset", RG.format(n=12, seed=2), "--output", report).exit_code == 0
    assert json.loads(report.read_text())["metrics"]["n_prompts"] == 12


def test_reasoning_gym_bad_specs_are_one_line(cli, monkeypatch):
    assert_clean_error(cli("eval", "--dataset", "reasoning_gym:basic_arithmetik"), "unknown reasoning-gym task",
                       "did you mean basic_arithmetic")
    assert_clean_error(cli("eval", "--dataset", "reasoning_gym:basic_arithmetic?max_termz=2"),
                       "could not build 'basic_arithmetic'", "max_termz")
    assert_clean_error(cli("grpo", "--set", "rewards=[{name: reasoning_gym}]"), "no 'metadata' column", "reasoning_gym")
    import sys

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # an environment without the package
    assert_clean_error(cli("eval", "--dataset", "reasoning_gym:basic_arithmetic"), "pip install 'rlkit[reasoning-gym]'")


def test_trl_style_reward_function_plugs_in_unchanged(cli, tmp_path):
    """On a conversational data set a plug-in reward gets completions and prompts as TRL gives them (message
    lists); rlkit's own rewards in the same run still read text. Passing strings would make the plug-in fail
    on every sample (completion[0]["content"] on a str)."""
    trl = _write(tmp_path / "trl.jsonl", _trl("train", 32))
    out = tmp_path / "grpo"
    r = cli("grpo", "--dataset", trl, "--output-dir", out, *RL, "--set", "data.template=chat",
            "--set", "rewards=[{name: 'trl_style_reward:accuracy_reward'}, {name: think_format}]")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "reward/total" in row]
    assert steps and all(row["reward/trl_style_reward:accuracy_reward/failures"] == 0 for row in steps)
    assert all("reward/think_format" in row for row in steps)


def test_system_prompt_and_few_shot_become_chat_turns(cli, tmp_path):
    """data.system_prompt and data.few_shot put a system message and worked examples before every RL and eval
    prompt as chat turns (what gets SmolLM2 to answer in tags: recipes/smollm2_rg.yaml); they need the chat
    template, for training and for eval."""
    from transformers import AutoTokenizer

    from rlkit.config import DataConfig, EvalConfig
    from rlkit.data import prompt_rows
    from rlkit.evaluation import eval_rows
    from rlkit.models import resolve_model_path
    from rlkit.templates import render_prompt

    cfg = DataConfig(template="chat", system_prompt="Answer in <answer> tags.",
                     few_shot=[{"prompt": "Calculate 2 + 5.", "completion": "<answer>7</answer>"}])
    rows = prompt_rows(RG.format(n=3, seed=3), data_cfg=cfg)
    assert [m["role"] for m in rows[0]["prompt"]] == ["system", "user", "assistant", "user"]
    assert rows[0]["prompt"][-1]["content"].startswith("Calculate")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded"))
    text = render_prompt(rows[0]["prompt"], "chat", tok)
    assert text.index("Answer in <answer> tags.") < text.index("<answer>7</answer>") < text.index(rows[0]["prompt"][-1]["content"])
    # a conversational prompt keeps its own system message; built-in tasks get the turns in eval too
    own = prompt_rows(str(_write(tmp_path / "trl.jsonl", [{"prompt": [{"role": "system", "content": "Mine."},
                                                                      {"role": "user", "content": "1 + 1?"}],
                                                           "answer": "2"}])), data_cfg=cfg)
    assert [m["content"] for m in own[0]["prompt"]][:2] == ["Mine.", "Calculate 2 + 5."]
    _, task_rows = eval_rows(EvalConfig(), None, cfg)
    assert task_rows[0]["prompt"][0]["role"] == "system"

    out = tmp_path / "grpo"
    r = cli("grpo", "--dataset", RG.format(n=32, seed=1), "--output-dir", out, *RL, "--set", "data.template=chat",
            "--set", f"data.eval={RG.format(n=8, seed=2)}", "--set", "data.system_prompt=Be brief.",
            "--set", "data.few_shot=[{prompt: 'Calculate 2 + 5.', completion: '<answer>7</answer>'}]",
            "--set", "rewards=[{name: reasoning_gym}]")
    assert r.exit_code == 0, r.output
    assert "after/pass@1" in _result(out)
    assert_clean_error(cli("grpo", "--set", "data.few_shot=[{prompt: a, completion: b}]", "--set",
                           "data.template=r1_zero"), "data.few_shot", "needs data.template chat")
    assert_clean_error(cli("eval", "--recipe", "r1_zero", "--set", "data.template=chat", "--set", "data.system_prompt=x", "--template",
                           "plain"), "data.system_prompt", "needs eval.template chat")
    assert_clean_error(cli("sample", "--set", "data.template=chat", "--set", "data.system_prompt=x"),
                       "data.system_prompt", "rlkit sample does not use this key")
    assert_clean_error(cli("eval", "--dataset", "reasoning_gym:basic_arithmetic?max_terms=[2"),
                       "cannot read 'max_terms=[2'")
