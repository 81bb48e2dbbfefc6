"""What every stage leaves behind besides weights: the model card and the run's result file."""

from __future__ import annotations

import json
from pathlib import Path

from rlkit.config import RunConfig, to_yaml
from rlkit.models import resolve_model_path
from rlkit.tracking import plot_metrics


def finish_run(out: Path, cfg: RunConfig, logger, metrics: dict, plot_keys: list[str], stage: str,
               label: str | None = None) -> None:
    """Close the metric sinks, then write ``training.png``, the model card and ``rlkit_result.json``."""
    logger.close()
    plot_metrics(out / "metrics.jsonl", out / "training.png", plot_keys, title=f"rlkit {label or stage}: {cfg.name}")
    write_model_card(out, cfg, metrics, stage=stage)
    (out / "rlkit_result.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _precision_line(cfg: RunConfig) -> str:
    from rlkit.precision import describe, for_model

    try:
        resolved = for_model(cfg.train.precision, cfg.model.path, cfg.model.trust_remote_code)
    except Exception:  # the card is written at the end: a base model that went away is not worth a failure
        resolved = cfg.train.precision
    return describe(cfg.train.precision, resolved)


def write_model_card(out: Path, cfg: RunConfig, metrics: dict, stage: str) -> None:
    from rlkit.models import pick_dtype

    base = cfg.model.path if cfg.model.path != "embedded" else "rlkit/embedded-tiny-llama"
    try:
        base_path = resolve_model_path(cfg.model.path)
    except Exception:
        base_path = cfg.model.path
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base}",
        "tags:",
        "- rlkit",
        f"- {stage}",
        "- trl",
        "---",
        "",
        f"# {out.name}",
        "",
        *([cfg.description, ""] if cfg.description else []),
        f"Trained with [rlkit](https://pypi.org/project/rlkit/) `{stage}` (recipe `{cfg.name}`) from `{base_path}`"
        f" on `{cfg.data.train}` with the `{cfg.data.template}` prompt template.",
        "",
        *([f"Precision: {_precision_line(cfg)}; weights saved as "
           f"{str(pick_dtype(cfg.model.dtype)).removeprefix('torch.')} (`model.dtype` {cfg.model.dtype}).", ""] if hasattr(cfg.train, "precision") else []),
        "## Results",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()],
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{out}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{out}")',
        "```",
        "",
        "## Config",
        "",
        "```yaml",
        to_yaml(cfg).rstrip(),
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def write_dataset_card(out: Path, cfg: RunConfig, metrics: dict) -> None:
    """The ``README.md`` of a data set that a command wrote (``rlkit sample``: SFT rows in ``data.jsonl``), as
    the Hugging Face hub shows it."""
    lines = ["---", "tags:", "- rlkit", f"- {cfg.kind}", "configs:", "- config_name: default",
             "  data_files: data.jsonl", "---", "", f"# {out.name}", "",
             *([cfg.description, ""] if cfg.description else []),
             f"Made with [rlkit](https://pypi.org/project/rlkit/) `{cfg.kind}` (recipe `{cfg.name}`) from "
             f"`{cfg.model.path}` on `{cfg.data.train}`: SFT rows (`messages`) in `data.jsonl`.", "",
             "| metric | value |", "| --- | --- |",
             *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()],
             "", "## Config", "", "```yaml", to_yaml(cfg).rstrip(), "```", ""]
    (out / "README.md").write_text("\n".join(lines))
