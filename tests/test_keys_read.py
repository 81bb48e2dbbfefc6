"""No key a command accepts is ignored.

For every command, short runs set every key of its config to a value other than its default (each key in at
least one run). During the run an access-recording hook notes which config fields the code reads; reads while
the config is built and validated, dumped, hashed or printed do not count (pydantic's dumps do not go through
attribute access, and recording starts once the config is built). Every key set to a non-default value must
be read. The keys a command cannot use at all are refused in one line when set (the last test).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from rlkit.config import KINDS, RLRun
from rlkit.embedded import model_dir
from rlkit.sections import Section

from conftest import assert_clean_error
from keys_recording import leaves, unread_keys


def schema_leaves(model: type[Section], prefix: str = "") -> set[str]:
    from rlkit.config.loading import sections

    out = set()
    for name, field in model.model_fields.items():
        subs = sections(field.annotation)
        many = "[]" if getattr(field.annotation, "__origin__", None) is list else ""
        if subs:
            for sub in subs:
                out |= schema_leaves(sub, f"{prefix}{name}{many}.")
        else:
            out.add(prefix + name)
    return out


COVERED: dict[type, set[str]] = {}  # config model -> the keys some run of this module set to a non-default value


def unread(rec) -> list[str]:
    COVERED.setdefault(type(rec.cfgs[0]), set()).update(
        path for path, (_, _, default) in leaves(rec.cfgs[0]).items() if not default)
    return unread_keys(rec)


def _write(tmp_path, name: str, cfg: dict):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Prompt rows with gold answers under other column names (MATH style), and an SFT data set."""
    d = tmp_path_factory.mktemp("keys")
    from rlkit.embedded.tasks import task_split

    rows = task_split("arithmetic", "train")[:40]
    with open(d / "math.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"question": r["prompt"], "solution": f"so \\boxed{{{r['answer']}}}"}) + "\n")
    return d


def _base(kind: str, out, **sections) -> dict:
    return {"kind": kind, "name": f"keys-{kind}", "description": "every key set", "output_dir": str(out),
            **sections}


MODEL = {"path": str(model_dir()), "dtype": "float32", "trust_remote_code": True}
EVAL = {"task": "arithmetic", "split": "train", "template": "chat", "num_samples": 2, "temperature": 0.7,
        "top_p": 0.9, "max_new_tokens": 8, "batch_size": 4, "limit": 4}
RL_TRAIN = {"learning_rate": 1e-3, "max_steps": 2, "warmup_ratio": 0.1, "lr_scheduler": "linear",
            "weight_decay": 0.01, "seed": 3, "logging_steps": 1, "save_steps": 1, "save_total_limit": 1,
            "gradient_checkpointing": True, "precision": "bf16"}


def test_sft_and_rm_read_every_key(cli, tmp_path, recorder, files):
    from rlkit.embedded.tasks import demonstrations

    with open(tmp_path / "demos.jsonl", "w") as f:
        for r in demonstrations("arithmetic")[:64]:
            f.write(json.dumps(r) + "\n")
    sft = _base("sft", tmp_path / "sft", report_to=["jsonl"],
                model={**MODEL, "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}},
                data={"train": str(tmp_path / "demos.jsonl"), "eval": str(files / "math.jsonl"), "template": "plain",
                      "max_samples": 48, "on_overlong": "drop", "prompt_column": "question",
                      "answer_column": "solution", "answer_extractor": "boxed"},
                train={**RL_TRAIN, "epochs": 2.0, "max_steps": None, "batch_size": 8, "grad_accum": 2,
                       "max_length": 200},
                sft={"completion_only_loss": False, "packing": True},
                eval={**EVAL, "task": "auto"}, rollout={"engine": "hf", "hf_cache": "static"})
    r = cli("sft", "--recipe", _write(tmp_path, "sft", sft))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)
    # steps instead of epochs, a built-in task to evaluate on instead of data.eval
    recorder.reset()
    data = {k: sft["data"][k] for k in ("train", "template", "max_samples", "on_overlong")}
    sft = {**sft, "output_dir": str(tmp_path / "sft2"), "data": data,
           "train": {**sft["train"], "max_steps": 2}, "eval": EVAL}
    r = cli("sft", "--recipe", _write(tmp_path, "sft2", sft))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)
    assert "Trained with" in (tmp_path / "sft" / "README.md").read_text()


