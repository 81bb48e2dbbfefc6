"""The bad-input and fault table: what a hostile first week of users does, each kept fixed.

Real processes, real signals (SIGKILL, SIGTERM), real crafted files: nothing here is simulated that can be
done for real. Each test names the issue item it guards.
"""

import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_clean_error

GRPO_SMALL = ["--set", "rl.prompts_per_step=4", "--set", "rl.num_generations=4", "--set", "eval.limit=8",
              "--set", "rl.eval_steps=1000", "--set", "rl.log_completions=0", "--set", "rl.reward_check=false"]
SFT_SMALL = ["--set", "train.batch_size=8", "--set", "eval.limit=4", "--set", "train.logging_steps=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _rlkit(*args):
    return [os.path.join(os.path.dirname(sys.executable), "rlkit"), *map(str, args)]


def _run(*args, timeout=600):
    return subprocess.run(_rlkit(*args), capture_output=True, text=True, env=ENV, timeout=timeout)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _wait_for(cond, proc, seconds=300, poll=0.01):
    deadline = time.time() + seconds
    while not cond() and time.time() < deadline and proc.poll() is None:
        time.sleep(poll)
    return cond()


# ------------------------------------------------------------------------ 1, 2: crashes while writing


def test_sft_sigkill_while_saving_a_checkpoint_resumes(tmp_path):
    """1. SIGKILL as soon as checkpoint-4 appears (the Trainer writes it in place, trainer_state.json
    last): the same command resumes from the last complete checkpoint and finishes."""
    out = tmp_path / "sft"
    args = ["sft", "--output-dir", out, "--max-steps", 6, "--set", "train.save_steps=2", *SFT_SMALL]
    p = subprocess.Popen(_rlkit(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    assert _wait_for(lambda: (out / "checkpoint-4").is_dir(), p), "no checkpoint-4 before the deadline"
    p.send_signal(signal.SIGKILL)
    p.wait()
    state = out / "checkpoint-4" / "trainer_state.json"
    if state.is_file():  # the kill came after the save finished: tear it as a kill mid-write would
        state.write_text(state.read_text()[:40])
    again = _run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "checkpoint-4 is incomplete" in again.stdout and "resuming from" in again.stdout
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    steps = [r["step"] for r in _metrics(out) if "train/loss" in r]
    assert steps == sorted(steps) and steps[-1] == 6
    AutoModelForCausalLM.from_pretrained(out)


def test_rm_resumes_past_a_torn_checkpoint(tmp_path):
    """1. The same for rlkit rm: a checkpoint cut off mid-save is skipped with a notice."""
    out = tmp_path / "rm"
    args = ["rm", "--output-dir", out, "--max-steps", 2, "--set", "train.save_steps=1", "--set", "data.max_samples=40",
            "--set", "train.batch_size=8"]
    assert _run(*args).returncode == 0
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"global_st')
    again = _run(*args[:4], 3, *args[5:])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "checkpoint-2 is incomplete" in again.stdout and "resuming from" in again.stdout
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """A finished 2-step GRPO run with checkpoint-2, shared by the resume tests (each copies it)."""
    out = tmp_path_factory.mktemp("grpo") / "run"
    r = _run("grpo", "--output-dir", out, "--max-steps", 2, "--set", "train.save_steps=2", *GRPO_SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    (dst / ".rlkit.lock").unlink(missing_ok=True)
    return dst


def test_torn_metrics_line_and_resume(grpo_run, tmp_path):
    """2. A last metrics.jsonl line torn by a kill mid-write: resume drops it and continues."""
    out = _copy(grpo_run, tmp_path / "run")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward/total": 0.5, "lo')
    r = _run("grpo", "--output-dir", out, "--max-steps", 3, "--set", "train.save_steps=2", *GRPO_SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [row["step"] for row in _metrics(out) if "reward/total" in row]
    assert steps == [1, 2, 3]


# --------------------------------------------------------------------------------- 3: crafted files


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_file_is_refused_not_run(grpo_run, tmp_path):
    """3. A pickle that runs code on load, planted as optimizer.pt: resume refuses it in one line and the
    code never runs."""
    out = _copy(grpo_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    with (out / "checkpoint-2" / "rlkit_state" / "optimizer.pt").open("wb") as f:
        pickle.dump({"state": _RunsCode(marker)}, f)
    r = _run("grpo", "--output-dir", out, "--max-steps", 3, "--set", "train.save_steps=2", *GRPO_SMALL)
    assert_clean_error(r, "optimizer.pt", "refusing to load")
    assert not marker.exists()


# ------------------------------------------------------------------------------------- 5: SIGTERM


def test_sigterm_saves_the_step_and_resumes(tmp_path):
    """5. SIGTERM mid-run: the current step finishes and is saved, one line, exit 143; the same command
    continues from that step."""
    out = tmp_path / "run"
    args = ["grpo", "--output-dir", out, "--max-steps", 8, "--set", "train.save_steps=100", *GRPO_SMALL]
    p = subprocess.Popen(_rlkit(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert _wait_for(lambda: (out / "metrics.jsonl").is_file() and any("reward/total" in r for r in _metrics(out)), p,
                     poll=0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-2000:]
    lines = [x for x in err.splitlines() if x.startswith("interrupted:")]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "Traceback" not in err
    saved = sorted(int(d.name.split("-")[1]) for d in out.glob("checkpoint-*") if not d.name.endswith(".tmp"))
    assert saved and saved[-1] == max(r["step"] for r in _metrics(out) if "reward/total" in r) < 8
    again = _run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"(step {saved[-1]})" in again.stdout
    assert [r["step"] for r in _metrics(out) if "reward/total" in r] == list(range(1, 9))


# ------------------------------------------------------------------------- 6: changed config, lock


def test_resume_with_a_changed_config_is_refused_unless_asked(grpo_run, tmp_path, cli):
    """6. A new learning rate on resume: refused with the difference named; --resume-anyway continues
    with it; --overwrite starts over. Logging and eval settings may change freely."""
    out = _copy(grpo_run, tmp_path / "run")
    base = ["grpo", "--output-dir", out, "--set", "train.save_steps=2", *GRPO_SMALL]
    assert_clean_error(cli(*base, "--max-steps", 3, "--set", "train.learning_rate=1e-3"),
                       "train.learning_rate: 0.0002 -> 0.001", "--resume-anyway", "--overwrite")
    assert_clean_error(cli(*base, "--max-steps", 3, "--model", str(grpo_run)), "model.path")
    r = cli(*base, "--max-steps", 3, "--set", "train.learning_rate=1e-3", "--resume-anyway",
            "--set", "train.logging_steps=1", "--set", "eval.limit=4")
    assert r.exit_code == 0 and "resuming from" in r.output, r.output
    assert [row["optim/lr"] for row in _metrics(out) if "reward/total" in row][-1] == pytest.approx(1e-3)
    r = cli(*base, "--max-steps", 2, "--set", "train.learning_rate=1e-3", "--overwrite")
    assert r.exit_code == 0 and "resuming from" not in r.output
    assert not (out / "checkpoint-3").exists()
    assert [row["step"] for row in _metrics(out) if "reward/total" in row] == [1, 2]


def test_an_unreadable_run_record_is_not_a_config_match(grpo_run, tmp_path, cli):
    """Reliability 13: a torn rlkit_run.json made resuming with a changed config pass without a word."""
    out = _copy(grpo_run, tmp_path / "run")
    (out / "rlkit_run.json").write_text('{"config": {"kind": "gr')
    base = ["grpo", "--output-dir", out, "--set", "train.save_steps=2", *GRPO_SMALL, "--max-steps", 3]
    assert_clean_error(cli(*base, "--set", "train.learning_rate=1e-3"), "rlkit_run.json: unreadable", "--resume-anyway")
    r = cli(*base, "--resume-anyway")
    assert r.exit_code == 0 and "resuming from" in r.output and "was unreadable" in r.output, r.output
    assert json.loads((out / "rlkit_run.json").read_text())["config"]["kind"] == "grpo"


def test_two_runs_into_one_directory(tmp_path, cli):
    """6. A second run into a directory another run holds: one line naming the holder."""
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / ".rlkit.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"pid 4242 on host: rlkit grpo\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a live rlkit run holds
    try:
        assert_clean_error(cli("sft", "--output-dir", out, "--max-steps", 1), "another rlkit run", "pid 4242")
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- 10: LoRA adapter


def test_lora_grpo_saves_a_real_adapter(tmp_path, cli):
    """10. The adapter is saved before merging: it holds the trained LoRA tensors, and base + adapter
    computes what the merged model computes."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from rlkit.embedded import model_dir

    out = tmp_path / "lora"
    r = cli("grpo", "--output-dir", out, "--max-steps", 2, *GRPO_SMALL, "--set", "model.lora.r=4",
            "--set", "train.learning_rate=1e-2")
    assert r.exit_code == 0, r.output
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(tensors) > 0 and any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_B" in k)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    base = AutoModelForCausalLM.from_pretrained(model_dir())
    with torch.no_grad():
        untouched = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "adapter")(ids).logits
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(untouched, merged, atol=1e-4)


# ---------------------------------------------------------------- 11: eval on the user's data only


def test_grpo_on_user_data_evaluates_on_its_eval_split_or_nothing(tmp_path, cli):
    """11. No built-in task is scored as a user's before/after."""
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n" for a in range(8)))
    held.write_text("".join(json.dumps({"prompt": f"What is {a} + 2?", "answer": str(a + 2)}) + "\n" for a in range(3)))
    common = ["--dataset", train, "--max-steps", 1, *GRPO_SMALL]
    r = cli("grpo", *common, "--output-dir", tmp_path / "a")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "a" / "rlkit_result.json").read_text())
    assert not any(k.startswith(("before/", "after/")) for k in result), result
    assert "no evaluation" in r.output and "┃ before" not in r.output
    r = cli("grpo", *common, "--output-dir", tmp_path / "b", "--set", f"data.eval={held}")
    assert r.exit_code == 0, r.output
    assert len([row for row in _metrics(tmp_path / "b") if "eval/pass@1" in row]) == 2  # before and after
    assert "before/pass@1" in json.loads((tmp_path / "b" / "rlkit_result.json").read_text())


# ----------------------------------------------------------------------- 12: config combinations

CONFIG_TABLE = [
    (("ppo", "--set", "rl.kl_controller=adaptive"), ("rl.kl.target", "needs a target")),
    (("grpo", "--set", "rl.ptx_coef=0.1"), ("rl.ptx.data", "required")),
    (("grpo", "--set", "rl.policy_loss=reinforce", "--set", "rl.num_iterations=2"), ("reinforce", "one update")),
    (("grpo", "--set", "train.batch_size=4"), ("train.batch_size", "does not use")),
    (("grpo", "--set", "train.grad_accum=4"), ("train.grad_accum", "does not use")),
    (("grpo", "--set", "rl.value_clip=0.1"), ("rl.value_clip", "advantage 'grpo' has no key 'value_clip'")),
    (("sft", "--set", "rl.beta=0.1"), ("rl.beta", "does not use", "rlkit grpo")),
    (("rm", "--set", "eval.limit=5"), ("eval.limit", "does not use")),
    (("grpo", "--set", "rl.kl_target=0.1"), ("rl.kl_target", "adaptive")),
    (("sft", "--max-steps", "0"), ("--max-steps",)),
    (("sft", "--resume-anyway", "--overwrite"), ("choose one",)),
]


@pytest.mark.parametrize("args,needles", CONFIG_TABLE, ids=[" ".join(a) for a, _ in CONFIG_TABLE])
def test_config_combinations_fail_in_one_line(cli, tmp_path, args, needles):
    """12 and 17: every accepted key does something; typer's own errors are one line too."""
    assert_clean_error(cli(*args, "--output-dir", tmp_path / "o"), *needles)


# ----------------------------------------------------------------------------------- 14: divergence


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = _run("grpo", "--output-dir", out, "--max-steps", 6, "--set", "train.save_steps=1",
             "--set", "train.learning_rate=10", *GRPO_SMALL)
    assert_clean_error(r, "training diverged", "step ")
    assert r.returncode == 3
    step = int(r.stderr.split("error: step ")[1].split(":")[0])
    saved = sorted(int(d.name.split("-")[1]) for d in out.glob("checkpoint-*") if not d.name.endswith(".tmp"))
    assert all(s < step for s in saved)  # nothing of the diverged step was saved
    for s in saved:  # what was kept loads and is finite
        m = AutoModelForCausalLM.from_pretrained(out / f"checkpoint-{s}")
        assert all(bool(torch.isfinite(p).all()) for p in m.parameters())


# -------------------------------------------------------------------------------- 15: long inputs


def test_prompts_longer_than_the_context(tmp_path, cli):
    """15. Refused with the row named, or dropped with a count when asked; SFT the same."""
    data = tmp_path / "q.jsonl"
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "word " * 3000 + "?", "answer": "1"},
            {"prompt": "What is 2 + 2?", "answer": "4"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_clean_error(cli("grpo", "--dataset", data, "--output-dir", tmp_path / "a", *GRPO_SMALL),
                       "q.jsonl: row 2 is", "context of 512 tokens", "data.on_overlong=drop")
    r = cli("grpo", "--dataset", data, "--output-dir", tmp_path / "b", "--max-steps", 1, *GRPO_SMALL,
            "--set", "data.on_overlong=drop")
    assert r.exit_code == 0 and "dropped 1 of 3 rows" in " ".join(r.output.split()), r.output
    demos = tmp_path / "d.jsonl"
    demos.write_text("".join(json.dumps({"prompt": p, "completion": "<answer> 1 </answer>"}) + "\n"
                             for p in ("short", "word " * 600)))
    assert_clean_error(cli("sft", "--dataset", demos, "--output-dir", tmp_path / "c", "--set", "train.max_length=128"),
                       "d.jsonl: row 2 is", "train.max_length 128")
    long_only = tmp_path / "l.jsonl"
    long_only.write_text(json.dumps({"prompt": "word " * 600, "completion": "x"}) + "\n")
    assert_clean_error(cli("sft", "--dataset", long_only, "--output-dir", tmp_path / "e",
                           "--set", "data.on_overlong=drop"), "every row is too long")


# ------------------------------------------------------------------------- 16: files that are wrong


def test_bad_files_and_output_directories(tmp_path, cli):
    """16. Non-UTF-8 data, corrupt weights, and output directories that cannot be used: one line each."""
    import shutil

    from rlkit.embedded import model_dir

    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"prompt": "ok", "answer": "1"}\n{"prompt": "caf\u00e9", "answer": "2"}\n'.encode("latin-1"))
    assert_clean_error(cli("grpo", "--dataset", latin, "--output-dir", tmp_path / "a"), "latin1.jsonl:2",
                       "not UTF-8")
    bad = tmp_path / "bad-model"
    shutil.copytree(model_dir(), bad)
    (bad / "model.safetensors").write_bytes((model_dir() / "model.safetensors").read_bytes()[:1000])
    assert_clean_error(cli("eval", bad, "--limit", 2), "bad-model", "corrupt or truncated")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_clean_error(cli("sft", "--output-dir", a_file, "--max-steps", 1), "is a file")
    assert_clean_error(cli("sft", "--output-dir", a_file / "sub", "--max-steps", 1), "its parent", "is a file")
    assert_clean_error(cli("sft", "--output-dir", "/proc/rlkit-out", "--max-steps", 1), "/proc/rlkit-out",
                       "cannot create")


def test_eval_accepts_dataset_like_every_command(cli, tmp_path):
    """17. --dataset works for rlkit eval as for the training commands."""
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n")
    r = cli("eval", "--dataset", data, "--max-new-tokens", 8)
    assert r.exit_code == 0 and "q.jsonl" in r.output, r.output


# --------------------------------------------------------------- 4, 9, 16: rewards a user plugs in


def test_hung_plugin_reward_scores_zero_and_the_run_goes_on(tmp_path, cli, monkeypatch):
    """4. A plug-in reward that never returns on some samples: each call is abandoned after its timeout,
    the run finishes, and the failures are counted and explained."""
    (tmp_path / "my_rewards.py").write_text(
        "import threading\n"
        "def stuck(completions, **_):\n"
        "    if any('7' in c for c in completions):\n"
        "        threading.Event().wait()  # never returns\n"
        "    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    t0 = time.time()
    r = cli("grpo", "--output-dir", out, "--max-steps", 2, *GRPO_SMALL,
            "--set", "rewards=[{name: accuracy}, {name: 'my_rewards:stuck', timeout: 0.5}]")
    assert r.exit_code == 0, r.output
    assert time.time() - t0 < 120
    rows = [row for row in _metrics(out) if "reward/total" in row]
    assert sum(row["reward/my_rewards:stuck/failures"] for row in rows) > 0
    assert "timed out after 0.5 s" in r.output


def test_reward_plugins_that_cannot_be_used(tmp_path, cli, monkeypatch):
    """16 and 9: a reward module with a syntax error; accuracy by dotted path still checks gold answers."""
    (tmp_path / "broken_rewards.py").write_text("def score(completions, **_):\n    return [1.0 for c in completions\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert_clean_error(cli("grpo", "--set", "rewards=[{name: 'broken_rewards:score'}]", "--output-dir", tmp_path / "a"),
                       "broken_rewards.py:2", "syntax error")
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"prompt": "What is 3 + 4?", "answer": "7"}) + "\n"
                    + json.dumps({"prompt": "What is 3 + 4?", "answer": "[7]"}) + "\n")
    assert_clean_error(cli("grpo", "--dataset", gold, "--output-dir", tmp_path / "b",
                           "--set", "rewards=[{name: 'rlkit.rewards.math_answer:accuracy'}]"),
                       "gold.jsonl: row 2", "'[7]'")
