"""Rejection sampling (DeepSeek-R1, stage 3): sample many, keep the verified ones, write SFT data.

For each prompt, N samples from the model; each is scored by the recipe's rewards and kept only when every
reward named in ``sample.thresholds`` reaches its threshold (by default: the answer verifies and the
format is right). Truncated or over-long samples and repeated completions are dropped, at most
``sample.max_per_prompt`` are kept per prompt, and non-reasoning SFT data can be mixed in. The output is
``OUTPUT/data.jsonl``, SFT-ready (``messages`` with the chat template, else ``prompt``/``completion``),
each row carrying its provenance (source model, reward scores, sample index), plus ``report.json`` and
``pass_rate.png`` with the distribution of pass rates over prompts.

    rlkit sample --model outputs/r1_zero --set sample.num_samples=16
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch

from rlkit.config import RunConfig
from rlkit.outputs import write_dataset_card
from rlkit.data import DataError, check_lengths, rl_rows, sft_rows
from rlkit.env.environments import load_env
from rlkit.env.episodes import check_template, run_episodes
from rlkit.models import context_length, load_causal_lm, load_tokenizer
from rlkit.rollout import SamplingParams, engine_spec, make_engine
from rlkit.scoring import RewardSet, score_groups
from rlkit.templates import completion_text, render_rows
from rlkit.runs import locked_output, write_run_record
from rlkit.tracking import progress_bar


def run_sample(cfg: RunConfig) -> dict:
    with locked_output(Path(cfg.output_dir)):
        return _run_sample(cfg)


def _run_sample(cfg: RunConfig) -> dict:
    t0 = time.time()
    sc = cfg.sample
    out = Path(cfg.output_dir)
    env = load_env(cfg.env) if cfg.env is not None else None  # an environment or tool that does not load: now
    rewards = RewardSet(cfg.rewards, env=env)
    unknown = [k for k in sc.thresholds if k not in rewards.names]  # an environment's get_reward is one by name
    if unknown:
        raise DataError(f"sample.thresholds: '{unknown[0]}' is not one of the rewards ({', '.join(rewards.names)})")
    budget = cfg.env.budget(sc.max_new_tokens) if cfg.env is not None else sc.max_new_tokens
    rows = rl_rows(cfg.data)
    rewards.check_routes(rows)  # a route a reward lists is some row's (before max_prompts cuts whole sources)
    if sc.max_prompts:
        rows = rows[: sc.max_prompts]
    rewards.check_rows(rows, cfg.data.train)  # e.g. every gold answer is one the math check can verify
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    if env is not None:
        check_template(tokenizer, env)
    template = cfg.data.template
    tools = env.schemas if env is not None else None
    texts_all = render_rows([r["prompt"] for r in rows], template, tokenizer, cfg.data.train, tools)
    ids_all = tokenizer(texts_all, add_special_tokens=False)["input_ids"]
    context = context_length(cfg.model.path, cfg.model.trust_remote_code)
    if context is not None:  # a prompt with no room for its samples would be sampled as garbage, or not at all
        fits = check_lengths(list(zip(rows, texts_all, ids_all)), [len(x) for x in ids_all],
                             context - budget, cfg.data.train, cfg.data.on_overlong,
                             f"which with {'an episode of ' if env else 'sample.max_new_tokens '}{budget} tokens "
                             f"exceeds the model's context of {context} tokens")
        rows, texts_all, ids_all = [list(x) for x in zip(*fits)]
    mix = None
    if sc.mix_data:  # read (and checked) before sampling, not after it
        mix = sft_rows(sc.mix_data)
        mix = mix[: sc.mix_max] if sc.mix_max else mix
        mix = [{**_as_format(r, template, sc.mix_data), "source": sc.mix_data} for r in mix]
    model = None
    if engine_spec(cfg.rollout).samples_itself:  # generates on a model in memory (vllm loads its own)
        model = load_causal_lm(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code)
        if torch.cuda.is_available():
            model = model.to("cuda")
    engine = make_engine(cfg.rollout, tokenizer, model=model, model_path=cfg.model.path, dtype=cfg.model.dtype,
                         max_batch=sc.batch_size * sc.num_samples, seed=cfg.train.seed,
                         max_len=max(map(len, ids_all), default=0) + budget,
                         max_prompt_len=max(map(len, ids_all), default=0))
    params = SamplingParams(n=sc.num_samples, max_new_tokens=sc.max_new_tokens, temperature=sc.temperature,
                            top_p=sc.top_p)

    kept: list[dict] = []
    dropped: Counter = Counter()
    pass_rates: list[float] = []
    total = 0
    with progress_bar("sampling", len(rows)) as advance, contextlib.closing(engine):
        for i in range(0, len(rows), sc.batch_size):
            chunk = rows[i : i + sc.batch_size]
            texts = texts_all[i : i + sc.batch_size]
            if env is None:
                groups = engine.generate(ids_all[i : i + sc.batch_size], params)
            else:  # whole episodes: the model's turns and the tools' replies
                texts, groups = run_episodes(engine, tokenizer, env, cfg.env, chunk, params)
            scored = score_groups(rewards, chunk, texts, groups)
            for gi, (row, group) in enumerate(zip(chunk, groups)):
                seen: set[str] = set()
                n_pass = 0
                taken = 0
                for j, smp in enumerate(group):
                    k = gi * sc.num_samples + j
                    total += 1
                    scores = {name: vals[k] for name, vals in scored.per_reward.items()}
                    verified = all(scores.get(name) is not None and scores[name] >= th
                                   for name, th in sc.thresholds.items())
                    n_pass += verified
                    if not verified:
                        dropped["failed_rewards"] += 1
                    elif not smp.finished or (smp.episode is not None and smp.episode.truncated):
                        dropped["over_long"] += 1
                    elif sc.dedupe and _key(smp) in seen:
                        dropped["duplicate"] += 1
                    elif taken >= sc.max_per_prompt:
                        dropped["over_cap"] += 1
                    else:
                        seen.add(_key(smp))
                        taken += 1
                        kept.append(_sft_row(row, smp.text, template, cfg.model.path, scores, j, smp.episode, tools))
                pass_rates.append(n_pass / sc.num_samples)
            advance(len(chunk))

    if not kept:
        passed = sum(round(p * sc.num_samples) for p in pass_rates)
        raise DataError(
            f"rejection sampling kept no samples: {passed} of {total} passed sample.thresholds "
            f"{dict(sc.thresholds)} (after dropping {dict(dropped) or 'none'}); sample more, or lower the thresholds")
    n_reasoning = len(kept)
    if mix:
        kept.extend(mix)

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "data.jsonl.tmp"
    with tmp.open("w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    tmp.replace(out / "data.jsonl")
    hist = Counter(round(p, 3) for p in pass_rates)
    report = {
        "source_model": cfg.model.path,
        "prompts": len(rows),
        "samples": total,
        "kept": n_reasoning,
        "mixed_in": len(kept) - n_reasoning,
        "dropped": dict(dropped),
        "mean_pass_rate": sum(pass_rates) / len(pass_rates),
        "prompts_with_a_pass": sum(p > 0 for p in pass_rates) / len(pass_rates),
        "pass_rate_histogram": {str(k): hist[k] for k in sorted(hist)},
        "seconds": round(time.time() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(pass_rates, out / "pass_rate.png", sc.num_samples)
    metrics = {k: v for k, v in report.items() if isinstance(v, (int, float))}
    # what every stage leaves: the config it ran with and its result (a pipeline re-reads them if its manifest tears)
    write_run_record(out, cfg)
    write_dataset_card(out, cfg, metrics)
    (out / "rlkit_result.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _key(smp) -> str:
    """What makes two samples of a prompt the same: the completion, or an episode's whole conversation."""
    return smp.text.strip() if smp.episode is None else json.dumps(smp.episode.messages)


