import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlkit.embedded import model_dir

from conftest import assert_clean_error

SMALL = ["--set", "rl.prompts_per_step=4", "--set", "rl.num_generations=4", "--set", "eval.limit=16",
         "--set", "rl.eval_steps=1000", "--set", "rl.log_completions=0"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_learns_on_the_embedded_world(cli, tmp_path):
    """A shortened r1_zero run: greedy accuracy on 100 held-out questions must rise by at least 25 points."""
    out = tmp_path / "grpo"
    r = cli("grpo", "--recipe", "r1_zero", "--output-dir", out, "--max-steps", 12, "--set", "rl.prompts_per_step=8",
            "--set", "eval.limit=100", "--set", "rl.eval_steps=1000", "--set", "rl.log_completions=0")
    assert r.exit_code == 0, r.output
    result = json.loads((out / "rlkit_result.json").read_text())
    assert result["after/pass@1"] >= result["before/pass@1"] + 0.25, result
    rows = _metrics(out)
    keys = set().union(*rows)
    for k in ("reward/total", "reward/accuracy", "reward/think_format", "policy/loss", "kl/mean", "policy/entropy",
              "policy/clip_frac", "rollout/completion_len", "time/rollout", "time/reward", "time/reference",
              "time/advantage", "time/update", "time/sync", "eval/pass@1",
              # every metric the loss computes, and one timer per phase
              "policy/dual_clip_frac", "policy/ratio_mean", "policy/ratio_max", "policy/approx_kl", "kl/coef",
              "optim/grad_norm", "optim/lr", "rollout/tokens_per_s", "time/old_logprobs", "time/log", "time/eval",
              "time/step"):
        assert k in keys, k
    assert all("/" in k for k in keys - {"step"}), sorted(k for k in keys if "/" not in k)  # namespaced
    assert all(r["policy/ratio_max"] >= r["policy/ratio_mean"] for r in rows if "policy/loss" in r)
    a = AutoModelForCausalLM.from_pretrained(model_dir()).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert (out / "training.png").stat().st_size > 0 and "grpo" in (out / "README.md").read_text()
    assert "before" in r.output and "after" in r.output
    assert "reward check: honest 1.20" in r.output  # the reward check ran first (rlkit rewards check)


def _rlkit(*args):
    exe = os.path.join(os.path.dirname(sys.executable), "rlkit")
    return [exe, *map(str, args)]


def test_grpo_resumes_after_sigkill(tmp_path):
    """Kill after the first checkpoint; the same command resumes (step count continues) and ends like an
    uninterrupted run."""
    args = ["grpo", "--max-steps", 6, "--set", "train.save_steps=2", *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_rlkit(*args, "--output-dir", ref), check=True, capture_output=True, env=env, timeout=600)

    out = tmp_path / "killed"
    p = subprocess.Popen(_rlkit(*args, "--output-dir", out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while not (out / "checkpoint-2").is_dir() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert (out / "checkpoint-2").is_dir(), "no checkpoint before the deadline"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "checkpoint-6").exists()

    again = subprocess.run(_rlkit(*args, "--output-dir", out), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout and "(step " in again.stdout
    steps = [r["step"] for r in _metrics(out) if "reward/total" in r]
    assert steps == sorted(steps) and steps[-1] == 6 and len(steps) == len(set(steps)) == 6
    final = {r["step"]: r for r in _metrics(out) if "reward/total" in r}
    final_ref = {r["step"]: r for r in _metrics(ref) if "reward/total" in r}
    # Same seeds, restored RNG and optimizer state: the resumed run follows the uninterrupted one.
    for s in (5, 6):
        assert final[s]["reward/total"] == pytest.approx(final_ref[s]["reward/total"], abs=0.15)
    res, res_ref = (json.loads((d / "rlkit_result.json").read_text()) for d in (out, ref))
    assert res["after/pass@1"] == pytest.approx(res_ref["after/pass@1"], abs=0.15)


@pytest.mark.slow
def test_grpo_two_processes(tmp_path):
    """The same loop as 2 processes: accelerate launch on CPU (gloo)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # On a machine without GPUs, --multi_gpu starts torchrun and the processes join over gloo on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlkit", "grpo", "--output-dir", str(out),
           "--max-steps", "2", *SMALL]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads((out / "rlkit_result.json").read_text())
    assert result["processes"] == 2 and result["steps"] == 2
    AutoModelForCausalLM.from_pretrained(out)


def test_grpo_bad_inputs(cli, tmp_path):
    assert_clean_error(cli("grpo", "--set", "rewards=[{name: acurracy}]"), "unknown reward 'acurracy'",
                       "did you mean 'accuracy'")
    assert_clean_error(cli("grpo", "--set", "rewards=[{name: 'no_such_module_xyz:score'}]"),
                       "no_such_module_xyz", "failed to import")
    data = tmp_path / "q.jsonl"
    data.write_text('{"prompt": "What is 1 + 1?", "response": "2"}\n')
    assert_clean_error(cli("grpo", "--dataset", data), "q.jsonl", "'answer'")
    assert_clean_error(cli("grpo", "--set", "rl.num_generations=1"), "rl.num_generations")
    assert_clean_error(cli("grpo", "--set", "rl.kl_controller=adaptive"), "rl.kl.target", "needs a target")
    # the advantage estimator alone decides the critic: gae under rlkit grpo trains one (no second switch)
    from rlkit.recipe import load_config

    assert load_config("r1_zero", default_recipe="r1_zero", sets=["rl.advantage=gae"]).rl.advantage.needs_values
    assert_clean_error(cli("grpo", "--set", "rl.advantage=grpoo"), "unknown name 'grpoo'")
    assert_clean_error(cli("grpo", "--recipe", "sft"), "kind 'sft'")
    gold = tmp_path / "gold.jsonl"
    gold.write_text('{"prompt": "What is 1 + 1?", "answer": "two plus \\\\frac{"}\n')
    assert_clean_error(cli("grpo", "--dataset", gold), "gold.jsonl: row 1", "math-verify")


def test_python_api(tmp_path):
    import rlkit

    result = rlkit.grpo("r1_zero", output_dir=tmp_path / "api", max_steps=2,
                        overrides={"rl.prompts_per_step": 4, "rl.num_generations": 4, "eval.limit": 8,
                                   "rl.log_completions": 0})
    assert result["steps"] == 2 and "after/pass@1" in result
    report = rlkit.evaluate(str(tmp_path / "api"), limit=8)
    assert report["metrics"]["n_prompts"] == 8


def test_grpo_options_lora_dynamic_sampling_iterations(cli, tmp_path):
    """LoRA (reference = base with the adapter disabled), DAPO dynamic sampling and overlong filtering,
    two updates per rollout batch over mini-batches (so the clipped ratio is active), rloo advantages."""
    out = tmp_path / "opts"
    r = cli("grpo", "--output-dir", out, "--max-steps", 2, *SMALL, "--set", "model.lora.r=4",
            "--set", "rl.dynamic_sampling=true", "--set", "rl.overlong_filter=true", "--set", "rl.num_iterations=2",
            "--set", "rl.mini_batch_size=8", "--set", "rl.micro_batch_size=4", "--set", "rl.advantage=rloo",
            "--set", "rl.loss_aggregation=seq_mean_token_sum_norm", "--set", "train.learning_rate=1e-3",
            "--set", "rl.logprob_chunk=64", "--set", "train.gradient_checkpointing=true",
            "--set", "report_to=[jsonl, tensorboard]")
    assert r.exit_code == 0, r.output
    rows = [row for row in _metrics(out) if "reward/total" in row]
    assert len(rows) == 2
    assert all(0 < row["rollout/groups_kept_frac"] <= 1 and row["rollout/rounds"] >= 1 for row in rows)
    # the second pass over the batch sees ratios away from 1: some tokens are clipped
    assert 0 < rows[-1]["policy/clip_frac"] < 1 and rows[-1]["kl/mean"] > 0
    # later mini-batches and the second pass see a policy that already moved: the ratio to the rollout
    # policy's log-probs is no longer 1 (it would be, were the old log-probs recomputed each time)
    assert rows[-1]["policy/approx_kl"] > 0
    assert rows[-1]["policy/ratio_max"] > 1 and rows[-1]["policy/ratio_mean"] != 1
    from safetensors.torch import load_file

    assert len(load_file(out / "adapter" / "adapter_model.safetensors")) > 0  # see also test_faults (item 10)
    assert any((out / "runs").iterdir())  # TensorBoard event files
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("extra", [["--set", "model.lora.r=4"], ["kl_in_reward"]], ids=["lora", "kl_in_reward"])
def test_beta_zero_computes_no_reference(cli, tmp_path, extra):
    """beta 0 means no KL anywhere: no reference model is loaded and no reference log-probs are computed
    (with LoRA the reference would be the adapter-disabled policy; with a recipe that puts the KL in the
    reward, the KL penalty)."""
    if extra == ["kl_in_reward"]:
        recipe = tmp_path / "kl_in_reward.yaml"
        recipe.write_text("kind: grpo\nrewards: [{name: accuracy}]\nrl: {kl: {coef: 0.05, where: reward}}\n")
        extra = ["--recipe", recipe]
    out = tmp_path / "b0"
    r = cli("grpo", "--output-dir", out, "--max-steps", 1, *SMALL, "--set", "rl.beta=0", *extra)
    assert r.exit_code == 0, r.output
    row = next(row for row in _metrics(out) if "reward/total" in row)
    assert "kl/mean" not in row and "kl/reward_penalty" not in row, row
