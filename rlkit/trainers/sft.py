"""Supervised fine-tuning on demonstrations, on TRL's ``SFTTrainer``.

Data: conversational ``messages`` (the last turn is the assistant's demonstration), or ``prompt`` +
``completion`` strings rendered with the recipe's template (``chat``: as a user/assistant exchange;
``r1_zero``: the R1-Zero template; ``plain``: as is). The loss is on completions only by default.
Conversations become conversational prompt/completion pairs split at the last assistant turn, so the
completion-only loss works with any chat template (no ``{% generation %}`` markers needed).

Outputs a Hugging Face directory (merged weights when LoRA is on, plus ``adapter/``), a model card,
``metrics.jsonl`` and ``training.png``. Running the same command again resumes from the last
``checkpoint-N`` in the output directory.

    rlkit sft                                   # embedded demonstrations on the embedded model
    rlkit sft --model org/model --dataset demos.jsonl --set model.lora.r=16
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rlkit import precision, runs
from rlkit.config import RunConfig
from rlkit.data import DataError, check_lengths, sft_rows
from rlkit.models import context_length, load_causal_lm, load_tokenizer, lora_targets, pick_dtype
from rlkit.outputs import finish_run
from rlkit.templates import apply_chat, completion_text, render_prompt
from rlkit.tracking import MetricsLogger, available
from rlkit.trainers import hf_trainer
from rlkit.trainers.hf_trainer import checkpointing_arg, jsonl_callback, last_trainer_checkpoint, quiet_progress


def to_sft_examples(rows: list[dict], template: str, tokenizer, spec: str) -> list[dict]:
    """Rows -> TRL prompt/completion examples (conversational when a chat template applies). When some
    conversation has tool turns or a ``tools`` column (``rlkit sample`` with an environment writes such), every row
    becomes token ids with a ``completion_mask`` that is 1 on the assistant turns only (all of them, in those
    conversations: ``templates.conversation_tokens``; the ``tools`` go to the chat template). Other conversations
    train on their last assistant turn, as TRL's prompt/completion form does."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if has_chat and any(has_tool_turns(r) for r in rows):
        return _tokenized(to_sft_examples([{k: v for k, v in r.items() if k not in ("messages", "tools")} | _split(r)
                                           for r in rows],
                                          template, tokenizer, spec), rows, tokenizer, spec)
    out = []
    for i, r in enumerate(rows, 1):
        if "messages" in r:
            if not has_chat:
                raise DataError(
                    f"{spec}: row {i} is conversational but the model's tokenizer has no chat template; "
                    "use prompt/completion rows with data.template r1_zero or plain"
                )
            msgs = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
            out.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
        elif template == "chat" or isinstance(r["prompt"], list) or isinstance(r["completion"], list):
            if not has_chat:
                raise DataError(f"{spec}: row {i}: data.template is 'chat' (or the row is conversational) but the "
                                "model's tokenizer has no chat template")
            prompt, completion = r["prompt"], r["completion"]  # TRL's conversational prompt/completion as they are
            out.append({"prompt": prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}],
                        "completion": completion if isinstance(completion, list)
                        else [{"role": "assistant", "content": completion}]})
        else:
            out.append({"prompt": render_prompt(r["prompt"], template, tokenizer),
                        "completion": completion_text(r["completion"], template)})
    return out


def has_tool_turns(row: dict) -> bool:
    """A conversation with tool turns, or rows that carry the tools they were sampled with."""
    return bool(row.get("tools")) or ("messages" in row and any(m.get("role") == "tool" for m in row["messages"]))


