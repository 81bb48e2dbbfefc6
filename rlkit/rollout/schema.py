"""The ``rollout:`` config section, one schema per engine: ``hf``, ``vllm`` colocated, ``vllm`` against a server.

``Rollout`` is a discriminated union of the three, tagged from ``engine`` (missing: hf) and, for vllm, ``mode``
(missing: colocate); each variant holds only the keys its engine reads, so a key of another engine is an
error that names the engine it belongs to (one at its default value, as an older rlkit recorded every key,
is dropped). The registry entries these schemas belong to are in :mod:`rlkit.rollout.base` (``ENGINES``).

>>> rollout_config(engine="vllm", mode="server").server_url
'http://127.0.0.1:8000'
>>> type(rollout_config()).__name__, rollout_tag({"engine": "vllm"})
('HFRollout', 'vllm-colocate')
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Discriminator, Field, Tag, TypeAdapter, field_validator

from rlkit.sections import Section

ENGINE_NAMES = ("hf", "vllm")        # the values of rollout.engine
VLLM_MODES = ("colocate", "server")  # the values of rollout.mode (engine vllm)

class HFRollout(Section):
    engine: Literal["hf"] = Field(
        "hf", description="Who generates rollouts (training, evaluation, rejection sampling): 'hf' (transformers "
        "generate on the training model) or 'vllm' (vLLM; old log-probs are then recomputed by the trainer).")
    hf_cache: Literal["dynamic", "static"] = Field(
        "dynamic", description="hf: KV cache; static pre-allocates it (and compiles the decode step on CUDA).")


# rlkit grpo/ppo: generate the next batch while the trainer updates (the RL loop's overlap.py)
_STALENESS = Field(0, description="vllm, rlkit grpo/ppo: 1 generates the next batch while the trainer updates on "
                   "this one (one-step off-policy: samples one update old, corrected by importance sampling); 0 "
                   "waits. One batch is generated ahead, so staleness is at most 1.")


class VLLMColocateRollout(Section):
    engine: Literal["vllm"] = Field(..., description=HFRollout.model_fields["engine"].description)
    mode: Literal["colocate"] = Field(
        "colocate", description="vllm: 'colocate' runs vLLM inside the training process (one engine per process); "
        "'server' uses a running `rlkit vllm-serve` at rollout.server_url.")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vllm colocate on a GPU: share of GPU memory vLLM may take (the rest is the trainer's).")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="vllm colocate on CPU: KV-cache size in GiB; default: enough for one rollout batch.")
    max_model_len: int | None = Field(
        None, gt=0, description="vllm colocate: longest prompt + completion; default: the longest prompt of the data "
        "plus the generation budget.")
    enforce_eager: bool | None = Field(
        None, description="vllm colocate: no CUDA graphs; default: eager on CPU, graphs on a GPU.")
    sleep: bool = Field(True, description="vllm colocate on a GPU: put the engine to sleep during the update "
                        "(weights to host memory, KV cache freed) so the optimizer gets the memory.")
    max_staleness: int = Field(_STALENESS.default, ge=0, le=1, description=_STALENESS.description)


class VLLMServerRollout(Section):
    engine: Literal["vllm"] = Field(..., description=HFRollout.model_fields["engine"].description)
    mode: Literal["server"] = Field(..., description=VLLMColocateRollout.model_fields["mode"].description)
    server_url: str = Field("http://127.0.0.1:8000", description="vllm server mode: the server's base URL.")
    server_timeout: float = Field(600.0, gt=0, description="vllm server mode: seconds one request may take.")
    server_wait: float = Field(
        240.0, ge=0, description="vllm server mode: seconds to wait at start for a server that is still starting "
        "(its /health endpoint polled; TRL's client waits as long); 0: fail at once when none answers.")
    sync_dir: str | None = Field(
        None, description="vllm server mode: where the trainer writes its weights (safetensors) for the server to "
        "reload after every update; default: a temporary directory (server on the same machine). For a server on "
        "another machine, a path both see (a shared filesystem).")
    max_staleness: int = Field(_STALENESS.default, ge=0, le=1, description=_STALENESS.description)

    @field_validator("server_url")
    @classmethod
    def _server_url(cls, v: str) -> str:
        base_server_url(v)
        return v


SCHEMAS: dict[str, type[Section]] = {"hf": HFRollout, "vllm-colocate": VLLMColocateRollout,
                                     "vllm-server": VLLMServerRollout}
# how each tag reads in a message: the settings that select it
_SELECTED_BY = {"hf": "rollout.engine hf", "vllm-colocate": "rollout.engine vllm with rollout.mode colocate",
                "vllm-server": "rollout.engine vllm with rollout.mode server"}


def rollout_tag(value: Any) -> str | None:
    """The variant a ``rollout:`` section (a dict, or a variant) selects: ``hf`` (engine hf or missing),
    ``vllm-colocate`` / ``vllm-server`` (engine vllm, mode missing = colocate); None for an unknown one."""
    if isinstance(value, Section):
        return next((tag for tag, schema in SCHEMAS.items() if isinstance(value, schema)), None)
    if not isinstance(value, dict):
        return None
    engine = value.get("engine", "hf")
    if engine == "hf":
        return "hf"
    if engine == "vllm" and value.get("mode", "colocate") in VLLM_MODES:
        return f"vllm-{value.get('mode', 'colocate')}"
    return None


def rollout_schema(data: dict) -> type[Section]:
    """The schema class a raw ``rollout:`` dict selects; ValueError (one line, listing the known engines or
    modes) for an unknown engine or mode."""
    tag = rollout_tag(data)
    if tag is not None:
        return SCHEMAS[tag]
    engine = data.get("engine", "hf")
    if engine != "vllm":
        raise ValueError(f"rollout.engine: unknown engine {engine!r}; expected one of {', '.join(ENGINE_NAMES)}")
    raise ValueError(f"rollout.mode: unknown vllm mode {data.get('mode')!r}; expected one of {', '.join(VLLM_MODES)}")


def _foreign_keys(value: Any) -> Any:
    """Before the union picks its variant: an unknown engine or mode, and a key of another engine's variant
    set to anything but its default, are one-line errors naming what they need; a key of another variant at
    its default (an older rlkit recorded every rollout key) is dropped."""
    if not isinstance(value, dict):
        return value
    schema = rollout_schema(value)
    out = {}
    for key, v in value.items():
        owners = [t for t, s in SCHEMAS.items() if key in s.model_fields]
        if key in schema.model_fields or not owners:
            out[key] = v  # its own key, or no variant's (extra="forbid" names it)
            continue
        defaults = [SCHEMAS[t].model_fields[key] for t in owners if not SCHEMAS[t].model_fields[key].is_required()]
        if any(v == f.get_default(call_default_factory=True) for f in defaults):
            continue  # at a default of the variant that has it (an older rlkit's hf dump: mode colocate)
        vllm = [t for t in SCHEMAS if t.startswith("vllm-")]
        where = "rollout.engine vllm" if sorted(owners) == sorted(vllm) else " or ".join(_SELECTED_BY[t] for t in owners)
        raise ValueError(f"rollout.{key}: only used with {where}")
    return out


Rollout = Annotated[
    Union[Annotated[HFRollout, Tag("hf")], Annotated[VLLMColocateRollout, Tag("vllm-colocate")],
          Annotated[VLLMServerRollout, Tag("vllm-server")]],
    Discriminator(rollout_tag, custom_error_type="rollout_section",
                  custom_error_message="expected a mapping, e.g. {engine: vllm, mode: colocate}"),
    BeforeValidator(_foreign_keys),
]


@cache
def _adapter() -> TypeAdapter:
    return TypeAdapter(Rollout)


def rollout_config(**kw) -> HFRollout | VLLMColocateRollout | VLLMServerRollout:
    """The ``rollout:`` variant these keys describe, validated: ``rollout_config()`` is hf,
    ``rollout_config(engine="vllm")`` vLLM colocated, ``rollout_config(engine="vllm", mode="server", ...)``."""
    return _adapter().validate_python(kw)


def base_server_url(url: str) -> str:
    """``rollout.server_url`` as ``http(s)://HOST[:PORT][/PREFIX]``, without a trailing ``/`` or ``/v1`` (the
    OpenAI base URL a user may paste); ValueError for anything else.

    >>> base_server_url("http://127.0.0.1:8000/v1/")
    'http://127.0.0.1:8000'
    """
    from urllib.parse import urlsplit

    u = urlsplit(url.strip())
    try:
        port_ok = u.port is None or u.port > 0
    except ValueError:
        port_ok = False
    if u.scheme not in ("http", "https") or not u.hostname or not port_ok or u.query or u.fragment:
        hint = f" (http://{url.strip()}?)" if "://" not in url and url.strip() else ""
        raise ValueError(f"{url!r}: expected http://HOST:PORT{hint}, e.g. http://127.0.0.1:8000 (where "
                         "`rlkit vllm-serve` listens)")
    return f"{u.scheme}://{u.netloc}{u.path.rstrip('/').removesuffix('/v1').rstrip('/')}"
