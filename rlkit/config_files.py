"""Reading what a user types into a config: recipe YAML files (UTF-8, a key given twice is an error) and
``--set key.path=value`` overrides (values read as YAML scalars)."""

from __future__ import annotations

from pathlib import Path

import yaml

from rlkit.errors import ConfigError


def parse_set(items: list[str] | None) -> dict:
    """``['train.max_steps=10', 'model.lora.r=8']`` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (YAML keeps the last one
    silently: a second ``train:`` section would drop the first's ``max_steps``)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged below, as safe_load does
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                marker = (type(key).__name__, key)  # 1 and true are different keys
                twice = marker in seen
            except TypeError:  # a list or mapping as a key
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a name, not {key!r}",
                                                        key_node.start_mark) from None
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(marker)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          "save the recipe as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data