def _sft_row(row: dict, completion: str, template: str, source: str, scores: dict, index: int, episode=None,
             tools: list[dict] | None = None) -> dict:
    meta = {"source_model": source, "rewards": scores, "sample_index": index}
    if row.get("answer") is not None:
        meta["answer"] = row["answer"]
    if episode is not None:  # a multi-turn conversation with its tool turns, and the tools (TRL's SFT format)
        return {"messages": episode.prompt_messages + episode.messages, "tools": tools, **meta}
    if template == "chat":
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": completion.strip()}], **meta}
    return {"prompt": row["prompt"], "completion": completion, **meta}


def _as_format(row: dict, template: str, spec: str) -> dict:
    """A mixed-in SFT row in the same format as the sampled rows (messages for chat, else prompt/completion)."""
    if template == "chat":
        if "messages" in row:
            return row
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["completion"]}]}
    if "messages" not in row:
        return row
    msgs = row["messages"]
    if len(msgs) != 2 or msgs[0]["role"] != "user":
        raise DataError(f"{spec}: only single-turn conversations can be mixed into {template}-template samples; "
                        "use data.template chat")
    return {"prompt": msgs[0]["content"], "completion": completion_text(msgs[1]["content"], template)}


def _plot(pass_rates: list[float], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(pass_rates, bins=[(k - 0.5) / n for k in range(n + 2)], edgecolor="white")
    ax.set_xlabel(f"share of the {n} samples that passed")
    ax.set_ylabel("prompts")
    ax.set_title("rejection sampling: pass rate per prompt")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
