import json

import pytest
from transformers import AutoModelForSequenceClassification

from rlkit.data import DataError, preference_rows
from rlkit.trainers.rm import GroupBatchSampler

from conftest import assert_clean_error


def test_ranking_expands_to_all_pairs(tmp_path):
    p = tmp_path / "rank.jsonl"
    p.write_text(json.dumps({"prompt": "q1", "responses": ["a", "b", "c", "d"]}) + "\n"
                 + json.dumps({"prompt": "q2", "responses": ["x", "y"]}) + "\n")
    pairs = preference_rows(str(p))
    assert len(pairs) == 4 * 3 // 2 + 1
    assert [(x["chosen"], x["rejected"]) for x in pairs if x["group"] == 0] == [
        ("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert pairs[-1] == {"prompt": "q2", "chosen": "x", "rejected": "y", "group": 1}


def test_group_batches_keep_a_prompts_pairs_together():
    groups = [0] * 6 + [1] * 3 + [2] * 6 + [3] * 1
    sampler = GroupBatchSampler(groups, batch_size=8, seed=0)
    for _ in range(3):  # several epochs, different orders
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(groups)))
        for b in batches:
            for g in {groups[i] for i in b}:
                assert sum(1 for i in b if groups[i] == g) == groups.count(g)


def test_preference_bad_inputs(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match="row 1 has no 'rejected' column"):
        preference_rows(str(p))
    p.write_text(json.dumps({"prompt": "q", "responses": ["only one"]}) + "\n")
    with pytest.raises(DataError, match="row 1: a ranking needs at least 2 responses"):
        preference_rows(str(p))


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from typer.testing import CliRunner

    from rlkit.cli import app

    out = tmp_path_factory.mktemp("rm") / "rm"
    r = CliRunner().invoke(app, ["rm", "--output-dir", str(out), "--max-steps", "25", "--set", "data.max_samples=300",
                                 "--set", "train.logging_steps=5"])
    assert r.exit_code == 0, r.output
    return out


def test_rm_trains_and_ranks_held_out_pairs(reward_model_dir):
    result = json.loads((reward_model_dir / "rlkit_result.json").read_text())
    assert result["eval/pair_accuracy"] >= 0.8 and result["eval/margin"] > 0, result
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir)
    assert model.config.num_labels == 1
    from rlkit.embedded.tasks import careful_answer, rough_answer
    from rlkit.rewards.model import reward_model

    good, bad = reward_model([careful_answer(12, 39), rough_answer(12, 39)], prompt=["What is 12 + 39?"] * 2,
                             path=str(reward_model_dir))
    assert good > bad


def test_ppo_kl_bounded_while_reward_rises(cli, reward_model_dir, tmp_path):
    out = tmp_path / "ppo"
    r = cli("ppo", "--output-dir", out, "--max-steps", 8, "--set", f"rl.value_model={reward_model_dir}",
            "--set", f"rewards=[{{name: reward_model, params: {{path: '{reward_model_dir}'}}}}]",
            "--set", "rl.prompts_per_step=8", "--set", "eval.limit=32", "--set", "rl.eval_steps=1000",
            "--set", "rl.log_completions=0", "--set", "rl.beta=0.05", "--set", "rl.ptx_coef=0.01",
            "--set", "rl.ptx_data=embedded:mixed_demos")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "reward/total" in row]
    assert len(steps) == 8
    first, last = sum(s["reward/total"] for s in steps[:2]) / 2, sum(s["reward/total"] for s in steps[-2:]) / 2
    assert last > first + 0.5, (first, last)
    assert max(abs(s["kl/mean"]) for s in steps) < 0.5
    for k in ("critic/loss", "critic/explained_variance", "policy/ptx_loss", "policy/clip_frac", "policy/entropy",
              "critic/clip_frac", "critic/value_mean", "critic/grad_norm", "kl/reward_penalty", "time/values"):
        assert k in steps[-1], k
    assert (out / "critic" / "config.json").is_file()


def test_ppo_bad_inputs(cli, tmp_path):
    from rlkit.embedded import model_dir

    assert_clean_error(cli("ppo", "--set", f"rl.value_model={model_dir()}",
                           "--set", f"rewards=[{{name: reward_model, params: {{path: '{model_dir()}'}}}}]",
                           "--max-steps", 1, "--output-dir", tmp_path / "x"),
                       "expected a reward model", "LlamaForCausalLM")
    # rlkit ppo and rlkit grpo differ in their default advantage only: group advantages under ppo mean no critic
    from rlkit.recipe import load_config

    cfg = load_config("ppo", default_recipe="ppo", sets=["rl.advantage=grpo"])
    assert cfg.kind == "ppo" and cfg.rl.advantage.name == "grpo" and not cfg.rl.advantage.needs_values
    missing = tmp_path / "no-rm"
    assert_clean_error(cli("ppo", "--set", "rl.value_model=policy", "--output-dir", tmp_path / "p",
                           "--set", f"rewards=[{{name: reward_model, params: {{path: '{missing}'}}}}]"), "no-rm")
    # the default recipe expects `rlkit rm`'s output: without it, a hint instead of a traceback
    assert_clean_error(cli("ppo", "--output-dir", tmp_path / "q", "--set", "rewards=[{name: reward_model, "
                           "params: {path: nosuch-org/nosuch-rm}}]"), "nosuch-org/nosuch-rm", "rlkit rm")
    assert_clean_error(cli("ppo", "--set", "rl.ptx_coef=0.1"), "rl.ptx.data", "required")
    rank = tmp_path / "rank.jsonl"
    rank.write_text(json.dumps({"prompt": "q", "responses": ["one"]}) + "\n")
    assert_clean_error(cli("rm", "--dataset", rank), "rank.jsonl: row 1", "at least 2 responses")
    comp = tmp_path / "comp.jsonl"
    comp.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    assert_clean_error(cli("rm", "--dataset", comp), "comp.jsonl: row 1 has no 'rejected'")
