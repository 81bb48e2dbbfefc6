import json
from pathlib import Path

import pytest
import yaml

from rlkit.config import ConfigError
from rlkit.manifest import stage_hash as _hash
from rlkit.pipeline import Pipeline, Stage, load_pipeline, stage_config, stage_sets

from conftest import assert_clean_error

TINY = {"train": {"max_steps": 2, "batch_size": 8, "save_steps": 2}, "eval": {"limit": 8}}


def _tiny_pipeline(tmp_path, ppo_steps=2, logging_steps=5, report_to=("jsonl", "tensorboard")) -> Pipeline:
    defaults = {**TINY, "train": {**TINY["train"], "logging_steps": logging_steps}, "report_to": list(report_to),
                "data": {"template": "chat"}}
    return Pipeline(name="tiny", output_dir=str(tmp_path / "out"), defaults=defaults,
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

    events.clear()  # reporting keys are not hashed: nothing re-runs
    _tiny_pipeline(tmp_path, logging_steps=1, report_to=["jsonl"]).run(on_stage=lambda n, st: events.append((n, st)))
    assert [st.split(";")[0] for _, st in events] == ["skipped (finished, same config)"] * 3
    assert "not re-run for report_to, train.logging_steps" in events[0][1]

    events.clear()
    _tiny_pipeline(tmp_path, ppo_steps=3).run(on_stage=lambda n, st: events.append((n, st)))
    assert [n for n, st in events if st == "running"] == ["ppo"]  # only the changed stage re-runs
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stages"][2]["metrics"]["steps"] == 3
    old_ppo = Path(manifest["stages"][2]["superseded"][0])  # the finished output was moved aside, not deleted
    assert old_ppo.parent == tmp_path / "out" / ".superseded" and old_ppo.name.startswith("ppo-")
    assert (old_ppo / "model.safetensors").is_file() and (tmp_path / "out" / "ppo" / "model.safetensors").is_file()
    assert ("ppo", f"config changed (train.max_steps); previous output moved to {old_ppo}") in events

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


# ------------------------------------------------------------------ hashing, move-aside, --set (no training)


def _fake_stages(monkeypatch, fail: dict | None = None) -> list[str]:
    """Stages 'train' instantly: each writes model.safetensors (its learning rate) and a checkpoint."""
    import rlkit.pipeline

    ran: list[str] = []

    def fake(cfg):
        stage = cfg.name.split("/")[-1]
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        resumed = (out / "checkpoint-1").is_dir()
        (out / "checkpoint-1").mkdir(exist_ok=True)
        ran.append(f"{stage} (resumed)" if resumed else stage)
        if fail and fail.get(stage):
            raise fail.pop(stage)
        (out / "model.safetensors").write_text(f"lr={cfg.train.learning_rate}")
        return {"steps": 1}

    monkeypatch.setattr(rlkit.pipeline, "_run_stage", fake)
    return ran


def _two_stages(tmp_path) -> Pipeline:
    return Pipeline(name="two", output_dir=str(tmp_path / "out"), defaults={"train": {"max_steps": 1}}, stages=[
        Stage("a", "sft", {"data": {"train": "embedded:demos"}}),
        Stage("b", "sft", {"model": {"path": "stage:a"}, "data": {"train": "embedded:demos"}})])


def test_hash_covers_only_what_changes_a_stage_output(tmp_path):
    p = load_pipeline("instructgpt")

    def h(*sets, out=tmp_path / "o", inputs=None):
        per, common = stage_sets(p, list(sets))
        outputs = {s.name: str(out / s.name) for s in p.stages}
        cfg = stage_config(p, p.stage("ppo"), outputs, out, per, common)
        return _hash(cfg, inputs or {"rm": "r", "sft": "s"}, {v: k for k, v in outputs.items()})

    base = h()
    for cosmetic in ("train.logging_steps=1", "report_to=[jsonl]", "train.save_steps=7", "train.save_total_limit=9",
                     "rl.log_completions=0", "rl.reward_check=false", "eval.batch_size=2", "eval.limit=3",
                     "rl.eval_steps=3", "description=hi"):
        assert h(cosmetic) == base, cosmetic
    assert h(out=tmp_path / "elsewhere") == base  # stage:NAME paths hash by name, not by where OUTPUT is
    for result in ("train.learning_rate=0.1", "train.seed=1", "rl.beta=0.1", "data.max_samples=5",
                   "stages.ppo.rewards=[{name: accuracy}]", "model.dtype=float32"):
        assert h(result) != base, result
    assert h(inputs={"rm": "r", "sft": "changed"}) != base  # an earlier stage's result is an input


def test_result_neutral_keys_name_config_fields():
    from pydantic import BaseModel

    from rlkit.config import KINDS, RESULT_NEUTRAL
    from rlkit.config.loading import schema_keys

    known = set().union(*(schema_keys(m) for m in KINDS.values()))
    for key in RESULT_NEUTRAL:  # a key of some command's config (with any variant of its sections)
        assert key in known, key
    assert all(issubclass(m, BaseModel) for m in KINDS.values())


def test_cosmetic_change_skips_and_a_changed_stage_is_moved_aside(tmp_path, monkeypatch):
    ran = _fake_stages(monkeypatch)
    p, out = _two_stages(tmp_path), tmp_path / "out"
    p.run()
    assert ran == ["a", "b"]

    events = []
    p.run(sets=["train.logging_steps=1", "report_to=[jsonl]", "eval.limit=4"], on_stage=lambda n, s: events.append(s))
    assert ran == ["a", "b"] and len(events) == 2
    assert events[0] == ("skipped (finished, same config); not re-run for eval.limit, report_to, train.logging_steps "
                         "(they do not change its output)")

    events.clear()
    p.run(sets=["stages.a.train.learning_rate=0.01"], on_stage=lambda n, s: events.append((n, s)))
    assert ran == ["a", "b", "a", "b"]  # a changed, so b (which reads a) re-runs too
    m = json.loads((out / "manifest.json").read_text())
    old_a, old_b = (Path(e["superseded"][0]) for e in m["stages"])
    assert old_a.parent == out / ".superseded" and old_a.name.startswith("a-")
    assert (old_a / "model.safetensors").read_text() == "lr=0.0001"  # the old result, intact
    assert (out / "a" / "model.safetensors").read_text() == "lr=0.01"
    assert (old_b / "model.safetensors").is_file()
    assert ("a", f"config changed (train.learning_rate); previous output moved to {old_a}") in events
    assert ("b", f"input changed (a); previous output moved to {old_b}") in events

    p.run(only="b")  # a forced re-run moves the output aside too
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["stages"][1]["superseded"]) == 2 and all(Path(x).is_dir() for x in m["stages"][1]["superseded"])
    assert m["stages"][0]["superseded"] == [str(old_a)]


