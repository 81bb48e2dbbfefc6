"""Config layers merged and validated into a command's frozen config; one-line errors that name the key.

Precedence, lowest first: field defaults < recipe YAML < ``--set key.path=value`` < named CLI flags
(``--model``, ``--dataset``, ``--output-dir``, ``--max-steps``). Each layer's old spellings are upgraded
first (:mod:`rlkit.config.upgrade`). An unknown key is an error that names the file and suggests the
closest valid key; a key the command does not read, or a variant does not have, is refused by the schema.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlkit.config.schema import KINDS, NAMED_VARIANTS, RunConfig, default_variant
from rlkit.config.upgrade import notice_layer, upgrade_layer
from rlkit.errors import ConfigError
from rlkit.nested import flatten

# ------------------------------------------------------------------------------------ schema walking


def sections(annotation: Any) -> list[type[BaseModel]]:
    """The section classes a field's annotation can hold (a union's variants, a list's items, an optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out.extend(sections(arg))
    return out


def _models(kind: str | None = None) -> list[type[RunConfig]]:
    return [KINDS[kind]] if kind is not None else list(dict.fromkeys(KINDS.values()))


def schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every dotted key path a model (with all variants of its unions) has."""
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(prefix + name)
        for sub in sections(field.annotation):
            keys |= schema_keys(sub, prefix + name + ".")
    return keys


def _all_keys() -> set[str]:
    return set().union(*(schema_keys(m) for m in _models()))


def _field_models(models: list[type[BaseModel]], key: str) -> list[type[BaseModel]] | None:
    """The section classes under ``key`` in any of ``models`` (None when none has it)."""
    found = [m for m in models if key in m.model_fields]
    if not found:
        return None
    return [s for m in found for s in sections(m.model_fields[key].annotation)]


def check_unknown(layer: dict, source: str) -> None:
    """A key no command has is an error naming ``source``, with the closest known key as a hint (old
    spellings are upgraded first)."""
    layer, _ = upgrade_layer(layer, source)
    known = sorted(_all_keys())

    def walk(d: dict, models: list[type[BaseModel]], prefix: str) -> None:
        for key, value in d.items():
            full = prefix + str(key)
            subs = _field_models(models, str(key))
            if subs is None:
                guess = difflib.get_close_matches(full, known, n=1, cutoff=0.6) or difflib.get_close_matches(
                    str(key), sorted({k.rsplit(".", 1)[-1] for k in known}), n=1, cutoff=0.6)
                here = sorted({f for m in models for f in m.model_fields})
                hint = f"; did you mean '{guess[0]}'?" if guess else f"; valid keys here: {', '.join(here)}"
                raise ConfigError(f"{source}: unknown key '{full}'{hint}")
            if subs and isinstance(value, dict):
                walk(value, subs, full + ".")

    walk(layer, _models(), "")


def applicable(layer: dict, kind: str, variants: dict[str, str] | None = None) -> dict:
    """The part of a config layer that ``kind``'s command reads: a pipeline's defaults apply to each stage only
    where they mean something for that stage's command, with the variants it runs (``variants``: rl part ->
    name, e.g. ``{"advantage": "reinforce_pp"}``; else the command's defaults)."""
    layer, _ = upgrade_layer(layer)
    variants = variants or {}

    def walk(d: dict, models: list[type[BaseModel]], prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            subs = _field_models(models, str(k))
            if subs is None:
                continue
            if prefix == "rl." and k in NAMED_VARIANTS and isinstance(v, dict):
                # judged by the variant it names, else the one the stage runs, else the command's default
                name = v.get("name", variants.get(str(k), default_variant(kind, str(k))))
                if isinstance(name, str) and name in NAMED_VARIANTS[k]:
                    subs = [NAMED_VARIANTS[k][name]]
            if isinstance(v, dict) and len(subs) == 1:  # a plain section: keep the keys it has
                sub = walk(v, subs, f"{prefix}{k}.")
                if sub or not v:
                    out[k] = sub
            else:  # a value, a list, or a section with variants (kept whole: the variant decides)
                out[k] = v
        return out

    return walk(layer, _models(kind))


# ----------------------------------------------------------------------------------------------- build


# the keys that name a section's variant (rl.advantage.name, rl.policy_loss.name; rollout.engine and .mode)
VARIANT_TAGS = ("name", "engine", "mode")


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``; a section that switches variant (another ``name``, ``engine`` or ``mode``)
    replaces the old one, keeping its other tags (``rollout.mode=server`` keeps ``engine: vllm``), so
    ``--set rl.advantage=grpo`` on a gae recipe does not keep gae's knobs."""
    out = dict(base)
    for k, v in over.items():
        old = out.get(k)
        if not (isinstance(v, dict) and isinstance(old, dict)):
            out[k] = v
        elif any(t in v and t in old and v[t] != old[t] for t in VARIANT_TAGS):
            out[k] = {**{t: old[t] for t in VARIANT_TAGS if t in old and t not in v}, **v}
        else:
            out[k] = deep_merge(old, v)
    return out


def build_config(layers: list[tuple[str, dict]]) -> RunConfig:
    """Merge ``(source, dict)`` layers in order (later wins) and validate into the frozen config of the
    command their ``kind`` names (sft when none does)."""
    merged: dict = {}
    upgraded: list[tuple[str, dict]] = []
    aliases: dict[str, str] = {}
    per_layer: list[dict[str, str]] = []
    for source, layer in layers:
        layer, al = upgrade_layer(layer, source)
        check_unknown(layer, source)
        notice_layer(source, al)
        upgraded.append((source, layer))
        per_layer.append(al)
        aliases.update(al)
        merged = deep_merge(merged, layer)
    kind = merged.get("kind", "sft")
    if not isinstance(kind, str) or kind not in KINDS:
        source = next((s for s, layer in reversed(upgraded) if "kind" in layer), "config")
        raise ConfigError(f"{source}: kind: '{kind}' is not a command; expected one of {', '.join(KINDS)}")
    _check_switches(merged, upgraded, per_layer, aliases)
    try:
        return KINDS[kind].model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_message(e.errors()[0], kind, upgraded, aliases)) from None


