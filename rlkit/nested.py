"""Nested config dicts and their dotted keys: ``{"train": {"max_steps": 5}}`` <-> ``{"train.max_steps": 5}``."""

from __future__ import annotations

from typing import Any


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf; an empty section stays a leaf (its value ``{}``), lists are leaves.

    >>> flatten({"train": {"max_steps": 5, "seed": 1}, "rewards": [{"name": "accuracy"}], "model": {}})
    {'train.max_steps': 5, 'train.seed': 1, 'rewards': [{'name': 'accuracy'}], 'model': {}}
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def nest(flat: dict[str, Any]) -> dict:
    """Dotted keys -> a nested dict, leaving out the keys whose value is None (a flag not given).

    >>> nest({"model.path": "embedded", "train.max_steps": None, "output_dir": "out"})
    {'model': {'path': 'embedded'}, 'output_dir': 'out'}
    """
    out: dict = {}
    for key, value in flat.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
