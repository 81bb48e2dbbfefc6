"""Old and short spellings onto today's shape, in one step.

Every config layer (a recipe, ``--set``, the named flags, a pipeline's defaults and stages) passes through
:func:`upgrade_layer` before it is merged, and every config an older rlkit recorded (a run's
``rlkit_run.json``, a pipeline manifest) through :func:`upgrade_dump`, so the spellings users type keep
working (``--set rl.beta=0.04``, ``rl.kl_in=reward``, ``rl.advantage=rloo``, ``rl.epsilon_high=0.28``,
``rl.engine=vllm``) and old runs resume with their finished stages kept.

    rl.beta: 0.04 / 0       -> rl.kl.coef: 0.04 / rl.kl: null (no KL term, no reference model)
    rl.kl_estimator, rl.kl_in, rl.kl_controller, rl.kl_target, rl.kl_horizon
                            -> rl.kl.estimator, .where, .controller, .target, .horizon
    rl.advantage: NAME      -> rl.advantage: {name: NAME}
    rl.std_normalize, rl.gamma, rl.lam, rl.whiten_advantages, rl.value_model, rl.value_learning_rate,
    rl.value_clip           -> rl.advantage.<key> (whiten_advantages: whiten)
    rl.policy_loss: NAME    -> rl.policy_loss: {name: NAME}
    rl.epsilon, rl.epsilon_high, rl.dual_clip -> rl.policy_loss.<key>
    rl.ptx_coef: c / 0, rl.ptx_data, rl.ptx_batch_size -> rl.ptx: {coef, data, batch_size} / rl.ptx: null
    rl.dynamic_sampling: true / false, rl.max_resample_rounds -> rl.dynamic_sampling: {max_rounds} / null
    rl.engine, rl.hf_cache  -> rollout.engine, rollout.hf_cache
    rollout.tis_cap         -> rl.tis_cap (a correction in the loss, for engines that are not the trainer)
    train.bf16: true / false / null -> train.precision: bf16 / fp32 / auto
"""

from __future__ import annotations

import copy
from typing import Any

from rlkit.errors import ConfigError

_KL = {"beta": "coef", "kl_estimator": "estimator", "kl_in": "where", "kl_controller": "controller",
       "kl_target": "target", "kl_horizon": "horizon"}
_ADVANTAGE = {"std_normalize": "std_normalize", "gamma": "gamma", "lam": "lam", "whiten_advantages": "whiten",
              "value_model": "value_model", "value_learning_rate": "value_learning_rate", "value_clip": "value_clip"}
_LOSS = {"epsilon": "epsilon", "epsilon_high": "epsilon_high", "dual_clip": "dual_clip"}
_PTX = {"ptx_coef": "coef", "ptx_data": "data", "ptx_batch_size": "batch_size"}
_DYNAMIC = {"max_resample_rounds": "max_rounds"}
# (old section, key) -> (new section, key)
MOVED_KEYS = {("rl", "engine"): ("rollout", "engine"), ("rl", "hf_cache"): ("rollout", "hf_cache"),
              ("rollout", "tis_cap"): ("rl", "tis_cap")}

# What an older rlkit recorded for each old key when it was not used (a full dump prints every key): set to
# these values in a part that is off, the old keys did nothing then and are dropped now.
OLD_DEFAULTS = {"beta": 0.0, "kl_estimator": "k3", "kl_in": "loss", "kl_controller": "fixed", "kl_target": None,
                "kl_horizon": 10000, "std_normalize": "group", "gamma": 1.0, "lam": 0.95, "whiten_advantages": True,
                "value_model": "policy", "value_learning_rate": None, "value_clip": 0.2, "epsilon": 0.2,
                "epsilon_high": None, "dual_clip": None, "ptx_coef": 0.0, "ptx_data": None, "ptx_batch_size": 8,
                "max_resample_rounds": 3}