def _check_switches(merged: dict, layers: list[tuple[str, dict]], per_layer: list[dict[str, str]],
                    aliases: dict[str, str]) -> None:
    """An old spelling that tunes a part that is off is refused: ``rl.max_resample_rounds`` without
    ``rl.dynamic_sampling``, ``rl.kl_in`` with no KL coefficient, ``rl.ptx_data`` with no ptx coefficient."""
    rl = merged.get("rl") if isinstance(merged.get("rl"), dict) else {}
    for part, switch, needs in (("dynamic_sampling", "rl.dynamic_sampling", None), ("kl", "rl.beta > 0", "coef"),
                                ("ptx", "rl.ptx_coef > 0", "coef")):
        sub = rl.get(part)
        set_by = [k for k in sub if f"rl.{part}.{k}" in aliases] if isinstance(sub, dict) else []
        if not set_by:
            continue
        on = needs in sub if needs is not None else any(
            _switched_on(layer, part, al) for (_, layer), al in zip(layers, per_layer))
        if not on:
            source = next((s for s, layer in reversed(layers) if _has_path(layer, ("rl", part, set_by[0]))), "config")
            raise ConfigError(f"{source}: {aliases[f'rl.{part}.{set_by[0]}']}: only used with {switch}")


def _switched_on(layer: dict, part: str, aliases: dict[str, str]) -> bool:
    """Whether this layer turns ``part`` on: says so (``true``, a mapping) or sets a key of it in today's
    spelling (``aliases``: this layer's old spellings)."""
    sub = layer["rl"].get(part) if isinstance(layer.get("rl"), dict) else None
    return isinstance(sub, dict) and (f"rl.{part}" in aliases or any(f"rl.{part}.{k}" not in aliases for k in sub))


# ----------------------------------------------------------------------------------------------- errors


def _walk_loc(kind: str, loc: tuple) -> tuple[list, tuple[str, str, type[BaseModel]] | None, type[BaseModel] | None]:
    """``loc`` without the variant tags pydantic puts in it; the innermost variant passed (its key path, tag
    and class) and the section class at the end (None when unknown)."""
    path: list = []
    variant = None
    models: list[type[BaseModel]] | None = [KINDS[kind]]
    i = 0
    while i < len(loc):
        p = loc[i]
        path.append(p)
        i += 1
        if isinstance(p, int) or models is None:
            continue
        subs = _field_models(models, str(p))
        models = subs or None
        if subs and len(subs) > 1 and i < len(loc) and isinstance(loc[i], str):
            tag = loc[i]
            match = [s for s in subs if tag in (_tag(s), s.__name__)]
            if match or all(tag not in s.model_fields for s in subs):
                i += 1
                models = match or None
                if match:
                    variant = (".".join(str(x) for x in path), tag, match[0])
    return path, variant, (models[0] if models and len(models) == 1 else None)


