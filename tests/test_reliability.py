"""What a careful first week still found (the reliability issue): silently wrong rewards, harm done by a
typo or a careless plug-in, lost results. Real runs, real files, real math-verify; each test names its item.
(Item 1, the launcher's death: test_scale_out.py; 2 and the vLLM inputs: test_vllm.py; 6: test_families.py;
9: test_weights.py.)"""

import json
import os
import subprocess
import sys

import pytest

from conftest import assert_clean_error
from rlkit.rewards.math_answer import accuracy, gold_error

GRPO_SMALL = ["--set", "rl.prompts_per_step=4", "--set", "rl.num_generations=4", "--set", "eval.limit=4",
              "--set", "rl.eval_steps=1000", "--set", "rl.log_completions=0", "--set", "rl.reward_check=false"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ 3, 4: silently wrong rewards


@pytest.mark.parametrize("answer, gold, score", [
    ("1 000", "1000", 1.0),                 # math-verify alone: 1 * 000 = 0
    ("1 000", "0", 0.0),                    # ... which scored 1 against gold 0
    ("1\u2009000", "1000", 1.0),            # thin space
    ("1\u202f000\u202f000", "1000000", 1.0),  # narrow no-break spaces
    ("1{,}000", "1000", 1.0),               # LaTeX's grouped comma
    (r"12\,345", "12345", 1.0),             # LaTeX thin space
    ("1000", "1 000", 1.0),                 # in the gold answer too
    ("-2 500", "-2500", 1.0),
    ("3 14", "314", 0.0),                   # not a digit group: two numbers
    ("1 0000", "10000", 0.0),               # nor this
])
def test_digit_groups_read_as_one_number(answer, gold, score):
    """3. Digit groups (spaces, thin spaces, {,}, \\,) are one number, in answers and gold alike."""
    assert accuracy([f"<think> x </think> <answer> {answer} </answer>"], answer=[gold]) == [score]


@pytest.mark.parametrize("completion, gold", [
    (r"so $\boxed{10\,000}$", r"10\,000"), (r"so $\boxed{10 000}$", "10000"), ("it is 1 000 000", "1000000")])
def test_digit_groups_outside_answer_tags(completion, gold):
    """3 (review): a \boxed{} answer and mode 'any' read digit groups as the gold does."""
    assert accuracy([completion], answer=[gold], mode="any") == [1.0]


def test_a_gold_answer_that_verifies_against_nothing_is_refused_before_training(cli, tmp_path):
    """4. A clock time parses as 12/0 (complex infinity), which verifies against nothing: every sample of
    the row would be a counted failure. The row check verifies each gold against itself and refuses it,
    naming the row; a completion whose answer makes verify raise is a wrong answer (0), not a failure."""
    assert "12:00" in gold_error("12:00") and gold_error("12") is None
    data = _jsonl(tmp_path / "clock.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4"},
                                             {"prompt": "When is noon?", "answer": "12:00"}])
    out = tmp_path / "run"
    assert_clean_error(cli("grpo", "--dataset", data, "--output-dir", out, *GRPO_SMALL), "clock.jsonl: row 2", "12:00")
    assert not out.exists()
    assert accuracy(["<answer> 1/0 </answer>", "<answer> 12:00 </answer>"], answer=["5", "5"]) == [0.0, 0.0]


# --------------------------------------------------------------------------------------- 5: empty prompts