# Every old spelling under rl: -> the part of rl it now lives in.
OLD_RL_KEYS = {**{k: ("kl", v) for k, v in _KL.items()}, **{k: ("advantage", v) for k, v in _ADVANTAGE.items()},
               **{k: ("policy_loss", v) for k, v in _LOSS.items()}, **{k: ("ptx", v) for k, v in _PTX.items()},
               **{k: ("dynamic_sampling", v) for k, v in _DYNAMIC.items()}}


def upgrade_layer(layer: dict, source: str = "config", *, dump: bool = False) -> tuple[dict, dict[str, str]]:
    """``layer`` in today's shape, and ``{new key path: the old spelling used}`` for error messages.

    ``dump``: the layer is a full config an older rlkit recorded: a key its run did not use (a KL option with
    ``beta: 0``, ``gamma`` with group advantages) is dropped instead of refused."""
    if not isinstance(layer, dict):
        return layer, {}
    out = copy.deepcopy(layer)  # the caller's dicts (a Python API user's, a pipeline's defaults) stay as given
    aliases: dict[str, str] = {}
    for (sec, key), (new_sec, new_key) in MOVED_KEYS.items():
        if isinstance(out.get(sec), dict) and key in out[sec]:
            value = out[sec].pop(key)
            if not isinstance(out.get(new_sec), dict):
                out[new_sec] = {}
            out[new_sec].setdefault(new_key, value)
            aliases[f"{new_sec}.{new_key}"] = f"{sec}.{key}"
    if isinstance(out.get("train"), dict) and "bf16" in out["train"]:
        old = out["train"].pop("bf16")
        new = {True: "bf16", False: "fp32", None: "auto"}[old] if isinstance(old, (bool, type(None))) else old
        out["train"].setdefault("precision", new)  # any other value: refused as train.precision (alias below)
        aliases["train.precision"] = "train.bf16"
    if isinstance(out.get("rl"), dict):
        out["rl"] = _upgrade_rl(out["rl"], source, dump, aliases)
    return out, aliases