def _split(row: dict) -> dict:
    """A conversational row as prompt/completion (multi-turn rows are tokenised whole by ``_tokenized``)."""
    if "messages" not in row:
        return {}
    msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def _tokenized(examples: list[dict], rows: list[dict], tokenizer, spec: str) -> list[dict]:
    """Every example as ``{input_ids, completion_mask}`` (TRL's processed form): a conversation through
    ``conversation_tokens``, a text prompt/completion with the completion (and EOS) masked in."""
    from rlkit.templates import TemplateError, conversation_tokens

    out = []
    for i, (ex, row) in enumerate(zip(examples, rows), 1):
        if isinstance(ex["prompt"], list) and has_tool_turns(row):
            msgs = [{k: m[k] for k in ("role", "content", "name") if k in m} for m in row.get("messages") or
                    ex["prompt"] + ex["completion"]]
            try:
                ids, mask = conversation_tokens(tokenizer, msgs, row.get("tools"))
            except TemplateError as e:
                raise DataError(f"{spec}: row {i}: {e}") from None
        elif isinstance(ex["prompt"], list):  # the last assistant turn, as TRL masks a conversational completion
            before = apply_chat(tokenizer, ex["prompt"], generation_prompt=True)
            full = apply_chat(tokenizer, ex["prompt"] + ex["completion"], generation_prompt=False)
            p = tokenizer(before, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            mask = [0] * len(p) + [1] * (len(ids) - len(p))
        else:  # text: the prompt as TRL tokenises it (special tokens added), the completion and EOS
            p = tokenizer(ex["prompt"])["input_ids"]
            c = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids, mask = p + c, [0] * len(p) + [1] * len(c)
        out.append({"input_ids": ids, "completion_mask": mask})
    return out


def example_lengths(examples: list[dict], tokenizer, second: str = "completion") -> list[int]:
    """Tokens of prompt + ``second`` for each TRL example (conversational or text; text gets an EOS)."""
    out = []
    for ex in examples:
        if "input_ids" in ex:
            out.append(len(ex["input_ids"]))
        elif isinstance(ex["prompt"], list):
            text = apply_chat(tokenizer, ex["prompt"] + ex[second], generation_prompt=False)
            out.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            out.append(len(tokenizer(ex["prompt"] + ex[second], add_special_tokens=False)["input_ids"]) + 1)
    return out


def length_limit(cfg: RunConfig) -> tuple[int, str]:
    """train.max_length, capped by the model's context; and the reason text for over-long rows."""
    context = context_length(cfg.model.path, cfg.model.trust_remote_code)
    if context is not None and context < cfg.train.max_length:
        return context, f"more than the model's context of {context} tokens"
    return cfg.train.max_length, f"more than train.max_length {cfg.train.max_length}"


def run_sft(cfg: RunConfig, resume: str = "auto") -> dict:
    """Train (or resume), save a Hugging Face directory in ``cfg.output_dir``, return headline metrics.
    ``resume``: auto | anyway | overwrite (see :mod:`rlkit.runs`)."""
    with runs.guarded_run(cfg, resume, last_trainer_checkpoint) as stop:
        return _run_sft(cfg, stop)


def _run_sft(cfg: RunConfig, stop: runs.GracefulStop) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    t0 = time.time()
    out = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"
    rows = sft_rows(cfg.data.train, cfg.data.max_samples)
    examples = to_sft_examples(rows, cfg.data.template, tokenizer, cfg.data.train)
    limit, why = length_limit(cfg)
    examples = check_lengths(examples, example_lengths(examples, tokenizer), limit, cfg.data.train,
                             cfg.data.on_overlong, why)
    from rlkit.evaluation import check_eval_rows, eval_engine, eval_rows, eval_spec, evaluate_model

    eval_at = eval_spec(cfg)  # the held-out rows are read and checked before training, not after it
    template = cfg.eval.template or cfg.data.template
    if eval_at:
        eval_at, eval_data = eval_rows(cfg.eval, eval_at, cfg.data)
        check_eval_rows(eval_data, eval_at, template, tokenizer, cfg.model.path, cfg.eval.max_new_tokens)
    resolved = precision.for_model(cfg.train.precision, cfg.model.path, cfg.model.trust_remote_code)
    bf16 = resolved == "bf16"
    # fp32 master weights (bf16 compute is autocast's); a frozen base under LoRA: precision.frozen_dtype
    model = load_causal_lm(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code).to(
        precision.frozen_dtype(resolved) if cfg.model.lora is not None else torch.float32)
    precision.fp32_attention_on_cpu(model, resolved)

    peft_config = None
    if cfg.model.lora is not None:
        from peft import LoraConfig

        lc = cfg.model.lora
        peft_config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                 target_modules=lora_targets(model, lc.target_modules), task_type="CAUSAL_LM")

    t = cfg.train
    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(out),
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        seed=t.seed,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        **checkpointing_arg(t.gradient_checkpointing),
        bf16=bf16,
        use_cpu=not cuda,
        report_to=[r for r in available(cfg.report_to) if r in ("tensorboard", "wandb")] or "none",
        max_length=t.max_length,
        completion_only_loss=cfg.sft.completion_only_loss,
        packing=cfg.sft.packing,
        dataset_num_proc=None,
        save_only_model=False,
        logging_first_step=True,
        disable_tqdm=False,  # rlkit quiets library logging, which would otherwise turn the bar off
    )
    # TensorBoard and W&B come from the trainer's own callbacks; metrics.jsonl from ours.
    logger = MetricsLogger(out, [r for r in cfg.report_to if r == "jsonl"], run_name=cfg.name)
    text_config = model.config.get_text_config()
    asks_router_logits = getattr(text_config, "output_router_logits", None)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[jsonl_callback(logger)],
    )
    if asks_router_logits is not None:
        # MoE: TRL adds the router's load-balancing loss (the config's router_aux_loss_coef) by passing
        # output_router_logits=True to each training forward, and also switches it on in the config. Left on there,
        # generation (the eval below; later stages loading the saved model) computes that loss at each decode step
        # against the whole sequence's attention mask and fails (transformers: "size of tensor a (64) must match
        # ... b (1216)"). The config keeps the model's own setting.
        text_config.output_router_logits = asks_router_logits
    quiet_progress(trainer)
    result = hf_trainer.train(trainer, out, stop, logger)

    final = trainer.model
    if peft_config is not None:
        final.save_pretrained(str(out / "adapter"))
        final = final.merge_and_unload()
    final.to(pick_dtype(cfg.model.dtype)).save_pretrained(str(out))  # model.dtype: the export dtype
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(out))

    metrics = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
               "examples": len(examples), "seconds": round(time.time() - t0, 1)}
    if eval_at:
        final.eval()
        # the configured engine on the model just trained (hf: in memory; vllm: the directory just written)
        engine = eval_engine(cfg.rollout, tokenizer, str(out), cfg.model.dtype, cfg.eval, eval_data, template,
                             model=final)
        try:
            report = evaluate_model(final, tokenizer, eval_data, cfg.eval, template, engine=engine)
        finally:
            engine.close()
        metrics.update({f"eval/{k}": v for k, v in report.metrics.items()})
        logger.log(trainer.state.global_step, {f"eval/{k}": v for k, v in report.metrics.items()})
    finish_run(out, cfg, logger, metrics, ["train/loss", "train/learning_rate", "train/grad_norm"], stage="sft")
    return metrics
