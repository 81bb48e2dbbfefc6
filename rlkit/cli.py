"""The ``rlkit`` command line: each command parses, loads a config, and calls one function."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from rlkit import __version__
from rlkit.cli_errors import OneLineErrors, friendly_errors
from rlkit.commands import COMMANDS, Command
from rlkit.errors import RlkitError
from rlkit.runs import check_output_file
from rlkit.tracking import quiet_libraries

app = typer.Typer(
    cls=OneLineErrors,
    name="rlkit",
    help="RL post-training for language models: SFT, reward models, PPO, GRPO and the R1 pipelines.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipes_app = typer.Typer(cls=OneLineErrors, help="List and inspect recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
rewards_app = typer.Typer(cls=OneLineErrors, help="Inspect a recipe's rewards.", no_args_is_help=True)
app.add_typer(rewards_app, name="rewards")

RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", "-r", help="Recipe name (see `rlkit recipes list`) or path to a YAML file.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="'embedded', a local HF model directory, or a hub name. Overrides model.path.")]
DatasetOpt = Annotated[Optional[str], typer.Option("--dataset", "-d", help="'embedded:TASK', a .jsonl/.json/.parquet file, or a datasets name. Overrides data.train.")]
OutputOpt = Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Output directory. Overrides output_dir.")]
StepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps. Overrides train.max_steps.", min=1)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override any config key: --set train.learning_rate=1e-5 (repeatable).")]
ResumeAnywayOpt = Annotated[bool, typer.Option("--resume-anyway", help="Resume a run although its config changed (the changes are listed).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Discard the checkpoints and metrics in the output directory and start over.")]


def _resume_mode(resume_anyway: bool, overwrite: bool) -> str:
    if resume_anyway and overwrite:
        raise RlkitError("--resume-anyway and --overwrite: choose one")
    return "anyway" if resume_anyway else "overwrite" if overwrite else "auto"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rlkit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """rlkit: RL post-training that runs offline on a laptop and fast on GPUs."""
    quiet_libraries()


def _add_command(c: Command) -> None:
    """sft, rm, grpo, ppo and sample share their options (a command without --max-steps or resuming offers
    fewer): recipe < --set < named flags, then one runner call."""

    def command(recipe=None, model=None, dataset=None, output_dir=None, max_steps=None, set_=None,
                resume_anyway=False, overwrite=False) -> None:
        mode = _resume_mode(resume_anyway, overwrite)
        cfg = _training_config(c, recipe, model, dataset, output_dir, max_steps, set_)
        result = c.run(cfg, resume=mode)
        title = f"{c.name} → {cfg.output_dir}" + (f"/{c.writes}" if c.writes else "")
        if c.summary == "before_after":
            if result and "seconds" in result:
                _print_before_after(title, result)
        else:
            _print_metrics(title, result)

    offered = {"recipe": RecipeOpt, "model": ModelOpt, "dataset": DatasetOpt, "output_dir": OutputOpt,
               "max_steps": StepsOpt if c.max_steps else None, "set_": SetOpt,
               "resume_anyway": ResumeAnywayOpt if c.resumable else None,
               "overwrite": OverwriteOpt if c.resumable else None}
    defaults = inspect.signature(command).parameters
    command.__signature__ = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name].default, annotation=ann)
        for name, ann in offered.items() if ann is not None])
    command.__doc__ = c.help
    command.__name__ = c.name
    app.command(name=c.name)(friendly_errors(command))


for _command in COMMANDS.values():
    _add_command(_command)


@app.command()
@friendly_errors
def run(
    recipe: Annotated[str, typer.Argument(help="Pipeline recipe name (instructgpt, ...) or YAML path.")],
    output_dir: OutputOpt = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="Re-run this stage and every stage after it.")] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Re-run only this stage (its inputs must be finished).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Change a default of every stage that reads it (defaults.train.max_steps=5, or train.max_steps=5; a stage's own setting wins) or a key of one stage (stages.ppo.train.max_steps=5, or ppo.train.max_steps=5 when the stage name is not also a config section).")] = None,
) -> None:
    """Run a pipeline recipe's stages in order; run it again to resume (finished stages are skipped)."""
    from rlkit.pipeline import load_pipeline

    if from_ and only:
        raise typer.BadParameter("use --from or --only, not both")
    pipeline = load_pipeline(recipe)
    c = _console()
    manifest = pipeline.run(output_dir, start_from=from_, only=only, sets=set_,
                            on_stage=lambda name, status: c.print(f"[bold cyan]stage {name}[/]: {status}"))
    table = Table("stage", "kind", "status", "seconds", "headline")
    headline = {c.kind: c.headline for c in COMMANDS.values()}
    for e in manifest["stages"]:
        m = e.get("metrics", {})
        head = ", ".join(f"{k}={v:.3g}" for k, v in m.items() if k.startswith(headline.get(e.get("kind"), ())))
        table.add_row(e["name"], e.get("kind", ""), e.get("status", ""), f"{e.get('seconds', 0):.0f}", head)
    c.print(f"[bold]{pipeline.name}[/] → {manifest['output_dir']}/manifest.json")
    c.print(table)


