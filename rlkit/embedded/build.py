"""Build the embedded base model: a tiny Llama pretrained here on a synthetic corpus.

    python -m rlkit.embedded.build [--output DIR] [--steps N] [--seed S]

The corpus is arithmetic written three ways, so that the base model leaves room for RL and gives it
something to amplify:

- *careful* (35%): digit-by-digit working with carries inside ``<think>``, then the exact sum;
- *rough* (50%): both numbers rounded to tens inside ``<think>``, then the rough sum (right ~9% of the time);
- *sloppy* (15%): no tags, or no ``<answer>`` tags: the format reward has something to fix.

Documents use the R1-Zero template (plain text) or the ChatML chat template. Greedy decoding follows the
most frequent mode (rough), so greedy accuracy starts low; sampling finds the careful mode often enough
that GRPO can learn to prefer it. A quarter of the documents (``CALCULATOR_SHARE``) are chat conversations
that offer a calculator tool on sums of 3- to 4-digit numbers (the ``calculator`` task), used rarely or
badly (``TOOL_MODES``): room for ``--recipe calculator`` to teach the tool. Test-split questions never
appear in the corpus.

The tokenizer is a byte-level BPE trained on the same corpus with digits split one per token and the
R1 tags as single tokens. Everything is seeded: the same command gives the same model on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from rlkit.embedded.tasks import arithmetic_question, careful_reasoning, task_split
from rlkit.templates import R1_ZERO

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>"]

# ChatML with tools: given ``tools=`` (JSON schemas, transformers' convention) a system turn lists them as
# ``tools : name(arg , ...)`` (a system message's text goes first in that turn); a tool's answer is a ``tool`` turn;
# the model calls a tool with ``<tool_call> {"name": ..., "arguments": {...}} </tool_call>`` (Qwen/Hermes JSON).
# Without tools it renders exactly as before.
CHAT_TEMPLATE = (
    "{% set ns = namespace(skip=false) %}"
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n' }}{% set ns.skip = true %}{% endif %}"
    "{{ 'tools :' }}"
    "{% for tool in tools %}{% set f = tool['function'] if tool['function'] is defined else tool %}"
    "{{ ' ' + f['name'] + '(' + (f['parameters']['properties'] | list | join(' , ')) + ')' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (loop.first and ns.skip) %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# the system turn the template renders for the calculator tool (rlkit.env.calculator), as the corpus writes it
CALCULATOR_SYSTEM = "<|im_start|>system\ntools : calculator(expression)<|im_end|>\n"

DEFAULT_STEPS = 1600  # 1200 before the calculator share (issue 20): R1-Zero then reached only 95.8%

MODES = (("careful", 0.35), ("rough", 0.50), ("sloppy", 0.15))
# Calculator documents (a share of the corpus): questions of 3 to 4 digits with the calculator tool offered.
# The model mostly answers in its head (a sum of numbers rounded to hundreds: almost always wrong), and when it
# calls the tool it often does so badly: with the rounded numbers, or ignoring the result. Greedy decoding
# answers in its head; sampling finds a good call and its use often enough for RL to learn from.
CALCULATOR_SHARE = 0.25
TOOL_MODES = (("head", 0.55), ("tool", 0.12), ("tool_rounded", 0.18), ("tool_ignored", 0.15))


def _round10(x: int) -> int:
    return (x + 5) // 10 * 10


def completion_text(a: int, b: int, mode: str, rng: random.Random) -> str:
    """One assistant answer in the given mode (without the template around it)."""
    if mode == "careful":
        return f"<think> {careful_reasoning(a, b)} </think> <answer> {a + b} </answer>"
    ra, rb = _round10(a), _round10(b)
    rough = f"<think> roughly : {a} is about {ra} , {b} is about {rb} , so about {ra + rb} </think>"
    if mode == "rough":
        return f"{rough} <answer> {ra + rb} </answer>"
    guess = a + b if rng.random() < 0.5 else ra + rb
    return rng.choice([f"the answer is {guess} .", f"{rough} {guess}", f"{guess}"])


def _round100(x: int) -> int:
    return (x + 50) // 100 * 100


def tool_call_text(expression: str) -> str:
    return "<tool_call> " + json.dumps({"name": "calculator", "arguments": {"expression": expression}}) + " </tool_call>"


def calculator_doc(a: int, b: int, mode: str) -> str:
    """One chat document of the calculator task (the template's rendering of the conversation)."""
    ra, rb = _round100(a), _round100(b)
    head = f"<think> roughly : {a} is about {ra} , {b} is about {rb} , so about {ra + rb} </think> <answer> {ra + rb} </answer>"
    turns = [f"<|im_start|>user\n{arithmetic_question(a, b)}<|im_end|>\n"]
    if mode == "head":
        turns.append(f"<|im_start|>assistant\n{head}<|im_end|>\n")
    else:
        x, y = (ra, rb) if mode == "tool_rounded" else (a, b)
        answer = ra + rb if mode == "tool_ignored" else x + y
        turns += [f"<|im_start|>assistant\n{tool_call_text(f'{x} + {y}')}<|im_end|>\n",
                  f"<|im_start|>tool\n{x + y}<|im_end|>\n",
                  f"<|im_start|>assistant\n<answer> {answer} </answer><|im_end|>\n"]
    return CALCULATOR_SYSTEM + "".join(turns) + "<|endoftext|>"


def corpus(n_docs: int, seed: int) -> list[str]:
    """The synthetic pretraining documents (train-split questions only)."""
    rng = random.Random(seed)
    train = task_split("arithmetic", "train")
    names, weights = zip(*MODES)
    calc_rng = random.Random(seed + 1)
    calc_train = task_split("calculator", "train")
    tool_names, tool_weights = zip(*TOOL_MODES)
    docs = []
    for _ in range(n_docs):
        if calc_rng.random() < CALCULATOR_SHARE:
            row = calc_rng.choice(calc_train)
            docs.append(calculator_doc(row["a"], row["b"], calc_rng.choices(tool_names, tool_weights)[0]))
            continue
        row = rng.choice(train)
        a, b = row["a"], row["b"]
        mode = rng.choices(names, weights)[0]
        answer = completion_text(a, b, mode, rng)
        if rng.random() < 0.55:
            docs.append(R1_ZERO.format(prompt=arithmetic_question(a, b)) + " " + answer + "<|endoftext|>")
        else:
            docs.append(
                f"<|im_start|>user\n{arithmetic_question(a, b)}<|im_end|>\n"
                f"<|im_start|>assistant\n{answer}<|im_end|>\n<|endoftext|>"
            )
    return docs


def build_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    # The R1 tags are single tokens but not special: decoding with skip_special_tokens keeps them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=512,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _blocks(docs: list[str], tokenizer, block: int) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


def greedy_accuracy(model, tokenizer, template: str = "r1_zero") -> dict:
    """Greedy pass@1 and format rate on the whole test split, scored as ``rlkit eval`` scores."""
    from rlkit.config import EvalConfig
    from rlkit.evaluation import evaluate_model

    report = evaluate_model(model, tokenizer, task_split("arithmetic", "test"), EvalConfig(), template)
    return {"accuracy": report.metrics["pass@1"], "format": report.metrics["format"]}


def train(output: Path, steps: int, seed: int, block: int = 256, batch: int = 16, lr: float = 3e-3) -> dict:
    t0 = time.time()
    torch.manual_seed(seed)
    docs = corpus(n_docs=steps * batch * block // 60, seed=seed)
    tokenizer = build_tokenizer(docs[:20000], vocab_size=640)
    model = build_model(len(tokenizer), tokenizer, seed)
    data = _blocks(docs, tokenizer, block)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    for step in range(steps):
        idx = order[(step * batch) % len(order) : (step * batch) % len(order) + batch]
        x = data[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)
    stats = {
        "r1_zero": greedy_accuracy(model, tokenizer, "r1_zero"),
        "chat": greedy_accuracy(model, tokenizer, "chat"),
    }
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"steps": steps, "seed": seed, "block": block, "batch": batch, "lr": lr,
            "seconds": round(time.time() - t0, 1), "greedy_test": stats}
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=Path(__file__).parent / "model")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(json.dumps(train(a.output, a.steps, a.seed), indent=2))


if __name__ == "__main__":
    main()
