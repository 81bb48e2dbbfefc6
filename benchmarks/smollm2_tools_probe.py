"""SmolLM2-135M-Instruct with the calculator tool: how often does the base model call it, and how often is
it right, on reasoning-gym additions of two 3- to 4-digit numbers (issue 20, item 8)?

SmolLM2's own chat template does not render ``tools=``; its tokenizer is ChatML, so Qwen2.5's published
template (as TRL ships it) renders the tools and the tool turns. Sampled episodes on the hf engine.

    OMP_NUM_THREADS=2 python benchmarks/smollm2_tools_probe.py --episodes 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import trl

from rlkit.data import prompt_rows
from rlkit.env.environments import load_env
from rlkit.env.episodes import run_episodes
from rlkit.env.schema import EnvConfig
from rlkit.evaluation import score_answers
from rlkit.models import load_causal_lm, load_tokenizer
from rlkit.rollout import SamplingParams, make_engine, rollout_config

TASK = ("reasoning_gym:basic_arithmetic?size={n}&seed=3&max_terms=2&min_digits=3&max_digits=4&operators=+"
        "&allow_negation=false&allow_parentheses=false")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    a = p.parse_args()
    torch.set_num_threads(2)
    tok = load_tokenizer("smollm2")
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    model = load_causal_lm("smollm2", "float32").eval()
    cfg = EnvConfig(tools=["rlkit.env.calculator:calculator"], max_turns=3)
    source = load_env(cfg)
    rows = prompt_rows(TASK.format(n=a.episodes))
    engine = make_engine(rollout_config(), tok, model=model, max_batch=16)
    out = {}
    for name, temp in (("greedy", 0.0), ("sampled", a.temperature)):
        t0 = time.time()
        _, groups = run_episodes(engine, tok, source, cfg, rows, SamplingParams(n=1, max_new_tokens=96, temperature=temp))
        flat = [g[0] for g in groups]
        right = score_answers([s.text for s in flat], rows)
        out[name] = {"accuracy": sum(r == 1.0 for r in right) / len(flat),
                     "tool_use": sum(s.episode.tool_calls > 0 for s in flat) / len(flat),
                     "tool_errors": sum(s.episode.tool_errors for s in flat) / len(flat),
                     "seconds": round(time.time() - t0, 1), "example": flat[0].episode.messages}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
