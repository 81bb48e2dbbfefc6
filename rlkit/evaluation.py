"""Evaluate a model on a built-in task or a prompt/answer JSONL: pass@1, avg@K, pass@K, format rate.

- ``pass@1``: greedy decoding, share of prompts answered correctly;
- ``avg@K``: mean correctness over K samples per prompt (an estimate of sampled pass@1);
- ``pass@K``: share of prompts with at least one correct sample among K;
- ``format``: share of greedy completions in the strict ``<think>…</think><answer>…</answer>`` format
  (``format@K`` for the samples).

Scoring is the same code as the ``accuracy`` (or, on reasoning-gym data, the ``reasoning_gym``) and
``think_format`` rewards.

    rlkit eval --model outputs/sft --task arithmetic --num-samples 8 --output eval.json
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlkit.config import EvalConfig, RunConfig
from rlkit.data import is_embedded, prompt_rows, with_chat_turns
from rlkit.embedded.tasks import TASKS
from rlkit.models import load_causal_lm, load_tokenizer
from rlkit.rewards.format import is_well_formed
from rlkit.rewards.math_answer import scores as answer_scores
from rlkit.rollout import SamplingParams, engine_spec, make_engine, rollout_config
from rlkit.templates import render_prompt, render_rows


@dataclass
class EvalReport:
    metrics: dict
    examples: list[dict]


def eval_config(recipe: str | None, sets: list[str] | None, flags: dict) -> RunConfig:
    """``rlkit eval``'s config: what an RL run's evaluation reads (``data.system_prompt``, ``data.few_shot``,
    ``rollout.*``), from the defaults < ``recipe`` < ``--set`` < the command's flags (nested, None dropped)."""
    from rlkit.config import build_config
    from rlkit.config_files import load_yaml, parse_set
    from rlkit.recipe import recipe_path

    from rlkit.config import KINDS, ConfigError

    if recipe:  # read as its own command reads it
        path = recipe_path(recipe)
        layers = [(str(path), load_yaml(path))]
        kind = layers[0][1].get("kind", "sft")
        if isinstance(kind, str) and kind in KINDS and "eval" not in KINDS[kind].model_fields:
            raise ConfigError(f"{path}: a {kind} recipe has no evaluation to reproduce; give rlkit eval an sft, grpo "
                              "or ppo recipe, or none")
    else:
        layers = [("defaults", {"kind": "eval", "data": {"template": "r1_zero"}})]
    layers.append(("--set", parse_set(sets)))
    if flags.get("eval", {}).get("task") is not None:  # --task names what to evaluate on: not the recipe's data.eval
        layers.append(("command-line flags", {"data": {"eval": None}}))
    layers.append(("command-line flags", flags))
    return build_config(layers)


def eval_spec(cfg: RunConfig) -> str | None:
    """Where a training run evaluates: nowhere with ``eval.task: null``; else ``data.eval``; else a named
    ``eval.task``; else (``auto``), when it trains on the embedded world, that world's task; else nowhere
    (a user's data set is never scored on a built-in task)."""
    if cfg.eval.task is None:
        return None
    if cfg.data.eval:
        return cfg.data.eval
    if cfg.eval.task != "auto":
        return f"embedded:{cfg.eval.task}:{cfg.eval.split}"
    if is_embedded(cfg.data.train):
        name = cfg.data.train.split(":")[1]
        return f"embedded:{name if name in TASKS else TASKS[0]}:{cfg.eval.split}"
    return None


def eval_rows(cfg: EvalConfig, data: str | None, data_cfg=None) -> tuple[str, list[dict]]:
    """The evaluation rows: ``data`` (columns mapped by ``data_cfg``, the ``data:`` section) or the task."""
    task = TASKS[0] if cfg.task in (None, "auto") else cfg.task
    spec = data or f"embedded:{task}:{cfg.split}"
    rows = prompt_rows(spec, split=cfg.split, data_cfg=data_cfg if data else None)
    if not data:  # a built-in task: its columns need no mapping, but data.system_prompt/few_shot still apply
        rows = [{**r, "prompt": with_chat_turns(r["prompt"], data_cfg)} for r in rows]
    return spec, rows[: cfg.limit] if cfg.limit else rows