def test_rm_reads_every_key(cli, tmp_path, recorder):
    rm = _base("rm", tmp_path / "rm", report_to=["jsonl"], model=MODEL,
               data={"train": "embedded:rankings", "template": "plain", "max_samples": 40, "on_overlong": "drop"},
               train={**RL_TRAIN, "batch_size": 8, "grad_accum": 2, "max_length": 200, "epochs": 3.0, "max_steps": None},
               rm={"eval_fraction": 0.2, "group_batches": False, "center_rewards_coefficient": 0.01})
    r = cli("rm", "--recipe", _write(tmp_path, "rm", rm))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)
    recorder.reset()  # steps instead of epochs
    rm = {**rm, "output_dir": str(tmp_path / "rm2"), "train": {**rm["train"], "epochs": 1.0, "max_steps": 2}}
    r = cli("rm", "--recipe", _write(tmp_path, "rm2", rm))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)


def test_sample_reads_every_key(cli, tmp_path, recorder, files):
    sample = _base("sample", tmp_path / "sample", model=MODEL,
                   data={"train": str(files / "math.jsonl"), "template": "plain", "max_samples": 6,
                         "on_overlong": "drop", "prompt_column": "question", "answer_column": "solution",
                         "answer_extractor": "boxed", "route": "math",
                         "mix": [{"data": str(files / "math.jsonl"), "route": "arith", "max_samples": 4}]},
                   train={"seed": 5},
                   sample={"num_samples": 2, "max_prompts": 8, "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 24,
                           "thresholds": {"score": 0.0}, "max_per_prompt": 2, "dedupe": False,
                           "mix_data": "embedded:demos", "mix_max": 3, "batch_size": 4},
                   rollout={"engine": "hf", "hf_cache": "static"},
                   rewards=[{"name": "accuracy", "weight": 0.5, "params": {"mode": "any"}, "alias": "score",
                             "routes": ["math", "arith"], "timeout": 5.0}])
    r = cli("sample", "--recipe", _write(tmp_path, "sample", sample))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A reward model trained for two steps (the PPO critic starts from it and scores the samples)."""
    from rlkit.recipe import load_config
    from rlkit.trainers.rm import run_rm

    out = tmp_path_factory.mktemp("rm") / "rm"
    run_rm(load_config("rm", default_recipe="rm", flags={"train.max_steps": 2, "output_dir": str(out)}))
    return out


RL = {"prompts_per_step": 4, "num_generations": 3, "max_new_tokens": 24, "temperature": 0.9, "top_p": 0.95,
      "num_iterations": 2, "mini_batch_size": 6, "micro_batch_size": 2, "max_grad_norm": 0.5, "logprob_chunk": 8,
      "padding_free": False,
      "reward_scale": 2.0, "reward_clip": 5.0, "overlong_filter": True, "eval_steps": 1, "log_completions": 2,
      "reward_check": False}


def test_grpo_reads_every_key(cli, tmp_path, recorder, files):
    cfg = _base("grpo", tmp_path / "grpo", report_to=["jsonl"],
                model={**MODEL, "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}},
                data={"train": str(files / "math.jsonl"), "eval": str(files / "math.jsonl"), "max_samples": 16,
                      "on_overlong": "drop", "prompt_column": "question", "answer_column": "solution",
                      "answer_extractor": "boxed", "route": "math", "system_prompt": "Think, then answer.",
                      "few_shot": [{"prompt": "What is 1 + 1?", "completion": "<answer>2</answer>"}],
                      "mix": [{"data": str(files / "math.jsonl"), "route": "more", "max_samples": 8}]},
                train=RL_TRAIN,
                rl={**RL, "advantage": {"name": "grpo", "std_normalize": "batch"},
                    "policy_loss": {"name": "ppo_clip", "epsilon": 0.1, "epsilon_high": 0.3, "dual_clip": 3.0},
                    "loss_aggregation": "seq_mean_token_mean",
                    "kl": {"coef": 0.05, "estimator": "k2", "controller": "adaptive", "target": 0.1, "horizon": 100},
                    "dynamic_sampling": {"max_rounds": 1},
                    "ptx": {"coef": 0.1, "data": "embedded:demos", "batch_size": 2}},
                eval={**EVAL, "task": "auto"}, rollout={"engine": "hf", "hf_cache": "static"},
                rewards=[{"name": "accuracy", "weight": 0.5, "params": {"mode": "any"}, "alias": "acc",
                          "routes": ["math", "more"], "timeout": 5.0}, {"name": "think_format"}])
    r = cli("grpo", "--recipe", _write(tmp_path, "grpo", cfg))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)


def test_grpo_variants_read_their_keys(cli, tmp_path, recorder):
    """The other advantage estimator with knobs, REINFORCE, the KL in the reward, epochs instead of steps."""
    cfg = _base("grpo", tmp_path / "grpo_b", report_to=["jsonl"], model={**MODEL, "dtype": "bfloat16"},
                data={"train": "embedded:arithmetic", "template": "r1_zero", "max_samples": 12},
                train={**RL_TRAIN, "max_steps": None, "epochs": 0.3},
                rl={**RL, "num_iterations": 1, "mini_batch_size": None,
                    "advantage": {"name": "reinforce_pp", "gamma": 0.9}, "policy_loss": {"name": "reinforce"},
                    "loss_aggregation": "seq_mean_token_sum_norm",
                    "kl": {"coef": 0.02, "estimator": "k1", "where": "reward"}},
                eval={**EVAL, "template": "plain"}, rewards=[{"name": "accuracy"}])
    r = cli("grpo", "--recipe", _write(tmp_path, "grpo_b", cfg))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)


def test_grpo_and_eval_with_an_environment_read_its_keys(cli, tmp_path, recorder):
    """env: a TRL environment class, a stand-alone tool, the turn limit, the token budget and the tool timeout."""
    env = {"factory": "trl_env:CounterEnv", "tools": ["rlkit.env.calculator:calculator"], "max_turns": 2,
           "max_tokens": 60, "tool_timeout": 5.0}
    cfg = _base("grpo", tmp_path / "grpo_env", report_to=["jsonl"], model=MODEL,
                data={"train": "embedded:calculator", "template": "chat", "max_samples": 8},
                train={**RL_TRAIN, "max_steps": 1}, rl={**RL, "num_iterations": 1, "mini_batch_size": None},
                eval={"task": "calculator", "limit": 2, "max_new_tokens": 16}, env=env,
                rewards=[{"name": "accuracy"}])
    r = cli("grpo", "--recipe", _write(tmp_path, "grpo_env", cfg))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)
    recorder.reset()
    recipe = {"kind": "eval", "model": MODEL, "data": {"template": "chat"},
              "eval": {"task": "calculator", "limit": 2, "num_samples": 2}, "env": env}
    r = cli("eval", "--recipe", _write(tmp_path, "eval_env", recipe))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)
    recorder.reset()
    recipe = {"kind": "sample", "model": MODEL, "output_dir": str(tmp_path / "sample_env"),
              "data": {"train": "embedded:calculator", "template": "chat"}, "env": env,
              "sample": {"num_samples": 2, "max_prompts": 4, "thresholds": {"accuracy": 0.0}},
              "rewards": [{"name": "accuracy"}]}
    r = cli("sample", "--recipe", _write(tmp_path, "sample_env", recipe))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)


@pytest.mark.parametrize("loss", [{"name": "gspo", "epsilon": 1e-3, "epsilon_high": 2e-3},
                                  {"name": "cispo", "epsilon_max": 4.0},
                                  {"name": "sapo", "temperature_pos": 0.9, "temperature_neg": 1.2}])
def test_the_ratio_losses_read_their_keys(cli, tmp_path, recorder, loss):
    cfg = _base("grpo", tmp_path / loss["name"], report_to=["jsonl"], model=MODEL,
                data={"train": "embedded:arithmetic", "template": "r1_zero", "max_samples": 8},
                train={**RL_TRAIN, "max_steps": 1}, rl={**RL, "policy_loss": loss}, eval={"task": None},
                rewards=[{"name": "accuracy"}])
    r = cli("grpo", "--recipe", _write(tmp_path, loss["name"], cfg))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)


def test_ppo_reads_every_key(cli, tmp_path, recorder, reward_model):
    cfg = _base("ppo", tmp_path / "ppo", report_to=["jsonl"], model=MODEL,
                data={"train": "embedded:arithmetic", "max_samples": 16}, train=RL_TRAIN,
                rl={**RL, "advantage": {"name": "gae", "gamma": 0.99, "lam": 0.9, "whiten": False,
                                        "value_model": str(reward_model), "value_learning_rate": 1e-3,
                                        "value_clip": 0.3}},
                eval={"task": None}, rewards=[{"name": "reward_model", "params": {"path": str(reward_model)}}])
    r = cli("ppo", "--recipe", _write(tmp_path, "ppo", cfg))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)


def test_eval_reads_every_key(cli, tmp_path, recorder, files):
    settings = {k: v for k, v in EVAL.items() if k != "template"}
    recipe = {"kind": "eval", "model": MODEL, "eval": {**settings, "task": "auto"},
              "data": {"template": "chat", "eval": str(files / "math.jsonl"), "prompt_column": "question",
                       "answer_column": "solution", "answer_extractor": "boxed", "system_prompt": "Think, then answer.",
                       "few_shot": [{"prompt": "What is 1 + 1?", "completion": "<answer>2</answer>"}]},
              "rollout": {"engine": "hf", "hf_cache": "static"}}
    r = cli("eval", "--recipe", _write(tmp_path, "eval", recipe))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)
    recorder.reset()  # a built-in task instead of data.eval
    recipe = {**recipe, "data": {"template": "plain"}, "eval": settings}
    r = cli("eval", "--recipe", _write(tmp_path, "eval2", recipe))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)


def test_vllm_colocated_reads_its_keys(cli, tmp_path, recorder):
    """The colocated engine's keys (those that mean something on this machine) and the importance-sampling
    cap; the GPU-only keys are refused on a machine without one."""
    cfg = _base("grpo", tmp_path / "vllm", report_to=["jsonl"],
                data={"max_samples": 8}, train={"max_steps": 1},
                rl={"prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 16, "tis_cap": 3.0,
                    "is_mode": "mask", "is_level": "sequence"},
                eval={"task": None}, rewards=[{"name": "accuracy"}],
                rollout={"engine": "vllm", "mode": "colocate", "kv_cache_gib": 0.2, "max_model_len": 200,
                         "enforce_eager": True, "max_staleness": 1})
    r = cli("grpo", "--recipe", _write(tmp_path, "vllm", cfg))
    assert r.exit_code == 0, r.output
    assert unread(recorder) == [], unread(recorder)
    if not torch.cuda.is_available():
        for key in ("gpu_memory_utilization=0.5", "sleep=false"):
            assert_clean_error(cli("grpo", "--recipe", _write(tmp_path, "vllm", cfg), "--set", f"rollout.{key}",
                                   "--output-dir", tmp_path / "refused"), f"rollout.{key.split('=')[0]}", "GPU")


# keys no run above sets: `kind` (the command itself); the vLLM server's (the server test in tests/test_vllm.py
# records them); the GPU-only keys of the colocated engine (refused above on a machine without a GPU)
ELSEWHERE = {"kind", "rollout.mode", "rollout.server_url", "rollout.server_timeout", "rollout.server_wait",
             "rollout.sync_dir", "rollout.gpu_memory_utilization", "rollout.sleep"}
# the colocated engine's keys are read by the engine every command builds from its `rollout:` section
# (rlkit.rollout.make_engine); the grpo run above records them
ENGINE_KEYS = {"rollout.engine", "rollout.kv_cache_gib", "rollout.max_model_len", "rollout.enforce_eager",
               # refused when set for eval, sample and sft (test_staleness_is_refused_...); read by grpo and ppo
               "rollout.max_staleness"}


def test_every_key_of_every_command_was_set_by_some_run():
    assert set(COVERED) == set(KINDS.values()), COVERED.keys()
    for model, covered in COVERED.items():
        left = schema_leaves(model) - covered - ELSEWHERE - (ENGINE_KEYS if model is not RLRun else set())
        assert left == set(), (model.__name__, left)


@pytest.mark.parametrize("sets, message", [
    (["rl.gamma=0.9"], "rl.gamma (rl.advantage.gamma): advantage 'grpo' has no key 'gamma' (its keys: std_normalize)"),
    (["rl.advantage=rloo", "rl.std_normalize=batch"], "advantage 'rloo' has no key 'std_normalize'"),
    (["rl.beta=0", "rl.kl_in=reward"], "rl.kl_in: only used with rl.beta > 0"),
    (["rl.beta=0", "rl.kl_estimator=k2"], "rl.kl_estimator: only used with rl.beta > 0"),
    (["rl.epsilon=0.3", "rl.policy_loss=reinforce"], "policy loss 'reinforce' has no key 'epsilon'"),
    (["rl.max_resample_rounds=2"], "rl.max_resample_rounds: only used with rl.dynamic_sampling"),
    (["rl.ptx_data=embedded:demos"], "rl.ptx_data: only used with rl.ptx_coef > 0"),
    (["rl.kl_target=0.1"], "rl.kl_target (rl.kl.target): only used by the adaptive KL controller"),
    (["train.batch_size=4"], "train.batch_size: rlkit grpo does not use this key (it is read by rlkit sft, rlkit rm)"),
    (["rl.tis_cap=3"], "rl.tis_cap: only used when another engine samples"),
    (["rl.is_mode=mask"], "rl.is_mode: only used when another engine samples"),
    (["rollout.engine=vllm", "rl.is_mode=mask", "rl.tis_cap=1"], "rl.tis_cap: 1.0 with rl.is_mode mask"),
])
def test_keys_that_would_do_nothing_are_refused_in_one_line(cli, sets, message):
    args = [x for s in sets for x in ("--set", s)]
    assert_clean_error(cli("grpo", "--recipe", "r1_zero", *args), message)


@pytest.mark.parametrize("command, key", [("sft", "rl.beta=0.1"), ("rm", "model.lora.r=4"), ("sample", "eval.limit=3"),
                                          ("rm", "eval.limit=3"), ("eval", "train.seed=1")])
def test_keys_a_command_does_not_read_are_refused(cli, tmp_path, command, key):
    args = ["embedded"] if command == "eval" else []
    assert_clean_error(cli(command, *args, "--set", key), f"rlkit {command} does not use this key")


@pytest.mark.parametrize("command", ["eval", "sample", "sft"])
def test_staleness_is_refused_where_nothing_trains_beside_the_engine(cli, command):
    args = ["embedded"] if command == "eval" else []
    assert_clean_error(cli(command, *args, "--set", "rollout.engine=vllm", "--set", "rollout.max_staleness=1"),
                       f"rollout.max_staleness: rlkit {command} has no update to overlap the generation with")
