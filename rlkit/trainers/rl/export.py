"""What an RL run writes: atomic checkpoints (and reading them back), the final Hugging Face directory (LoRA
merged, the adapter and the critic beside it) and the result file, plot and model card.

A checkpoint is ``checkpoint-<step>/``: the policy in Hugging Face format, ``critic/`` (PPO), and
``rlkit_state/`` (rlkit.checkpoint: optimizer, scheduler, RNG per process, and the loop's ``state``:
step, data_pos, kl_controller, history, max_steps, ptx_pos). It is written under a temporary name and renamed.
"""

from __future__ import annotations

import time
from pathlib import Path

from rlkit import checkpoint as ckpt
from rlkit.outputs import finish_run
from rlkit.tracking import read_metrics, truncate_metrics
from rlkit.trainers import sharding


def _cast(state: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _strip(state: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def loop_state(step: int, data_pos: int, kl_ctl, history: dict, max_steps: int, ptx) -> dict:
    """The loop's own part of ``rlkit_state/``: what resume needs beyond the models and optimizers
    (``data_pos``: the prompt stream's position after the last batch trained on)."""
    return {"step": step, "data_pos": data_pos, "kl_controller": kl_ctl.state_dict(), "history": history,
            "max_steps": max_steps, "ptx_pos": ptx.pos if ptx else 0}


def save_checkpoint(acc, out: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int,
                    extra: dict | None = None, critic=None, sharded: bool = False) -> None:
    """``critic``: the TokenCritic (its classifier is saved). ``sharded``: FSDP2; the full model is gathered
    onto the main process for the Hugging Face export and each process writes its optimizer shard."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.begin(out, step)
    acc.wait_for_everyone()
    tmp = ckpt.tmp_dir(out, step)
    ckpt.save_process_state(tmp, acc.process_index)
    full = sharding.full_state_dict(model) if sharded else None
    full_critic = sharding.full_state_dict(critic) if sharded and critic is not None else None
    if sharded:
        ckpt.save_optimizer_shards(tmp, acc.process_index, optimizer, extra)
    if acc.is_main_process:
        ckpt.save_main_state(tmp, model, tokenizer, optimizer, scheduler, state, extra, state_dict=full,
                             sharded=sharded)
        if critic is not None:
            critic.model.save_pretrained(tmp / "critic", state_dict=_strip(full_critic, "model.") if sharded else None)
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.commit(out, step, keep)
    acc.wait_for_everyone()


def restore(resume_from: Path, out: Path, acc, optimizer, scheduler, extra: dict, lr: float, critic=None,
            critic_lr: float | None = None, sharded: bool = False) -> dict:
    """Load the optimizers, schedules and RNG of ``resume_from`` (the learning rates set to today's: a resume
    with --resume-anyway may change them) and return the loop's ``state`` (see ``loop_state``)."""
    state = ckpt.load_state(resume_from, acc.process_index, optimizer, scheduler, extra,
                            world=acc.num_processes if sharded else None)
    ckpt.apply_learning_rate(optimizer, scheduler, lr)
    if critic is not None:
        ckpt.apply_learning_rate(critic.optimizer, critic.scheduler, critic_lr)
    if acc.is_main_process:
        print(f"resuming from {resume_from} (step {state['step']})", flush=True)
        truncate_metrics(out / "metrics.jsonl", state["step"])
    return state


def export_final(acc, out: Path, cfg, policy, unwrapped, tokenizer, critic=None, sharded: bool = False) -> None:
    """The final Hugging Face directory (merged with LoRA, the adapter beside it) and the critic, in
    model.dtype (the weights trained in fp32). Sharded: the full models are gathered onto the main process (a
    collective), which writes them."""
    from rlkit.models import pick_dtype

    dtype = pick_dtype(cfg.model.dtype)
    if sharded:
        full_policy = _cast(sharding.full_state_dict(policy), dtype)
        full_critic = sharding.full_state_dict(critic.model) if critic is not None else None
    if not acc.is_main_process:
        return
    if sharded:
        unwrapped.save_pretrained(str(out), state_dict=full_policy)
        if critic is not None:
            critic.model.model.save_pretrained(str(out / "critic"), state_dict=_strip(full_critic, "model."))
    else:
        if cfg.model.lora is not None:
            unwrapped.save_pretrained(str(out / "adapter"))  # the adapter first: merging folds it away
        final = unwrapped.merge_and_unload() if cfg.model.lora is not None else unwrapped
        final.to(dtype).save_pretrained(str(out))  # the run is over: the trained weights are not needed in fp32
        if critic is not None:
            acc.unwrap_model(critic.model).model.save_pretrained(str(out / "critic"))
    tokenizer.save_pretrained(str(out))


def last_eval(path: Path) -> dict:
    """The last row's ``eval/*`` metrics in metrics.jsonl (the after-training evaluation)."""
    last: dict = {}
    for row in read_metrics(path):
        ev = {k: v for k, v in row.items() if k.startswith("eval/")}
        if ev:
            last = ev
    return last


def write_result(out: Path, cfg, logger, result: dict, history: dict, t_start: float, plot_keys: list[str]) -> dict:
    """Before/after evaluation into ``result``, then (outputs.finish_run) the plot, model card and result file."""
    after = last_eval(out / "metrics.jsonl")
    before = history.get("before", {})
    result.update({"before/" + k.removeprefix("eval/"): v for k, v in before.items() if "seconds" not in k})
    result.update({"after/" + k.removeprefix("eval/"): v for k, v in after.items() if "seconds" not in k})
    result["seconds"] = round(time.time() - t_start, 1)
    finish_run(out, cfg, logger, result, plot_keys, stage=cfg.kind)
    return result