def check_eval_rows(rows: list[dict], spec: str, template: str, tokenizer, model_path: str | None,
                    max_new_tokens: int, tools: list[dict] | None = None) -> None:
    """Everything about the evaluation rows that would otherwise fail (or silently score garbage) mid-way:
    a gold answer math-verify cannot check, a prompt the template cannot render, a prompt that with the
    generation budget does not fit the model's context. One line naming the row, before any generation."""
    from rlkit.data import DataError
    from rlkit.models import context_length
    from rlkit.rewards.math_answer import gold_error

    if not _reasoning_gym(rows):
        for i, r in enumerate(rows, 1):  # scored by math-verify (reasoning-gym rows by their task's checker)
            problem = gold_error(r["answer"])
            if problem:
                raise DataError(f"{spec}: row {i}: {problem}")
    texts = render_rows([r["prompt"] for r in rows], template, tokenizer, spec, tools)
    context = context_length(model_path) if model_path else None
    if context is not None:
        lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        over = [i for i, n in enumerate(lengths) if n + max_new_tokens > context]
        if over:
            i = over[0]
            raise DataError(f"{spec}: row {i + 1} is {lengths[i]} tokens, which with eval.max_new_tokens "
                            f"{max_new_tokens} exceeds the model's context of {context} tokens ({len(over)} of "
                            f"{len(rows)} rows are); shorten them, lower eval.max_new_tokens, or leave them out")


