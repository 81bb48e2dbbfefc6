"""Shipped accelerate configs (as TRL ships ``accelerate_configs/``): ``ddp``, ``fsdp2``, ``zero2``, ``zero3``.

    accelerate launch --config_file $(rlkit config-path fsdp2) --num_processes 8 -m rlkit grpo ...

>>> config_path("fsdp2").name
'fsdp2.yaml'
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from rlkit.errors import RlkitError

CONFIGS = {
    "ddp": "data parallel: a whole model per process",
    "fsdp2": "FSDP2: parameters, gradients and optimizer state sharded, one transformer block per unit",
    "zero2": "DeepSpeed ZeRO-2 (GPU; sft and rm through TRL)",
    "zero3": "DeepSpeed ZeRO-3 (GPU; sft and rm through TRL)",
}


def config_path(name: str) -> Path:
    """The shipped accelerate config file called ``name``."""
    if name not in CONFIGS:
        close = difflib.get_close_matches(name, list(CONFIGS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise RlkitError(f"unknown accelerate config '{name}'; {hint}shipped: {', '.join(CONFIGS)}")
    return Path(str(resources.files("rlkit.accelerate_configs"))) / f"{name}.yaml"