def test_interrupted_stage_resumes_in_place(tmp_path, monkeypatch):
    ran = _fake_stages(monkeypatch, fail={"b": KeyboardInterrupt()})
    p, out = _two_stages(tmp_path), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        p.run()
    assert json.loads((out / "manifest.json").read_text())["stages"][1]["status"] == "interrupted"
    p.run(sets=["train.logging_steps=2"])  # a cosmetic change does not restart it either
    assert ran == ["a", "b", "b (resumed)"] and not (out / ".superseded").exists()


def test_a_stage_reruns_when_an_input_changed_after_it_read_it(tmp_path, monkeypatch):
    ran = _fake_stages(monkeypatch)
    p = _two_stages(tmp_path)
    p.run()
    p.run(only="a", sets=["stages.a.train.seed=3"])  # a changes; b still holds what it made from the old a
    p.run(sets=["stages.a.train.seed=3"])
    assert ran == ["a", "b", "a", "b"]
    p.run(only="b", sets=["stages.a.train.seed=5"])  # b reads a as it is, not the a the config would make
    p.run(sets=["stages.a.train.seed=3"])
    assert ran == ["a", "b", "a", "b", "b"]
    p.run(sets=["stages.a.train.seed=5"])
    assert ran == ["a", "b", "a", "b", "b", "a", "b"]


def test_manifest_of_an_older_rlkit_does_not_rerun_finished_stages(tmp_path, monkeypatch):
    ran = _fake_stages(monkeypatch)
    p, out = _two_stages(tmp_path), tmp_path / "out"
    p.run()
    m = json.loads((out / "manifest.json").read_text())
    for e in m["stages"]:  # hashed differently, no input_hashes, and a config without the fields added since
        e["hash"] = "0123456789abcdef"
        del e["input_hashes"]
        e["config"].get("rl", {}).pop("reward_check", None)  # (the stages that have one)
        del e["config"]["train"]["save_total_limit"]
    (out / "manifest.json").write_text(json.dumps(m))
    events = []
    p.run(on_stage=lambda n, s: events.append(s))
    assert ran == ["a", "b"] and events == ["skipped (finished, same config)"] * 2

    m = json.loads((out / "manifest.json").read_text())  # hashed by other rules, with the inputs b read
    m["stages"][0]["hash"] = m["stages"][1]["input_hashes"]["a"] = "0123456789abcdef"
    (out / "manifest.json").write_text(json.dumps(m))
    p.run()
    p.run(only="a")
    p.run()  # b read the a that a forced re-run of the same config replaced: nothing to do
    assert ran == ["a", "b", "a"]