@app.command("eval")
@friendly_errors
def eval_(
    model_arg: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help="Model directory or hub name (default: embedded).")] = None,
    model: ModelOpt = None,
    task: Annotated[Optional[str], typer.Option("--task", "-t", help="Built-in task, e.g. arithmetic.")] = None,
    data: Annotated[Optional[str], typer.Option("--dataset", "--data", "-d", help="JSONL/parquet with 'prompt' and 'answer' columns (instead of --task).")] = None,
    recipe: RecipeOpt = None,
    template: Annotated[Optional[str], typer.Option("--template", help="Prompt template: r1_zero, chat or plain (default: the recipe's; r1_zero without a recipe).")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-k", help="K samples per prompt for avg@K / pass@K (greedy pass@1 is always reported).", min=1)] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature for the K samples.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Generation budget per completion.", min=1)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate only the first N prompts.", min=1)] = None,
    engine: Annotated[Optional[str], typer.Option("--engine", help="Rollout engine: hf or vllm (rollout.engine; more with --set rollout.KEY=VALUE).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="Write the report as JSON to this file.")] = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate a model: pass@1 (greedy), avg@K and pass@K (sampled) and format rate."""
    from rlkit.evaluation import eval_config, eval_spec, run_eval
    from rlkit.nested import nest
    from rlkit.tracking import progress_bar

    if output is not None:
        check_output_file(output, "--output")
    cfg = eval_config(recipe, set_, nest({
        "model.path": model or model_arg, "rollout.engine": engine, "eval.task": task,
        # the template: a training recipe's eval.template; rlkit eval's own (no recipe) data.template
        "eval.template" if recipe else "data.template": template,
        "eval.num_samples": num_samples, "eval.temperature": temperature, "eval.max_new_tokens": max_new_tokens,
        "eval.limit": limit}))
    if data is None and task is None and cfg.eval.task is not None:
        # a recipe's held-out data, as training evaluates on it (on the embedded world: its task's test split)
        data = cfg.data.eval or (eval_spec(cfg) if getattr(cfg.data, "train", None) else None)
    # a training recipe's evaluation renders as its training does (data.template) unless eval.template says
    tmpl = getattr(cfg.eval, "template", None) or cfg.data.template
    report = run_eval(cfg.model.path, cfg.eval, tmpl, data=data, dtype=cfg.model.dtype,
                      progress_factory=lambda total: progress_bar("evaluating", total), rollout=cfg.rollout,
                      data_cfg=cfg.data, trust_remote_code=cfg.model.trust_remote_code, env_cfg=getattr(cfg, "env", None))
    _print_metrics(f"eval {report['model']} on {report['data']} ({tmpl} template, {report['engine']} engine)",
                   report["metrics"])
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"wrote {output}")


@app.command()
@friendly_errors
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="'embedded', a model directory, or a preset shape (qwen2.5-0.5b-shape).")] = "embedded",
    engines: Annotated[str, typer.Option("--engines", help="Comma-separated rollout engines: hf, hf_static, vllm (rlkit's), vllm_raw (vLLM's LLM.generate as is).")] = "hf,hf_static,vllm,vllm_raw",
    step_engines: Annotated[str, typer.Option("--step-engines", help="Comma-separated engines for the rlkit GRPO step: hf, hf_static, vllm.")] = "hf,vllm",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated numbers of sequences.")] = "8,32",
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Prompt tokens.", min=1)] = 64,
    gen_len: Annotated[int, typer.Option("--gen-len", help="Generated tokens per sequence (EOS ignored).", min=1)] = 64,
    prompts: Annotated[int, typer.Option("--prompts", help="Prompts per GRPO step.", min=1)] = 4,
    generations: Annotated[int, typer.Option("--generations", help="Completions per prompt in the GRPO step.", min=2)] = 8,
    steps: Annotated[int, typer.Option("--steps", help="GRPO steps (the first warms up).", min=1)] = 3,
    trl: Annotated[bool, typer.Option("--trl/--no-trl", help="Also time TRL's GRPOTrainer at the same settings.")] = True,
    staleness: Annotated[str, typer.Option("--staleness", help="Comma-separated rollout.max_staleness values for the vllm GRPO step (1: rollouts overlap the update), e.g. 0,1.")] = "0",
    output: Annotated[Optional[Path], typer.Option("--output", help="Write the figures as JSON.")] = None,
) -> None:
    """Rollout tokens/s per engine, a full GRPO step per phase, and TRL's GRPOTrainer, side by side."""
    from rlkit.bench import bench_options, run_bench

    if output is not None:
        check_output_file(output, "--output")
    sizes, chosen = bench_options(batch_sizes, engines, step_engines, trl, staleness)
    r = run_bench(model, chosen["--engines"], sizes, prompt_len, gen_len, prompts, generations, steps, trl,
                  str(output) if output else None, step_engines=chosen["--step-engines"],
                  staleness=chosen["--staleness"])
    c = _console()
    c.print(f"[bold]rlkit bench[/] {r['model']} on {r['device']}  (prompt {prompt_len}, generate {gen_len} tokens)")
    t = Table("engine", "sequences", "tokens/s")
    for row in r["rollout"]:
        t.add_row(row["engine"], str(row["sequences"]), f"{row['tokens_per_s']:,.0f}")
    c.print(t)
    if "machine" in r:
        c.print("matmul peak (4096², GFLOP/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in
                                                              r["machine"]["matmul_peak_gflops"].items()))
    t = Table("GRPO step", "s/step", "completion tokens/s", "peak GiB", "update GFLOP/s (of peak)", "phases (s)")
    for row in r["step"]:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in row["phases"].items() if v >= 0.005)
        upd = row.get("roofline", {}).get("update")
        t.add_row(row["trainer"] + (f" [{row['precision']}]" if "precision" in row else ""),
                  f"{row['step_seconds']:.2f}", f"{row['completion_tokens_per_s']:,.0f}",
                  "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}",
                  f"{upd['gflops']:,.0f} ({upd['of_peak']:.0%})" if upd else "-", phases)
    c.print(t)
    if output:
        typer.echo(f"wrote {output}")


