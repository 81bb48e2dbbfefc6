"""Multi-turn RL: environment tokens never reach the loss, and grpo/eval run whole episodes with tools (the
calculator recipe, a TRL environment class) on the embedded model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import Accelerator

from rlkit.config import RLConfig
from rlkit.embedded.tasks import task_split
from rlkit.env.environments import load_env
from rlkit.env.episodes import run_episodes
from rlkit.env.schema import EnvConfig
from rlkit.models import load_causal_lm, load_tokenizer
from rlkit.rollout import SamplingParams
from rlkit.trainers.batch import ScoredGroup, batch_from_groups, completion_logprobs
from rlkit.trainers.rl import run_update

from test_episodes import CALL, Scripted

SMALL = ["--set", "train.max_steps=2", "--set", "rl.prompts_per_step=4", "--set", "rl.num_generations=4",
         "--set", "eval.limit=8", "--set", "rl.log_completions=0", "--set", "rl.reward_check=false"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _episode_batch(tok):
    cfg = EnvConfig(tools=["rlkit.env.calculator:calculator"])
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in task_split("calculator", "train")[:2]]
    texts, groups = run_episodes(Scripted(tok, [CALL, "<answer> 1801 </answer>"]), tok, load_env(cfg), cfg, rows,
                                 SamplingParams(n=2, max_new_tokens=64))
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    scored = [ScoredGroup(p, g, [1.0, 0.0], {}) for p, g in zip(ids, groups)]
    return batch_from_groups(scored, tok.pad_token_id)


def _update(model, batch, noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One SGD step of the RL update; ``noise`` [B, T, V] is added to the LM head's logits of the response
    window in every forward of the update. Returns the parameter change."""
    m = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    T = batch.completion_len
    hook = None
    if noise is not None:
        def add(_, __, out):
            return out + torch.cat([noise, torch.zeros_like(noise[:, :1])], 1)[:, -out.shape[1]:] if out.shape[1] == T + 1 else out
        hook = m.get_output_embeddings().register_forward_hook(add)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    # logprob_chunk null: the whole window's logits are computed (the default reads only the loss's tokens
    # through the head, so the tool's tokens never get logits at all), and the mask is what keeps them out
    cfg = RLConfig(max_grad_norm=1e9, max_new_tokens=64, kl={"coef": 0.1}, logprob_chunk=None)
    run_update(m, opt, sched, Accelerator(cpu=True), copy.copy(batch), cfg, beta=0.1)
    if hook is not None:
        hook.remove()
    return {k: before[k] - v.detach() for k, v in m.named_parameters()}


def test_environment_tokens_do_not_change_the_loss():
    """Changing the logits the policy gives to the tool's reply tokens (mask 0) leaves the update exactly as it
    was; changing those of one model token (mask 1) does not: the test can fail."""
    torch.manual_seed(0)
    model = load_causal_lm("embedded", "float32").train()
    tok = load_tokenizer("embedded")
    batch = _episode_batch(tok)
    env_pos = (batch.loss_mask == 0) & (batch.attention_mask[:, -batch.completion_len:] == 1)
    assert env_pos.any() and (batch.loss_mask == 1).any()
    batch.advantages = torch.randn(batch.loss_mask.shape) * batch.loss_mask
    with torch.no_grad():
        logp = completion_logprobs(model, batch)[0]
    batch.old_logp, batch.ref_logp = logp - 0.05, logp + 0.1
    V = model.config.vocab_size
    plain = _update(model, batch, None)
    noise = torch.randn(*batch.loss_mask.shape, V) * 5 * env_pos.unsqueeze(-1)
    on_env = _update(model, batch, noise)
    assert all(torch.equal(plain[k], on_env[k]) for k in plain)
    one = torch.zeros_like(noise)
    i, j = (batch.loss_mask == 1).nonzero()[0].tolist()
    one[i, j] = torch.randn(V) * 5
    on_model = _update(model, batch, one)
    assert any(not torch.allclose(plain[k], on_model[k]) for k in plain)


def test_calculator_recipe_runs_episodes_and_logs_them(cli, tmp_path):
    out = tmp_path / "calc"
    r = cli("grpo", "--recipe", "calculator", "--output-dir", str(out), *SMALL)
    assert r.exit_code == 0, r.output
    rows = _metrics(out)
    steps = [m for m in rows if "reward/total" in m]
    assert len(steps) == 2
    for key in ("env/turns", "env/tool_calls", "env/tool_errors", "env/truncated", "env/env_tokens"):
        assert key in steps[0], key
    assert any(m["env/tool_calls"] > 0 for m in steps)  # the base model calls the tool sometimes when sampling
    assert "eval/tool_calls" in rows[0] and "eval/pass@1" in rows[-1]
    # rlkit eval with the recipe scores whole episodes on the calculator task's held-out split
    r = cli("eval", "--recipe", "calculator", "--model", str(out), "--limit", "8", "--output", str(tmp_path / "e.json"))
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["data"] == "embedded:calculator:test" and "turns" in report["metrics"]
    assert "messages" in report["examples"][0]


