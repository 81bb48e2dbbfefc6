"""Scale-out on CPU (gloo): FSDP2 through the shipped accelerate config, and two "machines" on loopback.

Real launches (`accelerate launch`), real SIGKILL. The multi-process gradient itself is checked in
test_update.py (`test_two_processes_give_the_one_process_gradient`)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM

from rlkit.launch import config_path

pytestmark = pytest.mark.slow

SMALL = ["--set", "rl.prompts_per_step=4", "--set", "rl.num_generations=4", "--set", "eval.limit=16",
         "--set", "rl.log_completions=0", "--set", "rl.reward_check=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(*launch_args, rlkit_args, procs=2):
    return [sys.executable, "-m", "accelerate.commands.launch", *map(str, launch_args), "--num_processes", str(procs),
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlkit", *map(str, rlkit_args)]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _steps(out):
    return {r["step"]: r for r in _metrics(out) if "reward/total" in r}


def _run(cmd, timeout=600):
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _kill_tree(p) -> None:
    """SIGKILL the launcher and every process under it (torchrun's workers run in a session of their own)."""
    import psutil

    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for q in procs:
        q.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=60)
    p.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_grpo_learns_resumes_after_sigkill_and_exports(tmp_path):
    """2 processes under the shipped fsdp2 config: the checkpoint holds each process's optimizer shard; a
    SIGKILL of the whole launch after checkpoint-4 loses nothing: the same command resumes at step 4 and
    the steps run on 1..8; the held-out pass@1 rises; the Hugging Face export loads. At the same seed the
    metrics equal those of the plain data-parallel run (same gradients, same sampling)."""
    out, ddp = tmp_path / "fsdp2", tmp_path / "ddp"
    args = ["grpo", "--output-dir", out, "--max-steps", 8, "--set", "train.save_steps=2", "--set", "rl.eval_steps=4",
            *SMALL]
    cmd = _launch("--config_file", config_path("fsdp2"), rlkit_args=args)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                         start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-4").is_dir() and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert (out / "checkpoint-4").is_dir(), p.communicate()[0][-3000:] if p.poll() is not None else "no checkpoint"
    _kill_tree(p)
    state = out / "checkpoint-4" / "rlkit_state"
    assert sorted(f.name for f in state.glob("optimizer*.pt")) == ["optimizer.rank0.pt", "optimizer.rank1.pt"]
    saved = max(int(d.name.split("-")[1]) for d in out.glob("checkpoint-*") if not d.name.endswith(".tmp"))
    assert saved < 8 and max(_steps(out)) < 8

    again = _run(cmd)
    assert "resuming from" in again.stdout and f"(step {saved})" in again.stdout
    steps = _steps(out)
    assert sorted(steps) == list(range(1, 9))
    result = json.loads((out / "rlkit_result.json").read_text())
    assert result["processes"] == 2 and result["steps"] == 8
    assert result["after/pass@1"] > result["before/pass@1"]
    AutoModelForCausalLM.from_pretrained(out)

    # uninterrupted and not sharded: every step the same (exact resume of the shards, the RNG, the data)
    _run(_launch("--config_file", config_path("ddp"), rlkit_args=args[:2] + [ddp] + args[3:]))
    for s in range(1, 9):
        for k in ("reward/total", "policy/loss", "optim/grad_norm", "kl/mean", "policy/entropy",
                  "rollout/completion_len", "policy/ratio_max"):
            assert steps[s][k] == pytest.approx(_steps(ddp)[s][k], rel=1e-4, abs=1e-6), (s, k)


def test_two_machines_on_loopback_equal_one_machine(tmp_path):
    """`--num_machines 2` with ranks 0 and 1 on 127.0.0.1, one process each: both finish, and the metrics
    equal the 2-process single-machine run at the same seed (rel 1e-4: the same reductions over gloo)."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--max-steps", 3, "--set", "rl.eval_steps=1000", *SMALL]
    _run(_launch("--config_file", config_path("ddp"), rlkit_args=["grpo", "--output-dir", one, *args]))
    port = _free_port()
    machines = [subprocess.Popen(_launch("--config_file", config_path("ddp"), "--num_machines", 2, "--machine_rank", r,
                                         "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                                         rlkit_args=["grpo", "--output-dir", two, *args]),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
                for r in (0, 1)]
    logs = [m.communicate(timeout=600)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    result = json.loads((two / "rlkit_result.json").read_text())
    assert result["processes"] == 2 and result["steps"] == 3
    a, b = _steps(one), _steps(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        for k in ("reward/total", "policy/loss", "optim/grad_norm", "rollout/completion_len"):
            assert b[s][k] == pytest.approx(a[s][k], rel=1e-4, abs=1e-6), (s, k)


def test_fsdp2_ppo_with_critic_and_ptx_equals_ddp(tmp_path):
    """PPO under fsdp2: policy, frozen reference, critic (its own optimizer shards) and the ptx loss; the
    same metrics as the data-parallel run at the same seed; the critic's export loads as a classifier."""
    from transformers import AutoModelForSequenceClassification

    rm = tmp_path / "rm"
    _run([sys.executable, "-m", "rlkit", "rm", "--output-dir", str(rm), "--max-steps", "4"])
    runs = {}
    for name in ("fsdp2", "ddp"):
        runs[name] = tmp_path / name
        _run(_launch("--config_file", config_path(name), rlkit_args=[
            "ppo", "--output-dir", runs[name], "--max-steps", 3, "--set", f"rl.value_model={rm}",
            "--set", f"rewards=[{{name: reward_model, params: {{path: '{rm}'}}}}]", "--set", "rl.prompts_per_step=4",
            "--set", "eval.limit=8", "--set", "rl.eval_steps=1000", "--set", "rl.log_completions=0",
            "--set", "rl.ptx_coef=0.01", "--set", "rl.ptx_data=embedded:mixed_demos", "--set", "train.save_steps=3"]))
    state = runs["fsdp2"] / "checkpoint-3" / "rlkit_state"
    assert {f.name for f in state.glob("*optimizer*")} == {
        "optimizer.rank0.pt", "optimizer.rank1.pt", "critic_optimizer.rank0.pt", "critic_optimizer.rank1.pt"}
    a, b = _steps(runs["fsdp2"]), _steps(runs["ddp"])
    for s in (1, 2, 3):
        for k in ("reward/total", "policy/loss", "critic/loss", "policy/ptx_loss", "optim/grad_norm", "kl/mean",
                  "critic/grad_norm"):
            assert a[s][k] == pytest.approx(b[s][k], rel=1e-4, abs=1e-6), (s, k)
    AutoModelForSequenceClassification.from_pretrained(runs["fsdp2"] / "critic")