def _named(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def _upgrade_rl(rl: dict, source: str, dump: bool, aliases: dict[str, str]) -> dict:
    rl = dict(rl)
    for part in ("advantage", "policy_loss"):
        if part in rl:
            rl[part] = _named(rl[part])
    if rl.get("dynamic_sampling") is True or isinstance(rl.get("dynamic_sampling"), dict):
        aliases["rl.dynamic_sampling"] = "rl.dynamic_sampling"  # switched on in this very layer
    if isinstance(rl.get("dynamic_sampling"), bool):
        rl["dynamic_sampling"] = {} if rl["dynamic_sampling"] else None
    old = {k: rl.pop(k) for k in list(rl) if k in OLD_RL_KEYS}
    if "beta" in old:
        beta = old.pop("beta")
        if beta in (0, None) and isinstance(rl.get("kl"), dict) and rl["kl"] and not dump:
            raise ConfigError(f"{source}: rl.kl.{next(iter(rl['kl']))}: only used with rl.beta > 0 (this layer sets "
                              "rl.beta 0: no KL term)")
        rl["kl"] = None if beta in (0, None) and not isinstance(beta, bool) else {
            **(rl.get("kl") if isinstance(rl.get("kl"), dict) else {}), "coef": beta}
        aliases["rl.kl.coef" if rl["kl"] is not None else "rl.kl"] = "rl.beta"
    if "ptx_coef" in old:
        coef = old.pop("ptx_coef")
        if coef in (0, None) and isinstance(rl.get("ptx"), dict) and rl["ptx"] and not dump:
            raise ConfigError(f"{source}: rl.ptx.{next(iter(rl['ptx']))}: only used with rl.ptx_coef > 0")
        rl["ptx"] = None if coef in (0, None) and not isinstance(coef, bool) else {
            **(rl.get("ptx") if isinstance(rl.get("ptx"), dict) else {}), "coef": coef}
        aliases["rl.ptx.coef" if rl["ptx"] is not None else "rl.ptx"] = "rl.ptx_coef"
    for key, value in old.items():
        part, new_key = OLD_RL_KEYS[key]
        if part in rl and rl[part] is None:  # the part is off in this very layer (beta 0, ptx_coef 0, ...)
            if dump or value == OLD_DEFAULTS.get(key, object()):
                continue  # a full dump of an older rlkit: the key at its default did nothing
            switch = {"kl": "rl.beta > 0", "ptx": "rl.ptx_coef > 0", "dynamic_sampling": "rl.dynamic_sampling"}[part]
            raise ConfigError(f"{source}: rl.{key}: only used with {switch}")
        if not isinstance(rl.get(part), dict):
            rl[part] = {}
        rl[part][new_key] = value
        aliases[f"rl.{part}.{new_key}"] = f"rl.{key}"
    _drop_unused(rl, old_default_only=not dump)
    return rl


def _drop_unused(rl: dict, old_default_only: bool) -> None:
    """A recorded config has every key of its day: keep those the variant it ran has (the rest did nothing).
    ``old_default_only``: a layer the user wrote (an old `rlkit recipes show` dump used as a recipe): drop only
    the keys at the value an older rlkit printed for them. Only where the layer names its variant (an older
    rlkit's dump always does)."""
    from rlkit.config.rl import NAMED_VARIANTS

    old_name = {new: old for old, (part, new) in OLD_RL_KEYS.items() if part in NAMED_VARIANTS}
    for part, schemas in NAMED_VARIANTS.items():
        name = rl[part].get("name") if isinstance(rl.get(part), dict) else None
        if not isinstance(name, str) or name not in schemas:
            continue
        fields = schemas[name].model_fields
        rl[part] = {k: v for k, v in rl[part].items() if k in fields or (
            old_default_only and v != OLD_DEFAULTS.get(old_name.get(k, ""), object()))}


_NOTICED: set[str] = set()


def notice(source: str, what: str) -> None:
    """One line, once per source and process (the main one), saying that ``source`` was read in today's shape."""
    from rlkit.runs import is_main_process

    if source in _NOTICED or not is_main_process():
        return
    _NOTICED.add(source)
    from rlkit.tracking import console

    console.print(f"[yellow]{source}: {what}; `rlkit recipes show` prints today's shape[/]", soft_wrap=True)


def notice_layer(source: str, aliases: dict[str, str]) -> None:
    """A recipe file (not ``--set``, whose short spellings are there to stay) written with old spellings."""
    old = sorted({f"{a} -> {n}" for n, a in aliases.items() if a != n})
    if old and source not in ("--set", "command-line flags", "overrides", "arguments", "defaults"):
        notice(source, "old spellings read as " + ", ".join(old[:4]) + (" ..." if len(old) > 4 else ""))


def upgrade_dump(data: dict, source: str | None = None) -> dict:
    """A config dump recorded by an older rlkit (a run's ``rlkit_run.json``, a pipeline manifest) as today's full
    dump of its command: old spellings upgraded, keys its command no longer has (or never read) dropped, new
    keys at their defaults. ``source``: where it was read (said in one line when it was in an older shape)."""
    from pydantic import ValidationError

    from rlkit.config.loading import applicable
    from rlkit.config.schema import KINDS

    original = data
    data, _ = upgrade_layer(data, "recorded config", dump=True)
    if source is not None and data != original:
        notice(source, "recorded by an older rlkit, read in today's shape (old runs resume, finished stages stay)")
    kind = data.get("kind", "sft")
    if not isinstance(kind, str) or kind not in KINDS:
        return data
    data = applicable(data, kind)
    try:
        return KINDS[kind].model_validate(data).model_dump(mode="json")
    except ValidationError:
        return data  # compared key by key as it is: any difference counts as a change
