"""Built-in rewards and the reward registry.

A reward is a plain function ``(completions, **columns) -> list[float | None]`` registered by name;
``None`` means "not applicable to this sample". Third-party rewards come in by dotted path
(``my_pkg.my_module:my_reward`` or ``my_pkg.my_module.my_reward``) or through the ``rlkit.rewards``
entry-point group. This package is installed as ``rlkit.rewards``.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import Callable

from rlkit.errors import RlkitError, first_line

RewardFn = Callable[..., list]
REWARDS: dict[str, RewardFn] = {}
_BUILTIN_MODULES = ("rlkit.rewards.math_answer", "rlkit.rewards.format", "rlkit.rewards.length", "rlkit.rewards.model",
                    "rlkit.rewards.reasoning_tasks", "rlkit.rewards.code")


class RewardError(RlkitError):
    pass


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make a reward function available by name."""

    def deco(fn: RewardFn) -> RewardFn:
        known = REWARDS.get(name)
        # The same file imported under another module name (a doctest run) never replaces rlkit.rewards.*
        same_source = known is not None and known.__code__.co_filename == fn.__code__.co_filename
        if not (same_source and known.__module__.startswith("rlkit.")):
            REWARDS[name] = fn
        return fn

    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def import_user_module(module: str):
    """Import a user's module (a reward, a tool, an environment); the working directory counts, as with
    ``python -m`` (the ``rlkit`` console script does not put it on the path)."""
    import sys

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0] or "" in sys.path or "." in sys.path:
            raise
        sys.path.append("")
        return importlib.import_module(module)


def get_reward(name: str) -> RewardFn:
    """A reward by registered name, dotted path, or ``rlkit.rewards`` entry point."""
    _load_builtins()
    if name in REWARDS:
        return REWARDS[name]
    for ep in entry_points(group="rlkit.rewards"):
        if ep.name == name:
            try:
                return ep.load()
            except (Exception, SystemExit) as e:
                raise RewardError(f"reward '{name}': entry point {ep.value} failed to import ({first_line(e)})") from None
    if "." in name or ":" in name:
        module, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
        try:
            fn = getattr(import_user_module(module), attr)
        except AttributeError:
            raise RewardError(f"reward '{name}': module '{module}' has no attribute '{attr}'") from None
        except SyntaxError as e:
            where = f"{e.filename}:{e.lineno}" if e.filename else module
            raise RewardError(f"reward '{name}': {where}: syntax error ({e.msg})") from None
        except (Exception, SystemExit) as e:  # ImportError, or whatever the module raised (or exited with) importing
            raise RewardError(f"reward '{name}': module '{module}' failed to import "
                              f"({type(e).__name__}: {first_line(e)})") from None
        if not callable(fn):
            raise RewardError(f"reward '{name}': '{attr}' is not callable")
        return fn
    known = sorted(REWARDS) + sorted(ep.name for ep in entry_points(group="rlkit.rewards"))
    guess = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{guess[0]}'? " if guess else ""
    raise RewardError(f"unknown reward '{name}'; {hint}known rewards: {', '.join(known)} (or a dotted path)")