def test_fsdp2_with_the_vllm_engine(tmp_path):
    """Each process's colocated vLLM engine gets the gathered weights after every update: its log-probs
    match the sharded trainer's at every step (a missed sync shows as a log-prob gap from step 2 on)."""
    out = tmp_path / "vllm"
    _run(_launch("--config_file", config_path("fsdp2"), rlkit_args=[
        "grpo", "--output-dir", out, "--max-steps", 3, "--set", "rollout.engine=vllm", "--set", "rl.eval_steps=1000",
        *SMALL]))
    steps = _steps(out)
    assert sorted(steps) == [1, 2, 3]
    assert all(steps[s]["rollout/logprob_diff"] < 1e-3 for s in steps), [steps[s]["rollout/logprob_diff"] for s in steps]


def test_sharding_configs_the_rl_loop_does_not_take_are_one_line(cli, monkeypatch, tmp_path):
    from conftest import assert_clean_error

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert_clean_error(cli("grpo", "--output-dir", tmp_path / "a"), "does not run on DeepSpeed", "config-path fsdp2")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert_clean_error(cli("grpo", "--output-dir", tmp_path / "b"), "fsdp_version 1", "set fsdp_version: 2")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert_clean_error(cli("grpo", "--output-dir", tmp_path / "c", "--set", "model.lora={r: 8}"), "model.lora",
                       "not supported")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")  # other ranks would start from zeros
    assert_clean_error(cli("grpo", "--output-dir", tmp_path / "d"), "fsdp_cpu_ram_efficient_loading")
    assert_clean_error(cli("config-path", "fsdp"), "unknown accelerate config 'fsdp'", "did you mean fsdp2")


def _gone(procs) -> bool:
    """Every process has exited (a zombie left for a re-parented child's reaper counts as gone)."""
    import psutil

    for q in procs:
        try:
            if q.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def test_workers_stop_when_the_launcher_is_killed_and_the_run_resumes(tmp_path):
    """Reliability 1: SIGKILL of the launcher's process group only (a scheduler, the OOM killer) leaves
    torchrun's workers running in their own sessions. They notice within a second, stop as on SIGTERM
    (finish the step, save it), and are gone within 30 s; the same command then resumes from their
    checkpoint instead of being refused by the lock."""
    import psutil

    out = tmp_path / "run"
    common = ["grpo", "--output-dir", out, "--set", "train.save_steps=2", "--set", "rl.eval_steps=1000", *SMALL]
    # 300 steps: more than the workers could finish in the 30 s they are given on their own
    cmd = _launch("--config_file", config_path("fsdp2"), "--main_process_port", _free_port(),
                  rlkit_args=[*common, "--max-steps", 300])
    log = open(tmp_path / "launch.log", "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-2").is_dir() and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert (out / "checkpoint-2").is_dir(), (tmp_path / "launch.log").read_text()[-3000:]
    workers = [q for q in psutil.Process(p.pid).children(recursive=True) if "rlkit" in " ".join(q.cmdline())]
    assert len(workers) == 2 and all(q.pid != os.getpgid(q.pid) or os.getsid(q.pid) != os.getsid(p.pid)
                                     for q in workers), "expected torchrun's two workers in sessions of their own"
    os.killpg(p.pid, signal.SIGKILL)  # the launcher's group: not the workers
    p.wait(timeout=30)
    t0 = time.time()
    while not _gone(workers) and time.time() - t0 < 30:
        time.sleep(0.2)
    left = [q.pid for q in workers if not _gone([q])]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} still running 30 s after their launcher was killed"
    assert "stopping as on SIGTERM" in (tmp_path / "launch.log").read_text()
    saved = max(int(d.name.split("-")[1]) for d in out.glob("checkpoint-*") if not d.name.endswith(".tmp"))
    assert 2 <= saved < 300 and not (out / "rlkit_result.json").exists()

    # the same command (to two steps past the checkpoint, to keep the test short) resumes: not refused by the lock
    again = _run(_launch("--config_file", config_path("fsdp2"), "--main_process_port", _free_port(),
                         rlkit_args=[*common, "--max-steps", saved + 2]))
    assert "resuming from" in again.stdout and f"(step {saved})" in again.stdout, again.stdout[-2000:]
    assert sorted(_steps(out)) == list(range(1, saved + 3))
