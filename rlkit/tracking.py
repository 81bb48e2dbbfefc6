"""Metrics to ``metrics.jsonl``, TensorBoard and W&B (``report_to``), rich progress bars, end-of-run plots.

Metric names are namespaced, ``<namespace>/<name>`` (only ``step`` is bare): ``policy/``, ``critic/``,
``kl/``, ``rollout/``, ``reward/<name>``, ``route/<route>/``, ``env/``, ``optim/``, ``time/<phase>`` (wall
seconds per phase, ``PhaseTimer``), ``eval/``; the trainers on TRL log ``train/`` and ``eval/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def quiet_libraries() -> None:
    """Keep the terminal for rlkit's own progress: no per-file download/loading bars, no advisory warnings."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "VLLM_LOGGING_LEVEL" not in os.environ:  # vLLM logs every weight reload at INFO
        os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"
        os.environ["RLKIT_QUIETED_VLLM"] = "1"
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")  # deprecated torch names in vLLM
    # TRL's own vLLM path (not used by rlkit) warns about vLLM versions it has not tested
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    try:
        import datasets
        import transformers

        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()  # no "Retrying in 8s" lines for a hub name it cannot reach
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def available(report_to: Iterable[str]) -> list[str]:
    """The requested sinks whose packages are installed (TensorBoard and W&B are optional extras)."""
    import importlib.util

    out = []
    for r in report_to:
        if r == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            continue
        if r == "wandb" and importlib.util.find_spec("wandb") is None:
            console.print("[yellow]report_to wandb: install rlkit[wandb]; skipping[/]")
            continue
        out.append(r)
    return out


class MetricsLogger:
    """Append one JSON object per step to ``metrics.jsonl``; mirror to TensorBoard / W&B when asked."""

    def __init__(self, output_dir: str | Path, report_to: Iterable[str] = ("jsonl",), run_name: str = "rlkit",
                 config: dict | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.report_to = set(available(report_to))
        self._tb = None
        self._wandb = None
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "runs"))
        if "wandb" in self.report_to:
            import wandb

            self._wandb = wandb.init(project="rlkit", name=run_name, config=config or {}, reinit=True)

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: _plain(v) for k, v in metrics.items()}
        if "jsonl" in self.report_to:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _rows(text: str) -> list[dict]:
    """Parse metrics.jsonl rows, skipping a line torn by a kill mid-write (or otherwise unreadable)."""
    out = []
    for line in text.split("\n"):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            out.append(row)
    return out


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return _rows(p.read_text(errors="replace"))


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: keep the rows up to the checkpoint's ``step`` and drop the killed run's later rows and any
    torn last line, rewriting the file atomically."""
    if path.is_file():
        keep = [r for r in read_metrics(path) if r["step"] <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(path)


def plot_metrics(path: str | Path, out_png: str | Path, keys: list[str], title: str = "") -> Path | None:
    """One panel per metric over steps; returns the PNG path, or None when there is nothing to plot."""
    rows = read_metrics(path)
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(series):]:
        ax.set_visible(False)
    for ax, (k, pts) in zip(axes.flat, series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@contextlib.contextmanager
def progress_bar(description: str, total: int) -> Iterator:
    """A rich progress bar; yields ``advance(n)``."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


class PhaseTimer:
    """``with timer("rollout"):`` accumulates wall time per named phase; ``pop()`` gives ``time/<phase>``.
    Thread-safe: asynchronous rollouts time their phases on a thread of their own."""

    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.times[name] += time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        with self._lock:
            out = {f"time/{k}": v for k, v in self.times.items()}
            self.times.clear()
        return out


class StepProgress:
    """A rich progress bar over steps showing a few metrics: ``fields`` are (metric, label, format) and a
    metric missing from a row is left out (``required`` ones show 0)."""

    def __init__(self, total: int, start: int, label: str, fields: list[tuple[str, str, str]],
                 required: tuple[str, ...] = ()):
        self.fields, self.required = fields, set(required)
        self.prog = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)
        self.task = self.prog.add_task(label, total=total, completed=start, info="")
        self.prog.start()

    def update(self, step: int, m: dict) -> None:
        info = "  ".join(f"{label} {m.get(k, 0):{fmt}}" for k, label, fmt in self.fields
                         if k in m or k in self.required)
        self.prog.update(self.task, completed=step, info=info)

    def note(self, text: str) -> None:
        self.prog.console.print(text)

    def close(self) -> None:
        self.prog.stop()
