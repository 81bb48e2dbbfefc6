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