def test_empty_prompts_are_refused_naming_the_file_and_row(cli, tmp_path):
    """5. rlkit grpo and rlkit sft trained on empty prompts without a word."""
    rl = _jsonl(tmp_path / "rl.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": " \n", "answer": "3"}])
    assert_clean_error(cli("grpo", "--dataset", rl, "--output-dir", tmp_path / "a", *GRPO_SMALL),
                       "rl.jsonl: row 2", "'prompt' is empty")
    chat = _jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": ""}], "answer": "3"}])
    assert_clean_error(cli("grpo", "--dataset", chat, "--output-dir", tmp_path / "b", *GRPO_SMALL),
                       "chat.jsonl: row 1", "empty")
    sft = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q", "completion": "A"}, {"prompt": "", "completion": "A"}])
    assert_clean_error(cli("sft", "--dataset", sft, "--output-dir", tmp_path / "c", "--max-steps", 1),
                       "sft.jsonl: row 2", "'prompt' is empty")
    msgs = _jsonl(tmp_path / "msgs.jsonl", [{"messages": [{"role": "user", "content": "  "},
                                                          {"role": "assistant", "content": "A"}]}])
    assert_clean_error(cli("sft", "--dataset", msgs, "--output-dir", tmp_path / "d", "--max-steps", 1),
                       "msgs.jsonl: row 1", "no prompt")
    for d in "abcd":
        assert not (tmp_path / d).exists()


# ----------------------------------------------------------------------- 7, 8, 11: outputs a typo points at


def test_an_empty_or_dot_output_dir_with_foreign_files_is_refused(tmp_path):
    """7. --output-dir "" (an unset shell variable) trained into the current directory and overwrote its
    README.md with a model card. Real subprocesses in a directory of someone's files."""
    exe = os.path.join(os.path.dirname(sys.executable), "rlkit")
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (["grpo", "--output-dir", ""], ["grpo", "--output-dir", "."], ["sft", "--output-dir", "./"],
                 ["sft", "--output-dir", str(project)], ["run", "instructgpt", "--output-dir", "."]):
        p = subprocess.run([exe, *args, "--max-steps", "1"] if args[0] != "run" else [exe, *args], cwd=project,
                           capture_output=True, text=True, env=env, timeout=300)
        assert_clean_error(p)
        assert ("empty" if args[2] == "" else "rlkit did not write") in p.stderr, p.stderr
    assert sorted(x.name for x in project.iterdir()) == ["README.md"]
    assert (project / "README.md").read_text() == "# my project\n"
    # a model directory of someone else's, not the current directory: its files would be overwritten
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    p = subprocess.run([exe, "sft", "--output-dir", str(theirs), "--max-steps", "1"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert_clean_error(p, "config.json", "rlkit did not write")


def test_stage_names_are_names_not_paths(cli, tmp_path):
    """8. A stage named ../escaped wrote outside the pipeline's output directory."""
    from rlkit.config import ConfigError
    from rlkit.pipeline import Pipeline, Stage

    for bad in ("../escaped", "a/b", "..", ".hidden", "/abs", ""):
        with pytest.raises(ConfigError, match="not a path"):
            Pipeline(name="p", stages=[Stage(bad, "sft")], output_dir=str(tmp_path / "out"))
    recipe = tmp_path / "p.yaml"
    recipe.write_text("stages:\n  - name: ../escaped\n    kind: sft\n")
    assert_clean_error(cli("run", recipe, "--output-dir", tmp_path / "out"), "../escaped", "not a path")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


def test_output_paths_are_checked_before_the_work(cli, tmp_path):
    """11. rlkit eval --output DIR evaluated first and then lost the results in a traceback."""
    r = cli("eval", "--output", tmp_path, "--limit", 2)
    assert_clean_error(r, "--output", "is a directory")
    assert "pass@1" not in r.output  # refused before evaluating
    (tmp_path / "file").write_text("x")
    assert_clean_error(cli("eval", "--output", tmp_path / "file" / "r.json", "--limit", 2), "is a file")
    assert_clean_error(cli("bench", "--output", tmp_path, "--engines", "hf", "--step-engines", "hf"), "is a directory")


# ---------------------------------------------------------------------------- 10: a careless plug-in reward


def test_a_reward_that_exits_or_edits_its_arguments_harms_nothing(cli, tmp_path, monkeypatch):
    """10. A reward that calls sys.exit() ended the run with exit code 0, no output and nothing saved; one that
    appended to its prompts changed the data set for later steps. Now: counted failures, and copies."""
    (tmp_path / "careless.py").write_text(
        "import sys\n"
        "SEEN = []\n"
        "def quits(completions, **_):\n"
        "    sys.exit(0)\n"
        "def interrupts(completions, **_):\n"
        "    raise KeyboardInterrupt\n"
        "def edits(completions, prompts, prompt, answer, **_):\n"
        "    SEEN.append(prompt[0][-1]['content'])\n"
        "    for p in prompt:\n"
        "        p.append({'role': 'user', 'content': 'PROBE ' * 50})\n"
        "        p[0]['content'] += ' PROBE'\n"
        "    answer.append('x')\n"
        "    completions.append('x')\n"
        "    return [1.0] * (len(completions) - 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": f"What is {a} + 2?"}],
                                             "answer": str(a + 2)} for a in range(8)])
    out = tmp_path / "run"
    r = cli("grpo", "--dataset", data, "--output-dir", out, "--max-steps", 3, *GRPO_SMALL,
            "--set", "data.template=chat",
            "--set", "rewards=[{name: accuracy}, {name: 'careless:quits'}, {name: 'careless:interrupts'}, "
                     "{name: 'careless:edits'}]")
    assert r.exit_code == 0, r.output
    rows = [row for row in _metrics(out) if "reward/total" in row]
    assert len(rows) == 3 and (out / "model.safetensors").is_file()
    assert all(row["reward/careless:quits/failures"] == 16 for row in rows)
    assert all(row["reward/careless:interrupts/failures"] == 16 for row in rows)
    assert "called sys.exit(0)" in r.output
    import careless

    assert careless.SEEN and not any("PROBE" in s for s in careless.SEEN)  # every step saw the data as it is