@app.command("vllm-serve")
@friendly_errors
def vllm_serve(
    model: Annotated[str, typer.Option("--model", "-m", help="'embedded', 'smollm2' or a model directory (a training run's output).")] = "embedded",
    host: Annotated[str, typer.Option("--host", help="Address to bind; the weight-reload endpoint is open to whoever reaches it, so keep it private.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port.", min=1, max=65535)] = 8000,
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16 (the trainer's model.dtype).")] = "auto",
    max_model_len: Annotated[Optional[int], typer.Option("--max-model-len", help="Longest prompt + completion (default: the model's context, at most 4096).", min=1)] = None,
    gpu_memory_utilization: Annotated[float, typer.Option("--gpu-memory-utilization", help="Share of the GPU vLLM takes (a server has its GPU to itself).", min=0.01, max=1.0)] = 0.9,
    kv_cache_gib: Annotated[Optional[float], typer.Option("--kv-cache-gib", help="On CPU: KV-cache size in GiB (default 1).", min=0.01)] = None,
    extra: Annotated[Optional[list[str]], typer.Argument(help="More `vllm serve` arguments, after `--`.")] = None,
) -> None:
    """Serve a model with vLLM's OpenAI-compatible server for `rollout.mode: server` (weights are pushed
    to it after every update)."""
    from rlkit.rollout.serve import serve

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise typer.BadParameter(f"--dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    serve(model, host=host, port=port, dtype=dtype, max_model_len=max_model_len,
          gpu_memory_utilization=gpu_memory_utilization, kv_cache_gib=kv_cache_gib, extra=extra)


@app.command("config-path")
@friendly_errors
def config_path_(
    name: Annotated[Optional[str], typer.Argument(help="ddp, fsdp2, zero2 or zero3; none: list them.")] = None,
) -> None:
    """Print the path of a shipped accelerate config, for
    `accelerate launch --config_file $(rlkit config-path fsdp2) -m rlkit grpo ...`."""
    from rlkit.launch import CONFIGS, config_path

    if name is None:
        for n, what in CONFIGS.items():
            typer.echo(f"{n:6s} {config_path(n)}  ({what})")
        return
    typer.echo(str(config_path(name)))


@rewards_app.command("check")
@friendly_errors
def rewards_check(
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    dataset: DatasetOpt = None,
    set_: SetOpt = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 1 when a hack scores as high as the honest answer.")] = False,
) -> None:
    """Score an honest answer and known reward hacks (no reasoning, an empty <think>, repeated <answer>
    blocks, the answer outside the tags, padding) with a recipe's rewards; flag every hack that scores as
    high as the honest answer. `rlkit grpo` runs it first and prints the summary line."""
    from rlkit.recipe import load_config
    from rlkit.reward_check import check_not_broken, format_table, run_reward_check_cli, summary_line

    cfg = load_config(recipe, default_recipe="r1_zero", sets=set_,
                      flags={"model.path": model, "data.train": dataset})
    report = run_reward_check_cli(cfg)
    c = _console()
    c.print(format_table(report))
    c.print(summary_line(report))
    for name, err in report.errors.items():
        c.print(f"[yellow]reward '{name}' failed on a probe: {err}[/]")
    check_not_broken(report)
    if strict and report.hacks:
        raise typer.Exit(1)


@recipes_app.command("list")
@friendly_errors
def recipes_list() -> None:
    """List the built-in recipes."""
    from rlkit.recipe import list_recipes

    table = Table("recipe", "description")
    for name, desc in list_recipes().items():
        table.add_row(name, desc)
    _console().print(table)


@recipes_app.command("show")
@friendly_errors
def recipes_show(
    name: Annotated[str, typer.Argument(help="Recipe name or YAML path.")],
    set_: SetOpt = None,
) -> None:
    """Print a recipe's fully resolved config (defaults filled in, overrides applied)."""
    from rlkit.config import to_yaml
    from rlkit.pipeline import is_pipeline_file, load_pipeline, stage_config, stage_sets
    from rlkit.recipe import load_config, recipe_path

    if not is_pipeline_file(recipe_path(name)):
        typer.echo(to_yaml(load_config(name, default_recipe=name, sets=set_)), nl=False)
        return
    p = load_pipeline(name)
    per, common = stage_sets(p, set_)
    out = Path(p.output_dir)
    outputs = {s.name: str(out / s.name) for s in p.stages}
    for s in p.stages:
        typer.echo(f"# ---- stage {s.name} ----")
        typer.echo(to_yaml(stage_config(p, s, outputs, out, per, common)), nl=False)


def _training_config(c: Command, recipe, model, dataset, output_dir, max_steps, sets):
    """The config of a command of the table: recipe < --set < named flags, checked to be of its kind."""
    from rlkit.recipe import load_config

    return load_config(recipe, default_recipe=c.default_recipe, sets=sets, kind=c.kind, flags={
        "model.path": model, "data.train": dataset, "output_dir": output_dir, "train.max_steps": max_steps})


def _console():
    from rich.console import Console

    return Console()


def _print_before_after(title: str, result: dict) -> None:
    _console().print(f"[bold]{title}[/]  ({result['steps']} steps, {result['seconds']:.0f} s)")
    keys = [k.removeprefix("before/") for k in result if k.startswith("before/")]
    if not keys:
        return
    table = Table("metric", "before", "after")
    for k in keys:
        b, a = result.get(f"before/{k}"), result.get(f"after/{k}")
        table.add_row(k, f"{b:.4f}" if isinstance(b, float) else str(b), f"{a:.4f}" if isinstance(a, float) else str(a))
    _console().print(table)


def _print_metrics(title: str, metrics: dict) -> None:
    _console().print(f"[bold]{title}[/]")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    _console().print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
