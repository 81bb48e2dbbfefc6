"""Recipes: YAML files in ``recipes/`` (installed as ``rlkit.recipes``), loaded by name or by path.

>>> "sft" in list_recipes()
True
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from rlkit.config import ConfigError, RunConfig, build_config
from rlkit.config_files import load_yaml, parse_set
from rlkit.nested import nest


def recipes_dir() -> Path:
    """The installed recipes, or the source tree's ``recipes/`` when running from a checkout."""
    try:
        installed = Path(str(resources.files("rlkit.recipes")))
        if any(installed.glob("*.yaml")):
            return installed
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description."""
    out = {}
    for p in sorted(recipes_dir().glob("*.yaml")):
        out[p.stem] = str(load_yaml(p).get("description", ""))
    return out


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"{p}: recipe file not found")
        return p
    candidate = recipes_dir() / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    names = list(list_recipes())
    guess = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"did you mean '{guess[0]}'? " if guess else ""
    raise ConfigError(f"unknown recipe '{name_or_path}'; {hint}known recipes: {', '.join(names)}")


def load_config(
    recipe: str | None,
    *,
    default_recipe: str,
    sets: list[str] | None = None,
    flags: dict | None = None,
    kind: str | None = None,
) -> RunConfig:
    """Resolve defaults < recipe < ``--set`` < named flags into one validated config."""
    path = recipe_path(recipe or default_recipe)
    layers = [(str(path), load_yaml(path)), ("--set", parse_set(sets)), ("command-line flags", nest(flags or {}))]
    cfg = build_config(layers)
    if kind is not None and cfg.kind != kind:
        raise ConfigError(f"{path}: recipe is of kind '{cfg.kind}', but this command runs '{kind}'")
    return cfg