def _tag(model: type[BaseModel]) -> str | None:
    for key in ("name", "engine"):
        f = model.model_fields.get(key)
        if f is not None and isinstance(f.default, str):
            mode = model.model_fields.get("mode")
            return f"{f.default}-{mode.default}" if key == "engine" and f.default != "hf" and mode else f.default
    return None


def _message(err: dict, kind: str, layers: list[tuple[str, dict]], aliases: dict[str, str]) -> str:
    path, variant, _ = _walk_loc(kind, tuple(err["loc"]))
    if err["type"] == "extra_forbidden" and isinstance(err.get("input"), dict) and err["input"]:
        path += next(iter(flatten(err["input"]))).split(".")  # a whole section: name the key that was set
    key = ".".join(str(p) for p in path)
    msg = err["msg"].removeprefix("Value error, ")
    head, sep, rest = msg.partition(": ")
    if sep and " " not in head and head != key:  # a check that names its key: "rl.num_generations: ..."
        if head in _all_keys():
            key, path, msg = head, head.split("."), rest
        elif key and (head in _all_keys_under(kind, path)
                      or (variant is not None and variant[0] == key and head in variant[2].model_fields)):
            key, msg = f"{key}.{head}", rest
            path = key.split(".")
    shown = f"{aliases[key]} ({key})" if aliases.get(key, key) != key else key
    if err["type"] == "extra_forbidden":
        parent, _, leaf = key.rpartition(".")
        if variant is not None and parent == variant[0]:
            what = parent.rsplit(".", 1)[-1].replace("_", " ")
            keys = [k for k in variant[2].model_fields if k not in ("name", "engine")]
            msg = f"{what} '{variant[1]}' has no key '{leaf}' (its keys: {', '.join(keys) or 'none'})"
        else:
            users = [k for k in dict.fromkeys(KINDS) if k != kind and _has_key(KINDS[k], path)]
            msg = (f"rlkit {kind} does not use this key (it is read by {', '.join(f'rlkit {u}' for u in users)})"
                   if users else "not a key of this command") + "; remove it"
    elif err["type"] == "missing":
        msg = "required" + (f" ({d})" if (d := _description(kind, path)) else "")
    elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        expected = err.get("ctx", {}).get("expected_tags", "")
        msg = f"unknown name '{err.get('ctx', {}).get('tag', err.get('input'))}'; known: {expected.replace(chr(39), '')}"
    # a whole-config check names its key first ("rl.kl: ..."): blame the layer that set it
    where = tuple(path) or tuple(msg.split(":", 1)[0].split("."))
    source = layers[-1][0] if layers else "config"
    for depth in range(len(where), 0, -1):
        found = next((s for s, layer in reversed(layers) if _has_path(layer, where[:depth])), None)
        if found is not None:
            source = found
            break
    return f"{source}: {shown}: {msg}" if key else f"{source}: {msg}"


def _all_keys_under(kind: str, path: list) -> set[str]:
    _, _, model = _walk_loc(kind, tuple(path))
    return set(model.model_fields) if model is not None else set()


def _has_key(model: type[BaseModel], path: list) -> bool:
    models: list[type[BaseModel]] | None = [model]
    for p in path:
        if isinstance(p, int):
            continue
        if not models:
            return False
        models = _field_models(models, str(p))
        if models is None:
            return False
    return True


def _description(kind: str, path: list) -> str:
    models: list[type[BaseModel]] | None = [KINDS[kind]]
    desc = ""
    for p in path:
        if isinstance(p, int) or not models:
            continue
        owner = next((m for m in models if str(p) in m.model_fields), None)
        if owner is None:
            return ""
        desc = owner.model_fields[str(p)].description or ""
        models = _field_models(models, str(p))
    return desc


def _has_path(d: Any, loc: tuple) -> bool:
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
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