def evaluate_model(model, tokenizer, rows: list[dict], cfg: EvalConfig, template: str, progress=None,
                   engine=None, env=None) -> EvalReport:
    """Score a model on rows ``{prompt, answer}``: with ``engine`` (which samples from the model's weights),
    else with the hf engine on the in-memory ``model``. ``env``: ``(EnvSource, EnvConfig)``, to score whole
    multi-turn episodes (their last model turn), with the episodes' metrics (turns, tool calls, ...)."""
    t0 = time.time()
    if engine is None:
        engine = make_engine(rollout_config(), tokenizer, model=model, max_batch=cfg.batch_size)

    def roll(params: SamplingParams, progress):
        if env is None:
            return prompts, engine.generate(prompt_ids, params, progress)
        from rlkit.env.episodes import run_episodes

        return run_episodes(engine, tokenizer, env[0], env[1], rows, params, progress)

    prompts = [render_prompt(r["prompt"], template, tokenizer) for r in rows] if env is None else []
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    prompts, greedy = roll(SamplingParams(n=1, max_new_tokens=cfg.max_new_tokens, temperature=0), progress)
    correct = [s == 1.0 for s in score_answers([g[0].text for g in greedy], rows)]
    formatted = [is_well_formed(g[0].text, p) for g, p in zip(greedy, prompts)]
    n = len(rows)
    metrics = {
        "pass@1": sum(correct) / n,
        "format": sum(formatted) / n,
        "completion_len": sum(len(g[0].token_ids) for g in greedy) / n,
    }
    if env is not None:
        from rlkit.env.metrics import episode_metrics

        metrics.update(episode_metrics([g[0] for g in greedy], prefix=""))
    k = cfg.num_samples
    if k > 1:
        params = SamplingParams(n=k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        _, sampled = roll(params, progress)
        flat = score_answers([s.text for g in sampled for s in g], [r for r in rows for _ in range(k)])
        per = [[x == 1.0 for x in flat[i * k : (i + 1) * k]] for i in range(n)]
        metrics[f"avg@{k}"] = sum(sum(c) for c in per) / (n * k)
        metrics[f"pass@{k}"] = sum(any(c) for c in per) / n
        metrics[f"format@{k}"] = sum(is_well_formed(s.text, p) for g, p in zip(sampled, prompts) for s in g) / (n * k)
    metrics["n_prompts"] = n
    metrics["seconds"] = round(time.time() - t0, 2)
    examples = [
        {"prompt": r["prompt"], "answer": r["answer"], "completion": g[0].text, "correct": c,
         **({"messages": g[0].episode.messages} if g[0].episode is not None else {})}
        for r, g, c in list(zip(rows, greedy, correct))[:5]
    ]
    return EvalReport(metrics, examples)


def _reasoning_gym(rows: list[dict]) -> bool:
    """Rows of a reasoning-gym task (scored by the task's own checker, not math-verify)."""
    return bool(rows) and isinstance(rows[0].get("metadata"), dict) and "source_dataset" in rows[0]["metadata"]


def score_answers(completions: list[str], rows: list[dict]) -> list[float]:
    """Each completion's correctness against its row: a reasoning-gym row by its task's own checker (the
    ``reasoning_gym`` reward), any other by math-verify (the ``accuracy`` reward)."""
    if _reasoning_gym(rows):
        from rlkit.rewards.reasoning_tasks import reasoning_gym_score

        return reasoning_gym_score(completions, answer=[r["answer"] for r in rows],
                                   metadata=[r["metadata"] for r in rows], prompt=[r["prompt"] for r in rows])
    return answer_scores(completions, [r["answer"] for r in rows])


def run_eval(model_path: str, cfg: EvalConfig, template: str, data: str | None = None, dtype: str = "auto",
             progress_factory=None, rollout=None, data_cfg=None, trust_remote_code: bool = False,
             env_cfg=None) -> dict:
    """Load a model directory and evaluate it with the ``rollout`` engine (a ``rollout:`` section; default
    hf); with ``env_cfg`` (an ``env:`` section) whole multi-turn episodes; returns the JSON-ready report."""
    rollout = rollout or rollout_config()
    env = None
    if env_cfg is not None:
        from rlkit.env.environments import load_env

        env = (load_env(env_cfg), env_cfg)
    spec, rows = eval_rows(cfg, data, data_cfg)
    model = None
    if engine_spec(rollout).samples_itself:  # generates on the model in memory: loaded (and checked) first
        model = load_causal_lm(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        model = model.to("cuda") if torch.cuda.is_available() else model
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    if env is not None:
        from rlkit.env.episodes import check_template

        check_template(tokenizer, env[0])
    budget = env_cfg.budget(cfg.max_new_tokens) if env_cfg is not None else cfg.max_new_tokens
    tools = env[0].schemas if env is not None else None
    check_eval_rows(rows, spec, template, tokenizer, model_path, budget, tools)
    engine = eval_engine(rollout, tokenizer, model_path, dtype, cfg, rows, template, model=model, env=env)
    total = len(rows) * (1 + (cfg.num_samples if cfg.num_samples > 1 else 0))
    try:
        if progress_factory is not None:
            with progress_factory(total) as advance:
                report = evaluate_model(None, tokenizer, rows, cfg, template, advance, engine=engine, env=env)
        else:
            report = evaluate_model(None, tokenizer, rows, cfg, template, engine=engine, env=env)
    finally:
        engine.close()
    return {
        "model": model_path,
        "engine": rollout.engine,
        "data": spec,
        "template": template,
        "num_samples": cfg.num_samples,
        "temperature": cfg.temperature if cfg.num_samples > 1 else 0.0,
        "max_new_tokens": cfg.max_new_tokens,
        "metrics": report.metrics,
        "examples": report.examples,
    }


def eval_engine(rollout, tokenizer, model_path: str, dtype: str, cfg: EvalConfig, rows: list[dict], template: str,
                model=None, env=None):
    """The ``rollout`` engine that evaluates the model directory ``model_path``, whose weights ``model`` (the
    model just trained) holds when given. An engine that samples the in-memory model does so on ``model``
    (else loaded from ``model_path``); one that loads ``model_path`` itself needs nothing more; a server holds
    weights of its own, so ``model`` is pushed to it (without one, it must serve ``model_path``). The context
    is sized from the longest prompt plus the generation budget."""
    spec = engine_spec(rollout)
    tools = env[0].schemas if env is not None else None
    ids = tokenizer([render_prompt(r["prompt"], template, tokenizer, tools) for r in rows],
                    add_special_tokens=False)["input_ids"]
    longest_prompt = max((len(x) for x in ids), default=0)
    budget = env[1].budget(cfg.max_new_tokens) if env is not None else cfg.max_new_tokens
    # the trainer's model generates in chunks of eval.batch_size sequences (in the memory training leaves it);
    # an engine of its own schedules all samples of eval.batch_size prompts at once
    max_batch = cfg.batch_size if spec.samples_itself else cfg.batch_size * max(1, cfg.num_samples)
    return make_engine(rollout, tokenizer, model=None if spec.loads_model_path else model, model_path=model_path,
                       dtype=dtype, max_batch=max_batch, max_len=longest_prompt + budget,
                       max_prompt_len=longest_prompt)
