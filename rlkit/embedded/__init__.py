"""The offline default world: a tiny pretrained model with a chat template, and built-in tasks.

The model ships inside the package (``rlkit/embedded/model``); ``python -m rlkit.embedded.build``
rebuilds it from scratch on a synthetic corpus (see :mod:`rlkit.embedded.build`). If the shipped copy is
missing, the first use rebuilds it into ``$RLKIT_CACHE`` (default ``~/.cache/rlkit``).
"""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED = Path(__file__).parent / "model"


def cache_dir() -> Path:
    return Path(os.environ.get("RLKIT_CACHE", Path.home() / ".cache" / "rlkit"))


def model_dir() -> Path:
    """Directory of the embedded base model, rebuilding it into the cache if it is not shipped."""
    if (SHIPPED / "config.json").is_file():
        return SHIPPED
    cached = cache_dir() / "embedded-model"
    if not (cached / "config.json").is_file():
        from rlkit.embedded.build import DEFAULT_STEPS, train

        print(f"rlkit: building the embedded model into {cached} (one time, a few minutes)", flush=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        train(cached, steps=DEFAULT_STEPS, seed=0)
    return cached
