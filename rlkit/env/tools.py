"""Tools: typed Python functions a model calls during a multi-turn rollout.

A tool is a plain function with type hints and a Google-style docstring (TRL's and transformers' convention):
its JSON schema, which the chat template renders through ``tools=``, comes from the signature and docstring
(``transformers.utils.get_json_schema``). The model's calls are read from its text in the Qwen/Hermes format,
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (``arguments`` may also be a JSON string, as
OpenAI's API sends it). Running a call never raises: an unknown tool, bad JSON, wrong arguments, a tool that
raises, does not answer in time, or returns something that is not text each become an error observation the
model reads, and the rollout goes on.

    >>> def add(a: int, b: int) -> int:
    ...     '''Add two integers.
    ...
    ...     Args:
    ...         a: The first number.
    ...         b: The second number.
    ...     '''
    ...     return a + b
    >>> tool_schema(add)["function"]["parameters"]["required"]
    ['a', 'b']
    >>> [call] = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>')
    >>> run_tool_call({"add": add}, call)
    ('5', True)
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

from rlkit.errors import RlkitError, first_line
from rlkit.rewards import import_user_module

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class ToolError(RlkitError):
    """A tool that cannot be loaded or described (before training, one line)."""


@dataclass
class ToolCall:
    name: str                       # the tool the model named ("" when the call could not be read)
    arguments: dict | None          # its arguments (None when they could not be read)
    error: str | None = None        # why the call could not be read (then it is answered with this)


def tool_schema(fn: Callable) -> dict:
    """The function's JSON schema in transformers' format ({type: function, function: {name, description,
    parameters}}); ToolError naming the tool when its type hints or docstring do not describe every argument."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # DocstringParsingException, TypeHintParsingException
        raise ToolError(f"tool '{getattr(fn, '__name__', fn)}': {first_line(e)} (a tool needs type hints and a "
                        "Google-style docstring with an Args: line per argument)") from None


def load_tools(specs: list[str]) -> dict[str, Callable]:
    """``module:function`` (or ``module.function``) paths -> {name: function}, each described by its schema
    first, so a tool that cannot be imported or described is one line before training."""
    tools: dict[str, Callable] = {}
    for spec in specs:
        module, sep, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
        if not sep or not module or not name:
            raise ToolError(f"env.tools: '{spec}': expected module:function")
        try:
            fn = getattr(import_user_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ToolError(f"env.tools: '{spec}': {first_line(e)}") from None
        except (Exception, SystemExit) as e:  # the module itself fails on import
            raise ToolError(f"env.tools: '{spec}': importing it raised {type(e).__name__}: {first_line(e)}") from None
        if not callable(fn):
            raise ToolError(f"env.tools: '{spec}' is not a function")
        tool_schema(fn)
        if fn.__name__ in tools:
            raise ToolError(f"env.tools: two tools are named '{fn.__name__}'")
        tools[fn.__name__] = fn
    return tools


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>...</tool_call>`` block of a model's turn, in order (a block that is not a JSON object
    with a name and arguments is a call with an ``error``)."""
    calls = []
    for body in _TOOL_CALL.findall(text):
        try:
            obj = json.loads(body)
        except ValueError as e:
            calls.append(ToolCall("", None, f"the tool call is not JSON ({first_line(e)})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall("", None, 'a tool call is {"name": ..., "arguments": {...}}'))
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # OpenAI sends the arguments as a JSON string
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                calls.append(ToolCall(obj["name"], None, f"the arguments are not JSON ({first_line(e)})"))
                continue
        if not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], None, "the arguments must be a JSON object"))
            continue
        calls.append(ToolCall(obj["name"], args))
    return calls


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    if isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return None
    return None


def run_tool_call(tools: dict[str, Callable], call: ToolCall, timeout: float = 10.0) -> tuple[str, bool]:
    """``(observation, ok)``: the tool's result as text, or an error the model reads; never raises."""
    if call.error is not None:
        return f"error: {call.error}", False
    fn = tools.get(call.name)
    if fn is None:
        return f"error: unknown tool '{call.name}'; the tools are {', '.join(sorted(tools)) or 'none'}", False
    try:
        inspect.signature(fn).bind(**call.arguments)
    except TypeError as e:
        return f"error: {call.name}: {first_line(e)}", False
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn(**call.arguments)
        except BaseException as e:  # SystemExit and KeyboardInterrupt from a tool are its failures too
            box["error"] = e

    worker = threading.Thread(target=target, daemon=True, name=f"tool-{call.name}")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return f"error: {call.name} did not answer within {timeout:g} s", False
    if "error" in box:
        e = box["error"]
        return f"error: {call.name} raised {type(e).__name__}: {first_line(e)}", False
    text = _as_text(box.get("value"))
    if text is None:
        return f"error: {call.name} returned a {type(box.get('value')).__name__}, not text", False
    return text, True