def test_reward_copies_keep_the_rows_as_they_were():
    """10. The rows (and their message lists) that a reward scores are the data set's own: left unchanged."""
    from rlkit.config import RewardSpec
    from rlkit.rollout.base import Sample
    from rlkit.scoring import RewardSet, score_groups

    def greedy_edit(completions, prompt, **_):
        for p in prompt:
            p.append({"role": "user", "content": "injected"})
        return [0.0] * len(completions)

    import rlkit.rewards as registry

    registry.REWARDS["_test_greedy_edit"] = greedy_edit
    try:
        rows = [{"prompt": [{"role": "user", "content": "q"}], "answer": "1", "meta": {"k": [1]}}]
        before = json.dumps(rows)
        rs = RewardSet([RewardSpec(name="_test_greedy_edit")])
        for _ in range(2):
            score_groups(rs, rows, ["q"], [[Sample("a", [1], None, "stop")] * 2])
        assert json.dumps(rows) == before
    finally:
        registry.REWARDS.pop("_test_greedy_edit")


# ------------------------------------------------------------------------------------ 12: a torn manifest


def test_a_torn_manifest_is_recovered_from_the_stage_outputs(tmp_path):
    """12. A manifest.json cut off mid-write made rlkit run fail with a traceback. Now it is kept aside and
    each stage's state is re-read from its output: the finished stage is skipped, not re-run."""
    from rlkit.pipeline import Pipeline, Stage

    def pipeline():
        return Pipeline(name="p", output_dir=str(tmp_path / "out"),
                        defaults={"train": {"max_steps": 1, "batch_size": 4}, "eval": {"limit": 2}},
                        stages=[Stage("sft", "sft", {"data": {"train": "embedded:mixed_demos", "max_samples": 8}}),
                                Stage("sft2", "sft", {"model": {"path": "stage:sft"},
                                                      "data": {"train": "embedded:mixed_demos", "max_samples": 8}})])

    pipeline().run()
    manifest = tmp_path / "out" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])  # a crash mid-write on a filesystem without atomic renames
    mtime = (tmp_path / "out" / "sft" / "model.safetensors").stat().st_mtime
    events = []
    m = pipeline().run(on_stage=lambda n, st: events.append((n, st)))
    assert [st.split(" ")[0] for _, st in events] == ["skipped", "skipped"], events
    assert [s["status"] for s in m["stages"]] == ["done", "done"]
    assert (tmp_path / "out" / "manifest.json.torn").read_text() == text[: len(text) // 2]
    assert json.loads(manifest.read_text())["stages"][0]["status"] == "done"
    assert (tmp_path / "out" / "sft" / "model.safetensors").stat().st_mtime == mtime


# -------------------------------------------------------------------------- 13: typed values, one line each


def test_recipes_with_anchors_and_merge_keys_still_load(tmp_path):
    """13 (review): the duplicate-key check keeps YAML's merge keys, and does not call 1 and true the same key
    (YAML does not; Python's dict then keeps one of them, as safe_load would)."""
    from rlkit.config_files import load_yaml

    p = tmp_path / "r.yaml"
    p.write_text("common: &c {learning_rate: 1.0e-5, max_steps: 3}\ntrain:\n  <<: *c\n  max_steps: 5\n"
                 "rl: {1: a, true: b}\n")
    data = load_yaml(p)
    assert data["train"] == {"learning_rate": 1.0e-5, "max_steps": 5} and list(data["rl"].values()) == ["b"]


def test_typed_values_reach_one_line_before_any_work(cli, tmp_path):
    """13. Values a user types that reached a traceback (or numpy) after work had started."""
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("kind: grpo\nname: caf\u00e9\n".encode("latin-1"))
    assert_clean_error(cli("grpo", "--recipe", latin), "latin.yaml:2", "not UTF-8")
    assert_clean_error(cli("grpo", "--set", "train.seed=-1", "--output-dir", tmp_path / "a"), "train.seed")
    assert_clean_error(cli("sft", "--set", "train.lr_scheduler=cosine_with_min_lr", "--output-dir", tmp_path / "b"),
                       "train.lr_scheduler")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _tokenizer_variant(tmp_path, name, template):
    """The embedded model with another chat template (None: none at all)."""
    import shutil

    from rlkit.embedded import model_dir

    d = tmp_path / name
    shutil.copytree(model_dir(), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    if template is not None:
        (d / "chat_template.jinja").write_text(template)
    return d


def test_chat_templates_that_cannot_render_the_prompt_are_one_line(cli, tmp_path):
    """13. data.template chat on a model with no chat template; a template that refuses a system turn (as
    Gemma's does) with data.system_prompt: one line before any work, for training and evaluation."""
    none = _tokenizer_variant(tmp_path, "nochat", None)
    no_system = _tokenizer_variant(tmp_path, "nosys", (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    assert_clean_error(cli("grpo", "--model", none, "--set", "data.template=chat", "--output-dir", tmp_path / "a",
                           *GRPO_SMALL), "no chat template")
    r = cli("eval", none, "--template", "chat", "--limit", 2)
    assert_clean_error(r, "no chat template")
    assert "evaluating" not in r.output
    assert_clean_error(cli("grpo", "--model", no_system, "--set", "data.template=chat", "--set", "data.system_prompt=Be brief.",
                           "--output-dir", tmp_path / "b", *GRPO_SMALL), "System role not supported",
                       "data.system_prompt")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_reward_params_are_checked_before_training(cli, tmp_path, monkeypatch):
    """13. Reward params: a typo was swallowed by the reward's **_ (or failed every sample with a TypeError
    in a plug-in), a bad value failed every sample; now one line each before training."""
    (tmp_path / "strict_rewards.py").write_text("def exact(completions, answer, scale=1.0):\n"
                                                "    return [scale * (c == a) for c, a in zip(completions, answer)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for rewards, needles in [
        ("[{name: accuracy, params: {mdoe: any}}]", ("unknown parameter 'mdoe'", "did you mean 'mode'")),
        ("[{name: accuracy, params: {mode: bogus}}]", ("params.mode 'bogus'",)),
        ("[{name: language, params: {language: fr}}]", ("params.language 'fr'",)),
        ("[{name: soft_overlong, params: {max_len: 10, cache: 20}}]", ("params.cache",)),
        ("[{name: accuracy, params: {answer: '4'}}]", ("params.answer is a data column",)),
        ("[{name: 'strict_rewards:exact', params: {sclae: 2}}]", ("unknown parameter 'sclae'", "'scale'")),
    ]:
        assert_clean_error(cli("grpo", "--set", f"rewards={rewards}", "--output-dir", tmp_path / "a", *GRPO_SMALL),
                           *needles)
    assert not (tmp_path / "a").exists()


def _sweep_files(d):
    """The files of the bad-input sweep: data sets, recipes and pipelines a careless user writes."""
    rows = {"dictans.jsonl": [{"prompt": "What is 2 + 3?", "answer": {"v": 5}}],
            "rm_int.jsonl": [{"prompt": "q", "chosen": 5, "rejected": "b"}],
            "rm_conv.jsonl": [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}],
            "sft_conv.jsonl": [{"prompt": [{"role": "user", "content": "What is 1 + 1?"}],
                                "completion": [{"role": "assistant", "content": "2"}]}] * 8,
            "sft_badlist.jsonl": [{"prompt": "q", "completion": ["5"]}],
            "long.jsonl": [{"prompt": "What is " + "1 + " * 600 + "1?", "answer": "601"}],
            "clock.jsonl": [{"prompt": "When is noon?", "answer": "12:00"}]}
    for name, rs in rows.items():
        _jsonl(d / name, rs)
    texts = {"dup.yaml": "kind: grpo\ntrain:\n  max_steps: 3\ntrain:\n  learning_rate: 1.0e-5\n",
             "p_stages.yaml": "stages: 5\n",
             "p_defaults.yaml": "defaults: [1]\nstages:\n  - {name: s, kind: sft}\n",
             "p_ref.yaml": "defaults:\n  model: {path: 'stage:nosuch'}\nstages:\n  - {name: s, kind: sft}\n",
             "p_recipe.yaml": "stages:\n  - {name: s, recipe: instructgpt}\n",
             "p_outdir.yaml": "output_dir: [a]\nstages:\n  - {name: s, kind: sft}\n",
             "p_missing.yaml": "stages:\n  - {name: a, kind: sft, train: {max_steps: 1}}\n"
                               "  - {name: b, kind: sft, data: {train: missing.jsonl}}\n"}
    for name, text in texts.items():
        (d / name).write_text(text)
    (d / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")


SWEEP = [  # (args, words the one error line must hold): what the bad-input sweep found, each now one line
    (["grpo", "--set", "train.learning_rate=.inf"], ["train.learning_rate", "finite"]),
    (["grpo", "--set", "rewards=[{name: accuracy, weight: .nan}]"], ["rewards.0.weight", "finite"]),
    (["grpo", "--set", "train.epochs=.inf"], ["train.epochs", "finite"]),
    (["grpo", "--set", "rl.beta=.inf"], ["rl.beta", "finite"]),
    (["grpo", "--recipe", "{d}/dup.yaml"], ["dup.yaml:4", "'train' is given twice"]),
    (["grpo", "--set", "data.mix=[{data: x.jsonl}]"], ["--set", "data.mix.0.route"]),
    (["grpo", "--set", "rewards=[{name: reward_model}]"], ["needs params.path"]),
    (["grpo", "--set", "rewards=[{name: 'exits_on_import:f'}]"], ["failed to import", "SystemExit: 3"]),
    (["grpo", "--set", "rewards=[{name: 'builtins:len'}]"], ["failed on every probe"]),
    (["rewards", "check", "--set", "rewards=[{name: 'builtins:len'}]"], ["failed on every probe"]),
    (["grpo", "--set", "rewards=[{name: accuracy, routes: [mathh]}]", "--set", "data.route=math"],
     ["no row has route 'mathh'", "math"]),
    (["grpo", "--dataset", "{d}/dictans.jsonl"], ["dictans.jsonl: row 1", "'answer' is dict"]),
    (["eval", "--data", "{d}/dictans.jsonl"], ["dictans.jsonl: row 1", "'answer' is dict"]),
    (["eval", "--data", "{d}/clock.jsonl"], ["clock.jsonl: row 1", "12:00"]),
    (["eval", "--data", "{d}/long.jsonl"], ["long.jsonl: row 1", "context"]),
    (["eval", "--set", "train.batch_size=3"], ["rlkit eval does not use this key"]),
    (["rm", "--dataset", "{d}/rm_int.jsonl"], ["rm_int.jsonl: row 1", "'chosen' must be text"]),
    (["rm", "--dataset", "{d}/rm_conv.jsonl"], ["rm_conv.jsonl: row 1", "is a list"]),
    (["sft", "--dataset", "{d}/sft_badlist.jsonl"], ["sft_badlist.jsonl: row 1", "'completion' must be"]),
    (["sft", "--set", "data.eval={d}/missing.jsonl"], ["missing.jsonl", "not found"]),
    (["sample", "--set", "sample.mix_data={d}/missing.jsonl"], ["missing.jsonl", "not found"]),
    (["run", "{d}/p_stages.yaml"], ["stages: expected a list"]),
    (["run", "{d}/p_defaults.yaml"], ["defaults: expected a mapping"]),
    (["run", "{d}/p_ref.yaml"], ["stage:nosuch", "not a stage of this pipeline"]),
    (["run", "{d}/p_recipe.yaml"], ["recipe 'instructgpt' is a pipeline"]),
    (["run", "{d}/p_outdir.yaml"], ["output_dir: expected a non-empty string"]),
    (["run", "{d}/p_missing.yaml"], ["stage 'b'", "missing.jsonl does not exist"]),
    (["run", "{d}/p_missing.yaml", "--set", "stages.a.model.path=stage:b"], ["'b' runs after it"]),
    (["grpo", "--set", "model.lora.target_modules=[nosuch]"], ["target_modules", "'nosuch'", "q_proj"]),
    (["sft", "--set", "model.lora.target_modules='[['"], ["target_modules", "not a valid regex"]),
    (["sft", "--set", "model.lora.target_modules='.*nosuch'"], ["target_modules", "matches no module"]),
    (["grpo", "--dataset", "embedded:arithmetic:test:extra"], ["expected embedded:TASK or embedded:TASK:SPLIT"]),
    (["bench", "--batch-sizes", "0"], ["--batch-sizes", "positive"]),
    (["bench", "--engines", "", "--step-engines", "", "--no-trl"], ["nothing to measure"]),
]


def test_the_bad_input_sweep(cli, tmp_path, monkeypatch):
    """13. A sweep over every value a user types (recipe files, --set, pipeline defaults/stages, reward params,
    data files, command options) found each of these reaching a traceback, a run that learned nothing, an error
    after the work, or a silent wrong result. Each is one line now, before any output directory is made."""
    _sweep_files(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for args, needles in SWEEP:
        out = tmp_path / "out"
        args = [a.replace("{d}", str(tmp_path)) for a in args]
        if args[0] in ("grpo", "sft", "rm", "sample", "run"):
            args += ["--output-dir", str(out)]
        r = cli(*args)
        assert r.exit_code != 0 and "Traceback" not in r.output, (args, r.output[-2000:])
        errors = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and all(n in errors[0] for n in needles), (args, r.output[-2000:])
        assert not out.exists(), args
