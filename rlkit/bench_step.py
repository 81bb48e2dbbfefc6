"""``rlkit bench``'s GRPO steps: rlkit's (per engine and staleness) and TRL's, each in a fresh process, with the
roofline (``rlkit.roofline``): the update's and the reference pass's achieved FLOP/s against the matmul peak
measured in the same run, and peak memory.

Each step row runs in a process spawned with the environment the bench started with: vLLM's CPU platform adds
its bundled tcmalloc and PyTorch's libgomp to ``LD_PRELOAD`` for the processes it starts, so without it a step
spawned after the rollout rows' vLLM engines would run on another allocator than the one a user's run gets.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from rlkit.bench import BENCH_ROLLOUTS, bench_prompts, sync_device


def bench_rlkit_step(model_path: str, prompts: int, generations: int, gen_len: int, steps: int, engine: str,
                     workdir: Path, staleness: int = 0, shape: dict | None = None, peaks: dict | None = None) -> dict:
    from rlkit import precision, roofline
    from rlkit.config import build_config
    from rlkit.tracking import read_metrics
    from rlkit.trainers.rl import run_rl

    out = workdir / f"rlkit_grpo_{engine}_s{staleness}"
    rollout, label = BENCH_ROLLOUTS[engine]
    if staleness:
        rollout, label = {**rollout, "max_staleness": staleness}, f"{label}, max_staleness {staleness}"
    # micro_batch_size 8: four micro-batches of activations at a time, under TRL's peak memory (TRL checkpoints
    # gradients by default; rlkit at 32 a micro-batch: 10.9 GiB and 0.3 s faster, at 8: 5.5 GiB)
    cfg = build_config([("bench", {
        "kind": "grpo", "name": "bench", "output_dir": str(out), "report_to": ["jsonl"],
        "model": {"path": model_path}, "data": {"train": "embedded:arithmetic", "template": "r1_zero"},
        "train": {"max_steps": steps, "save_steps": 10_000, "learning_rate": 1e-6},
        "rl": {"prompts_per_step": prompts, "num_generations": generations, "max_new_tokens": gen_len,
               "kl": {"coef": 0.04}, "log_completions": 0, "eval_steps": 10_000, "micro_batch_size": 8,
               "reward_check": False},
        "rollout": rollout, "eval": {"task": None}, "rewards": [{"name": "think_format"}]})])
    with roofline.PeakMemory() as mem:
        run_rl(cfg)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "time/step" in r]
    timed = rows[1:] or rows  # the first step warms up

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in timed) / len(timed)

    step_s = mean("time/step")
    tokens = mean("rollout/completion_len") * prompts * generations
    phases = {k.removeprefix("time/"): round(mean(k), 3) for k in timed[0] if k.startswith("time/") and k != "time/step"}
    seen = [r["rollout/staleness"] for r in timed if "rollout/staleness" in r]
    prec = precision.for_model(cfg.train.precision, model_path)
    row = {"trainer": f"rlkit ({label})", "engine": engine, "staleness": staleness, "precision": prec,
           "staleness_seen": round(sum(seen) / len(seen), 3) if seen else 0.0, "step_seconds": round(step_s, 3),
           "completion_tokens_per_s": round(tokens / step_s, 1), "phases": phases, "peak_gib": mem.gib}
    if shape and peaks:
        row["roofline"] = step_roofline(shape, peaks[prec], mean("batch/tokens") * prompts * generations,
                                        mean("batch/row_len"), prompts * generations, phases)
    return row


def step_roofline(shape: dict, peak: float, tokens: float, row_len: float, rows: int, phases: dict) -> dict:
    """The update's and the reference pass's achieved GFLOP/s (parameters x real tokens) and their share of
    the matmul ``peak`` measured in the precision they ran in; attention's FLOPs apart."""
    from rlkit import roofline

    out = {"tokens": round(tokens), "row_len": round(row_len, 1), "padding_frac": round(1 - tokens / (row_len * rows), 3),
           "matmul_peak_gflops": round(peak, 1)}
    for phase, flops, passes in (("update", roofline.update_flops(shape["trainable"], tokens), 3),
                                 ("reference", roofline.forward_flops(shape["params"], tokens), 1)):
        seconds = phases.get(phase, 0.0)
        if seconds > 0:
            gflops = flops / seconds / 1e9
            attention = roofline.attention_flops(shape["layers"], shape["attention_width"], row_len, rows, passes)
            out[phase] = {"gflops": round(gflops, 1), "of_peak": round(gflops / peak, 3),
                          "attention_gflops": round(attention / seconds / 1e9, 1)}
    return out


