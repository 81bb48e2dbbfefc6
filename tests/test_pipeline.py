import json

import pytest
import yaml

from rlkit.config import ConfigError
from rlkit.pipeline import Pipeline, Stage, load_pipeline

from conftest import assert_clean_error

TINY = {"train": {"max_steps": 2, "batch_size": 8, "save_steps": 2}, "eval": {"limit": 8}}


def _tiny_pipeline(tmp_path, ppo_steps=2) -> Pipeline:
    return Pipeline(name="tiny", output_dir=str(tmp_path / "out"), defaults={**TINY, "data": {"template": "chat"}},
                    stages=[
                        Stage("sft", "sft", {"data": {"train": "embedded:mixed_demos"}}),
                        Stage("rm", "rm", {"model": {"path": "stage:sft"}, "data": {"train": "embedded:rankings",
                                                                                     "max_samples": 40}}, recipe="rm"),
                        Stage("ppo", "ppo", {"model": {"path": "stage:sft"},
                                             "train": {"max_steps": ppo_steps},
                                             "rl": {"value_model": "stage:rm", "prompts_per_step": 4,
                                                    "num_generations": 2, "eval_steps": 100, "log_completions": 0},
                                             "rewards": [{"name": "reward_model", "params": {"path": "stage:rm"}}]},
                              recipe="ppo"),
                    ])


def test_pipeline_runs_skips_and_reruns_changed_stages(tmp_path):
    p = _tiny_pipeline(tmp_path)
    m = p.run()
    assert [s["status"] for s in m["stages"]] == ["done"] * 3
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    ppo = manifest["stages"][2]
    assert ppo["inputs"] == ["rm", "sft"] and ppo["config"]["model"]["path"] == str(tmp_path / "out" / "sft")
    assert ppo["metrics"]["steps"] == 2 and ppo["seconds"] > 0
    mtimes = {s: (tmp_path / "out" / s / "config.json").stat().st_mtime for s in ("sft", "rm", "ppo")}

    events = []
    p.run(on_stage=lambda n, st: events.append((n, st)))  # nothing changed: every stage is skipped
    assert all(st.startswith("skipped") for _, st in events) and len(events) == 3
    assert all((tmp_path / "out" / s / "config.json").stat().st_mtime == t for s, t in mtimes.items())

    events.clear()
    _tiny_pipeline(tmp_path, ppo_steps=3).run(on_stage=lambda n, st: events.append((n, st)))
    assert [n for n, st in events if st == "running"] == ["ppo"]  # only the changed stage re-runs
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"][2]["metrics"]["steps"] == 3

    events.clear()
    p.run(only="rm", on_stage=lambda n, st: events.append((n, st)))
    assert [n for n, st in events if st == "running"] == ["rm"]

    events.clear()
    p.run(start_from="rm", on_stage=lambda n, st: events.append((n, st)))
    assert [n for n, st in events if st == "running"] == ["rm", "ppo"]


def test_pipeline_reference_errors(tmp_path):
    with pytest.raises(ConfigError, match="refers to unknown stage 'sfft'; did you mean 'sft'"):
        Pipeline("x", [Stage("sft", "sft"), Stage("rm", "rm", {"model": {"path": "stage:sfft"}})])
    with pytest.raises(ConfigError, match="refers to stage 'rm', which runs after it"):
        Pipeline("x", [Stage("sft", "sft", {"model": {"path": "stage:rm"}}), Stage("rm", "rm")])
    with pytest.raises(ConfigError, match="refers to itself"):
        Pipeline("x", [Stage("sft", "sft", {"model": {"path": "stage:sft"}})])
    with pytest.raises(ConfigError, match="defined twice"):
        Pipeline("x", [Stage("a", "sft"), Stage("a", "sft")])


def test_run_cli_bad_pipelines(cli, tmp_path):
    bad = tmp_path / "cycle.yaml"
    bad.write_text(yaml.safe_dump({"name": "c", "stages": [
        {"name": "a", "kind": "sft", "model": {"path": "stage:b"}}, {"name": "b", "kind": "sft"}]}))
    assert_clean_error(cli("run", bad), "cycle.yaml", "stage 'a' refers to stage 'b', which runs after it")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"name": "u", "stages": [{"name": "a", "kind": "sft", "trian": {}}]}))
    assert_clean_error(cli("run", unknown, "--output-dir", tmp_path / "o"), "unknown key 'trian'", "did you mean 'train'")
    assert_clean_error(cli("run", "sft"), "not a pipeline")
    assert_clean_error(cli("run", "instructgpt", "--only", "nope", "--output-dir", tmp_path / "o2"), "--only nope")
    assert load_pipeline("instructgpt").stage("ppo").refs() == ["rm", "sft"]


def _write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_killed_during_grpo_stage_resumes_that_stage(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = _write(tmp_path / "p.yaml", {"name": "p", "stages": [
        {"name": "cold", "kind": "sft", "data": {"train": "embedded:demos", "max_samples": 32, "template": "chat"},
         "train": {"max_steps": 2, "batch_size": 8}, "eval": {"limit": 4}},
        {"name": "rl", "recipe": "r1_zero", "model": {"path": "stage:cold"}, "data": {"template": "chat"},
         "train": {"max_steps": 6, "save_steps": 2},
         "rl": {"prompts_per_step": 4, "num_generations": 4, "eval_steps": 100, "log_completions": 0},
         "eval": {"limit": 8}}]})
    out = tmp_path / "out"
    exe = os.path.join(os.path.dirname(sys.executable), "rlkit")
    cmd = [exe, "run", str(recipe), "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (out / "rl" / "checkpoint-2").is_dir() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert (out / "rl" / "checkpoint-2").is_dir()
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads((out / "manifest.json").read_text())["stages"][1]["status"] == "running"
    cold_mtime = (out / "cold" / "model.safetensors").stat().st_mtime

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "stage cold: skipped" in again.stdout and "resuming from" in again.stdout
    assert (out / "cold" / "model.safetensors").stat().st_mtime == cold_mtime
    m = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["done", "done"] and m["stages"][1]["metrics"]["steps"] == 6

    t0 = time.time()
    third = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert third.returncode == 0 and third.stdout.count("skipped") == 2
    assert time.time() - t0 < 30  # a finished pipeline re-runs in seconds


def test_empty_rejection_sampling_stops_the_pipeline_cleanly(cli, tmp_path):
    recipe = _write(tmp_path / "e.yaml", {"name": "e", "stages": [
        {"name": "cold", "kind": "sft", "data": {"train": "embedded:demos", "max_samples": 16, "template": "chat"},
         "train": {"max_steps": 1, "batch_size": 8}, "eval": {"limit": 2}},
        {"name": "rs", "recipe": "sample", "model": {"path": "stage:cold"},
         "sample": {"max_prompts": 4, "num_samples": 2, "thresholds": {"accuracy": 2.0}}},
        {"name": "sft2", "kind": "sft", "data": {"train": "stage:rs"}}]})
    out = tmp_path / "out"
    assert cli("run", recipe, "--output-dir", out, "--only", "cold").exit_code == 0
    mtime = (out / "cold" / "model.safetensors").stat().st_mtime
    assert_clean_error(cli("run", recipe, "--output-dir", out), "kept no samples")
    m = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["done", "failed", "pending"]
    assert "kept no samples" in m["stages"][1]["error"]
    assert (out / "cold" / "model.safetensors").stat().st_mtime == mtime
