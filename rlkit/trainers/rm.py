"""Reward modelling on human comparisons (Bradley-Terry), on TRL's ``RewardTrainer``.

Data: pairwise rows ``{prompt, chosen, rejected}`` or InstructGPT rankings ``{prompt, responses}`` (best
first). A ranking of K responses becomes all K·(K-1)/2 pairs, and, as in InstructGPT (Ouyang et al. 2022,
section 3.5), the pairs of one prompt are kept in one batch: a grouped batch sampler packs whole groups.
The model is a sequence classifier with one output, initialised from the given (SFT) model. A share of
the prompts (``rm.eval_fraction``) is held out and reported as pair accuracy and reward margin.

    rlkit rm                                            # embedded rankings on the embedded model
    rlkit rm --model outputs/sft --dataset comparisons.jsonl
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from rlkit import precision, runs
from rlkit.config import RunConfig
from rlkit.data import DataError, check_lengths, preference_rows
from rlkit.models import load_reward_model, load_tokenizer, pick_dtype
from rlkit.outputs import finish_run
from rlkit.templates import completion_text, render_prompt
from rlkit.tracking import MetricsLogger, available
from rlkit.trainers import hf_trainer
from rlkit.trainers.hf_trainer import checkpointing_arg, jsonl_callback, last_trainer_checkpoint, quiet_progress
from rlkit.trainers.sft import example_lengths, length_limit


class GroupBatchSampler(torch.utils.data.Sampler):
    """Batches of whole groups (all pairs of one prompt together), reshuffled every epoch."""

    def __init__(self, groups: list[int], batch_size: int, seed: int):
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        by: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            by.setdefault(g, []).append(i)
        self.groups = list(by.values())

    def _batches(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.groups)))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        batches, cur = [], []
        for gi in order:
            g = self.groups[gi]
            if cur and len(cur) + len(g) > self.batch_size:
                batches.append(cur)
                cur = []
            cur = cur + g
        if cur:
            batches.append(cur)
        return batches

    def __iter__(self):
        batches = self._batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self._batches(self.epoch))


def to_preference_examples(rows: list[dict], template: str, tokenizer) -> list[dict]:
    chat = template == "chat"
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template is 'chat' but the model's tokenizer has no chat template")
    out = []
    for r in rows:
        if chat:
            out.append({"prompt": [{"role": "user", "content": r["prompt"]}],
                        "chosen": [{"role": "assistant", "content": r["chosen"]}],
                        "rejected": [{"role": "assistant", "content": r["rejected"]}]})
        else:
            p = render_prompt(r["prompt"], template, tokenizer) if r["prompt"] else ""
            out.append({"prompt": p, "chosen": completion_text(r["chosen"], template),
                        "rejected": completion_text(r["rejected"], template)})
    return out


def run_rm(cfg: RunConfig, resume: str = "auto") -> dict:
    """Train (or resume) a reward model into ``cfg.output_dir``; ``resume``: auto | anyway | overwrite."""
    with runs.guarded_run(cfg, resume, last_trainer_checkpoint) as stop:
        return _run_rm(cfg, stop)


def _run_rm(cfg: RunConfig, stop: runs.GracefulStop) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    t0 = time.time()
    out = Path(cfg.output_dir)
    t = cfg.train
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"
    pairs = preference_rows(cfg.data.train, cfg.data.max_samples)
    groups = sorted({p["group"] for p in pairs})
    n_eval = int(len(groups) * cfg.rm.eval_fraction)
    held = set(random.Random(t.seed).sample(groups, n_eval)) if n_eval else set()
    train_pairs = [p for p in pairs if p["group"] not in held]
    eval_pairs = [p for p in pairs if p["group"] in held]
    if not train_pairs:
        raise DataError(f"{cfg.data.train}: no training pairs left after holding out {cfg.rm.eval_fraction:.0%}")
    from transformers import set_seed

    set_seed(t.seed)  # the fresh score head: the same seed gives the same reward model
    model = load_reward_model(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code, init=True).float()
    model.config.pad_token_id = tokenizer.pad_token_id  # fp32 master weights; bf16 compute is autocast's

    cuda = torch.cuda.is_available()
    resolved = precision.for_model(t.precision, cfg.model.path, cfg.model.trust_remote_code)
    bf16 = resolved == "bf16"
    precision.fp32_attention_on_cpu(model, resolved)
    args = RewardConfig(
        output_dir=str(out), max_steps=t.max_steps or -1, num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, seed=t.seed, logging_steps=t.logging_steps,
        save_steps=t.save_steps, save_total_limit=t.save_total_limit, bf16=bf16, use_cpu=not cuda,
        **checkpointing_arg(t.gradient_checkpointing), max_length=t.max_length,
        report_to=[r for r in available(cfg.report_to) if r in ("tensorboard", "wandb")] or "none",
        eval_strategy="no", center_rewards_coefficient=cfg.rm.center_rewards_coefficient,
        dataset_num_proc=None, logging_first_step=True, disable_tqdm=False,
    )
    logger = MetricsLogger(out, [r for r in cfg.report_to if r == "jsonl"], run_name=cfg.name)
    limit, why = length_limit(cfg)

    def fitting(pairs: list[dict]) -> list[tuple[dict, dict]]:
        examples = to_preference_examples(pairs, cfg.data.template, tokenizer)
        lengths = [max(a, b) for a, b in zip(example_lengths(examples, tokenizer, "chosen"),
                                              example_lengths(examples, tokenizer, "rejected"))]
        return check_lengths(list(zip(pairs, examples)), lengths, limit, cfg.data.train, cfg.data.on_overlong, why)

    train_kept = fitting(train_pairs)
    eval_kept = fitting(eval_pairs) if eval_pairs else []
    train_ds = Dataset.from_list([ex for _, ex in train_kept])
    eval_ds = Dataset.from_list([ex for _, ex in eval_kept]) if eval_kept else None
    train_groups = [p["group"] for p, _ in train_kept]

    class GroupedRewardTrainer(RewardTrainer):
        def get_train_dataloader(self):
            if not cfg.rm.group_batches or len(self.train_dataset) != len(train_groups):
                return super().get_train_dataloader()
            sampler = GroupBatchSampler(train_groups, self._train_batch_size, t.seed)
            dl = torch.utils.data.DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator)
            return self.accelerator.prepare(dl)

    trainer = GroupedRewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                   processing_class=tokenizer, callbacks=[jsonl_callback(logger)])
    quiet_progress(trainer)
    result = hf_trainer.train(trainer, out, stop, logger)
    metrics = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
               "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs)}
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics.update({"eval/pair_accuracy": ev.get("eval_accuracy"), "eval/margin": ev.get("eval_margin"),
                        "eval/loss": ev.get("eval_loss")})
        logger.log(trainer.state.global_step, {k: v for k, v in metrics.items() if k.startswith("eval/")})
    trainer.model.to(pick_dtype(cfg.model.dtype))  # model.dtype: the export dtype
    trainer.save_model(str(out))
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(out))
    metrics["seconds"] = round(time.time() - t0, 1)
    finish_run(out, cfg, logger, metrics, ["train/loss", "train/accuracy", "train/margin"], stage="reward-model",
               label="rm")
    return metrics
