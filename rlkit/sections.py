"""The base of every config section: typed, strict and frozen.

A section refuses keys it does not have (``extra="forbid"``), so the schema alone says what a command reads.
A section with variants (an advantage estimator, a policy loss, a rollout engine) is a discriminated union of
sections, each tagged by ``name`` (or ``engine``), whose schema sits next to its registry entry.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # allow_inf_nan False: `.inf` / `.nan` in a recipe (a learning rate, a reward weight) is an error, not a run
    # that diverges after its first step or learns nothing
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


def given(section: Section, key: str) -> bool:
    """Whether ``key`` was set to something other than its default (a full dump, as ``rlkit recipes show`` prints
    it, sets every key to its default: that does nothing and is fine)."""
    field = type(section).model_fields[key]
    return key in section.model_fields_set and getattr(section, key) != field.get_default(call_default_factory=True)