def test_trl_environment_class_trains_unchanged(cli, tmp_path):
    """TRL's environment_factory class by dotted path; its get_reward is the only reward (reward/CounterEnv)."""
    recipe = tmp_path / "env.yaml"
    recipe.write_text("kind: grpo\nmodel: {path: embedded}\ndata: {train: embedded:calculator, template: chat}\n"
                      "env: {factory: 'trl_env:CounterEnv', max_turns: 2}\neval: {task: null}\n")
    r = cli("grpo", "--recipe", str(recipe), "--output-dir", str(tmp_path / "o"), *SMALL)
    assert r.exit_code == 0, r.output
    steps = [m for m in _metrics(tmp_path / "o") if "reward/total" in m]
    assert "reward/CounterEnv" in steps[0] and "env/turns" in steps[0]
    assert all(m["reward/CounterEnv/failures"] == 0 for m in steps), steps


@pytest.mark.parametrize("sets, needle", [
    (["env.factory=trl_env:Broken"], "env.factory: 'trl_env:Broken' could not be built"),
    (["env.tools=[no_such.module:fn]"], "env.tools: 'no_such.module:fn'"),
    (["env.factory=trl_env:NoReset"], "has no reset method"),
    (["data.template=r1_zero"], "env: a multi-turn episode is a conversation rendered by the chat template"),
])
def test_bad_environment_is_one_line_before_training(cli, tmp_path, sets, needle):
    from conftest import assert_clean_error

    args = [a for s in sets for a in ("--set", s)]
    r = cli("grpo", "--recipe", "calculator", "--output-dir", str(tmp_path / "x"), *args)
    assert_clean_error(r, needle)
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_sample_keeps_verified_episodes_and_sft_trains_on_their_assistant_turns(cli, tmp_path):
    """rlkit sample with the calculator: kept episodes are conversations with their tool turns and the tools;
    rlkit sft on them learns from the assistant turns only (the tool's reply and the prompt are masked out)."""
    from rlkit.trainers.sft import to_sft_examples

    recipe = tmp_path / "sample.yaml"
    recipe.write_text("kind: sample\nmodel: {path: embedded}\ndata: {train: embedded:calculator, template: chat}\n"
                      "env: {tools: ['rlkit.env.calculator:calculator'], max_turns: 3}\n"
                      "sample: {num_samples: 8, max_prompts: 32, max_new_tokens: 64, thresholds: {accuracy: 1.0}}\n"
                      "rewards: [{name: accuracy}]\n")
    out = tmp_path / "samples"
    r = cli("sample", "--recipe", str(recipe), "--output-dir", str(out))
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    with_tools = [row for row in rows if any(m["role"] == "tool" for m in row["messages"])]
    assert with_tools, rows[:2]
    row = with_tools[0]
    assert row["tools"][0]["function"]["name"] == "calculator" and row["messages"][-1]["role"] == "assistant"
    assert row["answer"] in row["messages"][-1]["content"]

    tok = load_tokenizer("embedded")
    [ex] = to_sft_examples([row], "chat", tok, "data.jsonl")
    trained = tok.decode([t for t, m in zip(ex["input_ids"], ex["completion_mask"]) if m])
    assert trained == "".join(m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant")

    r = cli("sft", "--dataset", str(out / "data.jsonl"), "--output-dir", str(tmp_path / "sft"),
            "--set", "train.max_steps=2", "--set", "eval.task=null")
    assert r.exit_code == 0, r.output


def test_the_same_class_runs_in_trls_grpo_trainer(tmp_path):
    """The environment class rlkit trains with is a valid TRL environment_factory as it is: TRL's GRPOTrainer
    builds it, exposes its tool and logs its get_reward under the class name."""
    from pathlib import Path

    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from trl_env import CounterEnv

    tok = load_tokenizer("embedded")
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "Count to 3."}], "start": 0, "target": 3}] * 4)
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no")
    trainer = GRPOTrainer(model=load_causal_lm("embedded", "float32"), args=args, train_dataset=data,
                          processing_class=tok, environment_factory=CounterEnv)
    assert [t.__name__ for t in trainer.tools] == ["increment"]
    trainer.train()
    assert any("rewards/CounterEnv/mean" in h for h in trainer.state.log_history)