def test_set_spellings_for_stages_and_defaults(cli):
    p = load_pipeline("instructgpt")  # stages sft, rm, ppo; sft and rm are config sections too

    def cfg(stage, *sets):
        per, common = stage_sets(p, list(sets))
        return stage_config(p, p.stage(stage), {s.name: s.name for s in p.stages}, Path("o"), per, common)

    assert cfg("sft", "stages.sft.data.train=d.jsonl").data.train == "d.jsonl"
    assert cfg("rm", "stages.sft.data.train=d.jsonl").data.train == "embedded:rankings"
    assert cfg("sft", "defaults.sft.packing=true").sft.packing
    assert cfg("ppo", "defaults.model.dtype=float32").model.dtype == "float32"
    assert cfg("ppo", "ppo.train.max_steps=7").train.max_steps == 7  # ppo: a stage, not a config key
    assert cfg("sft", "ppo.train.max_steps=7").train.max_steps is None
    assert cfg("sft", "train.max_steps=7").train.max_steps == 7  # train: a config key, not a stage
    assert cfg("ppo", "stages.ppo.train.max_steps=7").train.max_steps == 7
    with pytest.raises(ConfigError) as e:
        stage_sets(p, ["sft.packing=true"])
    assert str(e.value) == ("--set sft.packing=true: 'sft' is both a stage of this pipeline and a config section; "
                            "write stages.sft.packing=true for the stage or defaults.sft.packing=true for every stage")
    with pytest.raises(ConfigError, match="unknown stage 'sfft'; did you mean 'sft'"):
        stage_sets(p, ["stages.sfft.train.max_steps=3"])
    with pytest.raises(ConfigError, match="'ppp' is neither a stage of this pipeline nor a config key; "
                       "did you mean 'ppo'"):
        stage_sets(p, ["ppp.train.max_steps=3"])
    assert_clean_error(cli("recipes", "show", "instructgpt", "--set", "rm.data.train=x.jsonl"),
                       "'rm' is both a stage", "stages.rm.data.train=x.jsonl", "defaults.rm.data.train=x.jsonl")
    r = cli("recipes", "show", "instructgpt", "--set", "stages.rm.data.train=x.jsonl")
    assert r.exit_code == 0 and r.output.count("train: x.jsonl") == 1


def test_defaults_apply_to_the_stages_that_read_them():
    p = load_pipeline("instructgpt")
    per, common = stage_sets(p, ["defaults.rm.eval_fraction=0.2", "eval.limit=5"])
    cfgs = {s.name: stage_config(p, s, {x.name: x.name for x in p.stages}, Path("o"), per, common) for s in p.stages}
    assert cfgs["rm"].rm.eval_fraction == 0.2 and "rm" not in cfgs["sft"].model_fields_set
    assert cfgs["sft"].eval.limit == cfgs["ppo"].eval.limit == 5 and "eval" not in cfgs["rm"].model_fields_set
    two = Pipeline("x", [Stage("s", "sft"), Stage("r", "rm")], defaults={"eval": {"limit": 3}})
    assert [stage_config(two, s, {}, Path("o"), {}, {}).eval.limit for s in two.stages] == [3, None]
    with pytest.raises(ConfigError, match=r"^--set: sample.num_samples: no stage of this pipeline uses this key"):
        stage_sets(p, ["sample.num_samples=2"])
    grpo = {"rewards": [{"name": "accuracy"}]}
    with pytest.raises(ConfigError, match=r"\(defaults\): unknown key 'train.lerning_rate'; did you mean"):
        Pipeline("x", [Stage("g", "grpo", grpo)], defaults={"train": {"lerning_rate": 1e-5}})
    with pytest.raises(ConfigError, match="stage 'g': unknown kind 'grpoo'"):
        Pipeline("x", [Stage("g", "grpoo", grpo)])


def test_one_command_table_for_the_cli_the_api_and_pipeline_stages():
    """Every config kind has one command in rlkit.commands; the CLI, rlkit.api and pipeline stages run it."""
    import subprocess
    import sys

    import rlkit.api
    from rlkit.cli import app
    from rlkit.commands import COMMANDS, for_kind
    from rlkit.config import KINDS
    from rlkit.errors import RlkitError

    kinds = set(KINDS) - {"eval"}  # rlkit eval runs a model directory, not a config of its own (a CLI command)
    assert sorted(c.kind for c in COMMANDS.values()) == sorted(kinds)
    assert all(for_kind(c.kind) is c for c in COMMANDS.values())
    with pytest.raises(RlkitError, match="no command runs a config of kind 'grpoo'"):
        for_kind("grpoo")
    registered = {c.name for c in app.registered_commands}
    for c in COMMANDS.values():
        assert c.name in registered and callable(getattr(rlkit.api, c.name)) and callable(c.load_runner())
    # the runners stay lazy: the CLI answers --help without importing torch
    code = ("import sys; from typer.testing import CliRunner; from rlkit.cli import app; "
            "r = CliRunner().invoke(app, ['grpo', '--help']); assert r.exit_code == 0, r.output; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