def bench_trl_step(model_path: str, prompts: int, generations: int, gen_len: int, steps: int, workdir: Path,
                   bf16: bool | None = None) -> dict:
    """TRL's GRPOTrainer at the same settings; ``bf16``: its mixed precision (default: on where CUDA is)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlkit import roofline
    from rlkit.models import load_tokenizer
    from rlkit.rewards.format import think_answer_format

    tok = load_tokenizer(model_path)
    times: list[float] = []
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync_device()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync_device()
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    def reward(completions, **_):
        return think_answer_format(completions)

    cuda = torch.cuda.is_available()
    bf16 = cuda if bf16 is None else bf16
    args = GRPOConfig(output_dir=str(workdir / f"trl_grpo_{'bf16' if bf16 else 'fp32'}"),
                      per_device_train_batch_size=prompts * generations, num_generations=generations,
                      max_completion_length=gen_len, beta=0.04, max_steps=steps, learning_rate=1e-6, logging_steps=1,
                      report_to="none", save_strategy="no", use_cpu=not cuda, bf16=bf16, temperature=1.0,
                      disable_tqdm=True)
    data = Dataset.from_list([{"prompt": p} for p in bench_prompts(prompts * steps * 4, 10_000, tok)])
    with roofline.PeakMemory() as mem:
        trainer = GRPOTrainer(model=model_path, reward_funcs=[reward], args=args, train_dataset=data,
                              processing_class=tok, callbacks=[Timer()])
        trainer.train()
    timed = times[1:] or times
    step_s = sum(timed) / len(timed)
    mean_len = (sum(lengths[1:]) / len(lengths[1:])) if len(lengths) > 1 else (lengths[0] if lengths else gen_len)
    return {"trainer": f"TRL {__import__('trl').__version__} GRPOTrainer (hf generate, {'bf16' if bf16 else 'fp32'})",
            "precision": "bf16" if bf16 else "fp32", "step_seconds": round(step_s, 3),
            "completion_tokens_per_s": round(mean_len * prompts * generations / step_s, 1), "phases": {},
            "peak_gib": mem.gib}


def clean_environment() -> dict[str, str]:
    """The environment to spawn the step rows in: this process's, as it is now (before any vLLM engine)."""
    return dict(os.environ)


def isolated(env: dict[str, str], fn, *args):
    """``fn(*args)`` in a fresh process (spawned with the environment ``env``): every GRPO step is timed, and
    its peak memory read, without what earlier measurements left in this one (the rollout rows' vLLM engines,
    bound threads, freed memory, the ``LD_PRELOAD`` vLLM set; a SmolLM2 update took 9.5 s in a fresh process
    and 13.9 s after them)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        now = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            future = pool.submit(fn, *args)  # the worker process starts here, with ``env``
        finally:
            os.environ.clear()
            os.environ.update(now)
        return future.result()


def machine_peaks() -> dict[str, float]:
    """The matmul peak (GFLOP/s) in fp32, and in bf16 where the device has it, measured now."""
    from rlkit.precision import cpu_has_bf16
    from rlkit.roofline import matmul_peak

    peaks = {"fp32": matmul_peak(torch.float32)}
    if torch.cuda.is_available() or cpu_has_bf16():
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    return peaks
