"""An access-recording config for tests: which config keys a run reads (tests/test_keys_read.py)."""

from __future__ import annotations

import pytest

import rlkit.config
import rlkit.recipe
from rlkit.sections import Section


class Recorder:
    def __init__(self):
        self.on = False
        self.cfgs: list = []
        self.reads: set[tuple[type, str]] = set()

    def reset(self) -> None:
        self.on, self.cfgs, self.reads = False, [], set()


@pytest.fixture
def recorder(monkeypatch):
    """Records the config fields read once a command's config is built (``rec.reads``: (section class, key))."""
    rec = Recorder()
    build = rlkit.config.build_config

    def recording_build(layers):
        cfg = build(layers)
        rec.cfgs.append(cfg)
        rec.on = True  # from here on, reads are the run's
        return cfg

    monkeypatch.setattr(rlkit.recipe, "build_config", recording_build)  # the training commands
    monkeypatch.setattr(rlkit.config, "build_config", recording_build)  # rlkit eval (imports it when it runs)
    plain = Section.__getattribute__

    def getattribute(self, name):
        if rec.on and name in type(self).model_fields:
            rec.reads.add((type(self), name))
        return plain(self, name)

    monkeypatch.setattr(Section, "__getattribute__", getattribute)
    return rec


def leaves(model: Section, prefix: str = "") -> dict[str, tuple[type, str, bool]]:
    """Leaf key path -> (its section class, field name, whether it holds its default)."""
    out = {}
    for name, field in type(model).model_fields.items():
        value = model.__dict__[name]
        if isinstance(value, Section):
            out.update(leaves(value, f"{prefix}{name}."))
        elif isinstance(value, list) and value and all(isinstance(x, Section) for x in value):
            for x in value:  # the items of a list share their paths: non-default when any item is
                for path, (cls, key, default) in leaves(x, f"{prefix}{name}[].").items():
                    out[path] = (cls, key, default and out.get(path, (cls, key, True))[2])
        elif prefix in ("rl.advantage.", "rl.policy_loss.") and name == "name":
            out[prefix + name] = (type(model), name, False)  # a variant's tag: the variant is a choice to read
        else:
            out[prefix + name] = (type(model), name, value == field.get_default(call_default_factory=True))
    return out




def unread_keys(rec: Recorder) -> list[str]:
    """The keys of the run's config set to a non-default value that the run did not read."""
    return sorted(path for path, (cls, name, default) in leaves(rec.cfgs[0]).items()
                  if not default and (cls, name) not in rec.reads)
