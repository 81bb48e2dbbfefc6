import json

import pytest
import yaml

from rlkit.config import ConfigError, build_config
from rlkit.config_files import parse_set
from rlkit.recipe import list_recipes, load_config

from conftest import assert_clean_error


def test_precedence_defaults_recipe_set_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: sft\ntrain:\n  learning_rate: 0.5\n  max_steps: 7\nmodel:\n  path: from-recipe/x\n")
    cfg = load_config(str(recipe), default_recipe="sft")
    assert cfg.train.learning_rate == 0.5 and cfg.train.max_steps == 7
    assert cfg.train.batch_size == 16  # default survives
    cfg = load_config(str(recipe), default_recipe="sft", sets=["train.max_steps=9", "model.path=from-set/x"])
    assert cfg.train.max_steps == 9 and cfg.model.path == "from-set/x"
    cfg = load_config(str(recipe), default_recipe="sft", sets=["train.max_steps=9", "model.path=from-set/x"],
                      flags={"train.max_steps": 11, "model.path": None})
    assert cfg.train.max_steps == 11  # a named flag beats --set
    assert cfg.model.path == "from-set/x"  # an absent flag changes nothing


def test_unknown_key_suggests_closest(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("kind: sft\ntrain:\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'"):
        load_config(str(recipe), default_recipe="sft")


def test_unknown_top_level_key_and_bad_value():
    with pytest.raises(ConfigError, match="unknown key 'modle'; did you mean 'model'"):
        build_config([("x.yaml", {"modle": {}})])
    with pytest.raises(ConfigError, match=r"y.yaml: train.batch_size: Input should be greater than 0"):
        build_config([("y.yaml", {"train": {"batch_size": 0}})])
    with pytest.raises(ConfigError, match=r"data.template"):
        build_config([("z.yaml", {"data": {"template": "fancy"}})])


def test_config_is_frozen():
    from pydantic import ValidationError

    cfg = build_config([])
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.learning_rate = 1.0
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train = cfg.train


def test_parse_set_types():
    assert parse_set(["a.b=3", "a.c=1e-5", "d=true", "e=hello", "f=[1, 2]"]) == {
        "a": {"b": 3, "c": 1e-5}, "d": True, "e": "hello", "f": [1, 2]}
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_set(["novalue"])


def test_every_builtin_recipe_validates():
    from rlkit.pipeline import is_pipeline_file, load_pipeline, stage_config, stage_sets
    from rlkit.recipe import recipe_path

    names = list_recipes()
    assert {"sft", "rm", "r1_zero", "ppo", "instructgpt"} <= set(names)
    for name in names:
        if is_pipeline_file(recipe_path(name)):
            p = load_pipeline(name)
            per, common = stage_sets(p, [])
            for s in p.stages:
                stage_config(p, s, {x.name: x.name for x in p.stages}, recipe_path(name).parent, per, common)
        else:
            load_config(name, default_recipe=name)


def test_recipes_cli(cli, tmp_path):
    r = cli("recipes", "list")
    assert r.exit_code == 0 and "sft" in r.output
    r = cli("recipes", "show", "sft", "--set", "train.max_steps=3")
    assert r.exit_code == 0
    shown = yaml.safe_load(r.output)
    assert shown["train"]["max_steps"] == 3 and shown["train"]["batch_size"] == 32


def test_cli_bad_config_inputs(cli, tmp_path):
    assert_clean_error(cli("sft", "--recipe", "nosuch"), "unknown recipe 'nosuch'", "known recipes")
    assert_clean_error(cli("sft", "--set", "train.learnig_rate=1"), "did you mean 'train.learning_rate'")
    assert_clean_error(cli("sft", "--recipe", tmp_path / "missing.yaml"), "missing.yaml", "not found")
    bad = tmp_path / "broken.yaml"
    bad.write_text("kind: sft\ntrain: [1, 2\n")
    assert_clean_error(cli("sft", "--recipe", bad), "broken.yaml:", "invalid YAML")


def test_version_and_help(cli):
    r = cli("--version")
    assert r.exit_code == 0 and r.output.startswith("rlkit ")
    r = cli()
    assert "sft" in r.output and "eval" in r.output


def test_python_api_takes_a_config_object():
    """A loaded config passes through rlkit.api.load again (only its explicitly set keys count as set)."""
    from rlkit.api import load

    cfg = load_config("r1_zero", default_recipe="r1_zero")
    again = load(cfg, "grpo", max_steps=3, overrides={"rl.beta": 0.0})
    assert again.train.max_steps == 3 and again.rl.kl is None and again.rewards == cfg.rewards


@pytest.mark.parametrize("name", ["sft", "rm", "r1_zero", "ppo", "sample"])
def test_shown_recipe_loads_back(cli, tmp_path, name):
    """`rlkit recipes show NAME`, saved and edited by a user, is a valid recipe that means the same."""
    r = cli("recipes", "show", name)
    assert r.exit_code == 0, r.output
    saved = tmp_path / "mine.yaml"
    saved.write_text(r.output)
    original = load_config(name, default_recipe=name)
    again = load_config(str(saved), default_recipe=name)
    assert again.model_dump() == original.model_dump()
    if name == "r1_zero":
        assert "sft" not in yaml.safe_load(r.output) and "batch_size" not in yaml.safe_load(r.output)["train"]


def test_pipeline_defaults_reach_only_the_keys_a_command_reads():
    from rlkit.config import applicable

    layer = {"rl": {"beta": 0.1, "value_clip": 0.1}, "train": {"batch_size": 4, "learning_rate": 1e-3},
             "sample": {"thresholds": {}}}
    assert applicable(layer, "grpo") == {"rl": {"kl": {"coef": 0.1}}, "train": {"learning_rate": 1e-3}}
    assert applicable(layer, "ppo") == {"rl": {"kl": {"coef": 0.1}, "advantage": {"value_clip": 0.1}},
                                        "train": {"learning_rate": 1e-3}}
    assert applicable(layer, "sample") == {"sample": {"thresholds": {}}}
    with pytest.raises(ConfigError, match=r"^--set: rl.value_clip \(rl.advantage.value_clip\): advantage 'grpo' has "
                       r"no key 'value_clip' \(its keys: std_normalize\)"):
        load_config("r1_zero", default_recipe="r1_zero", sets=["rl.value_clip=0.1"])


def test_a_config_recorded_before_the_rollout_section_still_resumes():
    """rlkit_run.json and pipeline manifests written before `rollout:` existed (rl.engine, rl.hf_cache) read
    back as today's config: no spurious differences, so runs resume and finished stages are not re-run."""
    from rlkit.config import result_differences, upgrade_dump
    from rlkit.recipe import load_config

    cfg = load_config("r1_zero", default_recipe="r1_zero", sets=["rollout.hf_cache=static"])
    new = cfg.model_dump(mode="json")
    old = json.loads(json.dumps(new))
    rollout = old.pop("rollout")
    old["rl"].update(engine=rollout["engine"], hf_cache=rollout["hf_cache"])
    assert result_differences(old, new)  # read naively, the old record differs
    assert upgrade_dump(old) == new and result_differences(upgrade_dump(old), new) == []


def test_the_readme_config_example_is_a_valid_config():
    """The README's `rl:`/`rollout:` example (in Configs and recipes) loads as it reads, for rlkit ppo."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    example = next(b for b in blocks if isinstance(b, dict) and "rl" in b and "rollout" in b)
    cfg = build_config([("README.md", {"kind": "ppo", "rewards": [{"name": "accuracy"}], **example})])
    assert cfg.rl.advantage.name == "gae" and cfg.rl.advantage.needs_values and cfg.rl.kl.where == "reward"
    assert cfg.rl.ptx.coef == 0.05 and cfg.rl.dynamic_sampling.max_rounds == 3 and cfg.rollout.engine == "vllm"


def test_old_spellings_and_the_new_shape_give_the_same_config():
    old = build_config([("old", {"kind": "grpo", "rewards": [{"name": "accuracy"}], "rl": {
        "beta": 0.02, "kl_in": "reward", "kl_estimator": "k1", "advantage": "reinforce_pp", "gamma": 0.9,
        "epsilon_high": 0.28, "ptx_coef": 0.1, "ptx_data": "embedded:demos", "dynamic_sampling": True,
        "max_resample_rounds": 1}, "rollout": {"engine": "vllm", "tis_cap": 3.0}})])
    new = build_config([("new", {"kind": "grpo", "rewards": [{"name": "accuracy"}], "rl": {
        "kl": {"coef": 0.02, "where": "reward", "estimator": "k1"}, "advantage": {"name": "reinforce_pp", "gamma": 0.9},
        "policy_loss": {"epsilon_high": 0.28}, "ptx": {"coef": 0.1, "data": "embedded:demos"},
        "dynamic_sampling": {"max_rounds": 1}, "tis_cap": 3.0}, "rollout": {"engine": "vllm"}})])
    assert old.model_dump() == new.model_dump()
    # a variant switched by a later layer drops the earlier variant's knobs
    cfg = build_config([("recipe", {"kind": "ppo", "rewards": [{"name": "accuracy"}], "rl": {"advantage": "gae", "lam": 0.9}}),
                        ("--set", {"rl": {"advantage": "grpo"}})])
    assert cfg.rl.advantage.name == "grpo"


def test_old_spellings_in_a_recipe_file_and_an_old_record_are_said_once(tmp_path, capsys):
    from rlkit.config import upgrade_dump

    recipe = tmp_path / "old.yaml"
    recipe.write_text("kind: grpo\nrewards: [{name: accuracy}]\nrl: {beta: 0.1, kl_in: reward, epsilon_high: 0.3}\n")
    cfg = load_config(str(recipe), default_recipe="r1_zero")
    assert cfg.rl.kl.where == "reward" and cfg.rl.policy_loss.epsilon_high == 0.3
    err = capsys.readouterr().err
    assert err.count("old.yaml: old spellings read as") == 1 and "rl.kl_in -> rl.kl.where" in err, err
    load_config(str(recipe), default_recipe="r1_zero", sets=["rl.beta=0.2"])  # --set: short spellings, no notice
    assert "old spellings" not in capsys.readouterr().err
    old = {"kind": "grpo", "rl": {"beta": 0.0, "advantage": "grpo"}, "rewards": [{"name": "accuracy"}]}
    upgrade_dump(old, source=str(tmp_path / "rlkit_run.json"))
    assert "rlkit_run.json: recorded by an older rlkit" in capsys.readouterr().err


def test_review_cases_of_the_config_redesign(tmp_path):
    """Layer merges and dumps that went wrong in review: dynamic sampling across layers, a variant switched by a
    later layer, an older rlkit's hf dump, unhashable kinds, the caller's dicts left as given."""
    from rlkit.config import applicable, upgrade_dump
    from rlkit.rollout import rollout_config

    g = {"kind": "grpo", "rewards": [{"name": "accuracy"}]}
    with pytest.raises(ConfigError, match="rl.max_resample_rounds: only used with rl.dynamic_sampling"):
        build_config([("recipe", {**g, "rl": {"dynamic_sampling": False}}), ("--set", {"rl": {"max_resample_rounds": 5}})])
    cfg = build_config([("recipe", {**g, "rl": {"dynamic_sampling": {"max_rounds": 5}}}),
                        ("--set", {"rl": {"max_resample_rounds": 2}})])
    assert cfg.rl.dynamic_sampling.max_rounds == 2
    assert build_config([("r", {**g, "rl": {"dynamic_sampling": {}, "max_resample_rounds": 2}})]).rl.dynamic_sampling
    cfg = build_config([("r", {**g, "rollout": {"engine": "vllm", "kv_cache_gib": 0.5}}), ("--set", {"rollout": {"engine": "hf"}})])
    assert cfg.rollout.engine == "hf"
    assert rollout_config(engine="hf", mode="colocate").engine == "hf"  # an older rlkit's hf dump
    with pytest.raises(ConfigError, match="is not a command"):
        build_config([("x", {"kind": ["grpo"]})])
    assert upgrade_dump({"kind": ["grpo"]}) == {"kind": ["grpo"]}
    layer = {**g, "rl": {"epsilon": 0.1, "policy_loss": {"epsilon": 0.3}}}
    build_config([("x", layer)])
    assert layer["rl"] == {"epsilon": 0.1, "policy_loss": {"epsilon": 0.3}}
    assert applicable({"rl": {"gamma": 0.9}}, "grpo", {"advantage": "reinforce_pp"}) == {"rl": {"advantage": {"gamma": 0.9}}}
    assert applicable({"rl": {"gamma": 0.9}}, "grpo") == {}
    # an old `rlkit recipes show` dump used as a recipe: its unused keys at their printed defaults are fine
    old = {**g, "rl": {"beta": 0.0, "kl_in": "loss", "kl_estimator": "k3", "advantage": "grpo", "gamma": 1.0,
                       "lam": 0.95, "epsilon": 0.2, "ptx_coef": 0.0, "ptx_data": None, "dynamic_sampling": False,
                       "max_resample_rounds": 3}}
    cfg = build_config([("old.yaml", old)])
    assert cfg.rl.kl is None and cfg.rl.ptx is None and cfg.rl.dynamic_sampling is None
