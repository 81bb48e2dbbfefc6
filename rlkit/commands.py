"""The one table of commands: what ``rlkit sft|rm|grpo|ppo|sample``, :mod:`rlkit.api` and a pipeline stage
of each kind run, and how the command line shows the result.

Runners are ``"module:function"`` references, imported on first use, so the command line starts (and
``--help`` answers) without importing torch. ``rlkit eval`` is not here: it runs a model directory, not
a config of its own kind (its config borrows grpo's), and returns a report, not a run's metrics.

>>> [c.name for c in COMMANDS.values()]
['sft', 'rm', 'grpo', 'ppo', 'sample']
>>> for_kind("ppo").runner
'rlkit.trainers.rl:run_rl'
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Literal

from rlkit.errors import RlkitError


@dataclass(frozen=True)
class Command:
    name: str                                 # the CLI command, the rlkit.api function
    kind: str                                 # the config kind it runs (RunConfig.kind), also a pipeline stage's kind
    runner: str                               # "module:function" taking the config (and resume= when resumable)
    default_recipe: str                       # the recipe it runs when given none
    summary: Literal["before_after", "metrics"]  # the CLI's result: eval before vs after training, or a table
    headline: tuple[str, ...]                 # prefixes of the metrics `rlkit run` shows for a stage of this kind
    help: str                                 # the CLI command's help text
    resumable: bool = True                    # runner takes resume=auto|anyway|overwrite (--resume-anyway, --overwrite)
    max_steps: bool = True                    # the command offers --max-steps (train.max_steps)
    writes: str = ""                          # the file under output_dir it writes its result to, if one

    def load_runner(self) -> Callable[..., dict]:
        module, fn = self.runner.split(":")
        return getattr(importlib.import_module(module), fn)

    def run(self, cfg: Any, resume: str = "auto") -> dict:
        """Run ``cfg`` (a :class:`rlkit.config.RunConfig` of this kind); ``resume``: auto | anyway | overwrite."""
        if not self.resumable:
            if resume != "auto":
                raise RlkitError(f"rlkit {self.name} does not resume a run (resume={resume!r})")
            return self.load_runner()(cfg)
        return self.load_runner()(cfg, resume=resume)


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("sft", "sft", "rlkit.trainers.sft:run_sft", "sft", "metrics", ("eval/pass@1", "train_loss"),
            "Supervised fine-tuning on demonstrations (TRL SFTTrainer). With no arguments: the embedded world."),
    Command("rm", "rm", "rlkit.trainers.rm:run_rm", "rm", "metrics", ("eval/pair_accuracy", "train_loss"),
            "Train a Bradley-Terry reward model on comparisons or rankings (TRL RewardTrainer)."),
    Command("grpo", "grpo", "rlkit.trainers.rl:run_rl", "r1_zero", "before_after", ("after/pass@1",),
            "GRPO with rule-based rewards (default recipe: r1_zero). Run it again after a crash to resume."),
    Command("ppo", "ppo", "rlkit.trainers.rl:run_rl", "ppo", "before_after", ("after/pass@1",),
            "PPO against a reward model with a value model, GAE and a KL penalty (default recipe: ppo)."),
    Command("sample", "sample", "rlkit.trainers.sample:run_sample", "sample", "metrics", ("kept",),
            "Rejection sampling: N samples per prompt, keep the verified ones, write SFT-ready JSONL.",
            resumable=False, max_steps=False, writes="data.jsonl"),
)}


def for_kind(kind: str) -> Command:
    """The command that runs a config of ``kind`` (a pipeline stage's)."""
    for c in COMMANDS.values():
        if c.kind == kind:
            return c
    raise RlkitError(f"no command runs a config of kind '{kind}'; kinds: {', '.join(c.kind for c in COMMANDS.values())}")
