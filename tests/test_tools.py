"""Tools for multi-turn rollouts (issue 20, items 1 and 3): schemas from signatures and docstrings, calls parsed
from the model's text, and every fault an observation the model reads."""

from __future__ import annotations

import time

import pytest

from rlkit.env import ToolCall, ToolError, load_tools, parse_tool_calls, run_tool_call, tool_schema


def test_trl_style_tool_functions_load_unchanged_with_their_schemas():
    tools = load_tools(["tool_fns:multiply", "tool_fns.lookup"])
    assert sorted(tools) == ["lookup", "multiply"]
    schema = tool_schema(tools["multiply"])
    assert schema["function"]["name"] == "multiply" and schema["function"]["description"] == "Multiply two integers."
    assert schema["function"]["parameters"]["properties"]["a"] == {"type": "integer", "description": "The first factor."}
    with pytest.raises(ToolError, match="tool 'undocumented'"):
        load_tools(["tool_fns:undocumented"])
    for bad, needle in (("tool_fns:nope", "tool_fns:nope"), ("no_such_module:f", "no_such_module"),
                        ("multiply", "module:function")):
        with pytest.raises(ToolError, match=needle):
            load_tools([bad])


def test_tool_calls_are_read_in_the_hermes_format():
    text = ('I will compute.<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>'
            '<tool_call>{"name": "lookup", "arguments": "{\\"key\\": \\"x\\"}"}</tool_call>'
            "<tool_call>{not json}</tool_call><tool_call>[1, 2]</tool_call>")
    calls = parse_tool_calls(text)
    assert calls[0] == ToolCall("multiply", {"a": 6, "b": 7}) and calls[1] == ToolCall("lookup", {"key": "x"})
    assert "not JSON" in calls[2].error and "name" in calls[3].error
    assert parse_tool_calls("no calls here") == []


def test_every_fault_is_an_observation():
    tools = load_tools(["tool_fns:multiply", "tool_fns:lookup"])

    def boom(x: int) -> str:
        """Fail.

        Args:
            x: Anything.
        """
        raise ValueError("no way")

    def slow(x: int) -> str:
        """Sleep.

        Args:
            x: Seconds.
        """
        time.sleep(x)
        return "late"

    def opaque(x: int) -> object:
        """Return an object.

        Args:
            x: Anything.
        """
        return object()

    def leave(x: int) -> str:
        """Exit.

        Args:
            x: Anything.
        """
        raise SystemExit(0)

    tools.update(boom=boom, slow=slow, opaque=opaque, leave=leave)
    assert run_tool_call(tools, ToolCall("multiply", {"a": 6, "b": 7})) == ("42", True)
    assert run_tool_call(tools, ToolCall("lookup", {"key": "k"})) == ('{"key": "k", "found": true}', True)
    cases = [(ToolCall("divide", {"a": 1}), "unknown tool 'divide'"),
             (ToolCall("multiply", {"a": 1}), "missing a required argument"),
             (ToolCall("multiply", {"a": 1, "b": 2, "c": 3}), "unexpected keyword"),
             (ToolCall("boom", {"x": 1}), "raised ValueError: no way"),
             (ToolCall("leave", {"x": 1}), "raised SystemExit"),
             (ToolCall("opaque", {"x": 1}), "returned a object, not text"),
             (parse_tool_calls("<tool_call>{oops</tool_call>")[0], "not JSON")]
    for call, needle in cases:
        text, ok = run_tool_call(tools, call)
        assert not ok and text.startswith("error: ") and needle in text, (call, text)
    t0 = time.time()
    text, ok = run_tool_call(tools, ToolCall("slow", {"x": 30}), timeout=0.5)
    assert not ok and "did not answer within 0.5 s" in text and time.time() - t0 < 5


def test_python_tool_runs_model_code_in_the_sandbox(tmp_path):
    """The code sandbox as a tool: output comes back as the observation; an error or a runaway program is an
    observation too; what the code tries outside its sandbox does not happen."""
    from rlkit.env.python_tool import python

    tools = {"python": python}
    [call] = parse_tool_calls('<tool_call>{"name": "python", "arguments": {"code": "print(sum(range(5)))"}}</tool_call>')
    assert run_tool_call(tools, call) == ("10", True)
    assert python("1/0") == "error: ZeroDivisionError: division by zero"
    assert python("while True: pass") == "error: the program did not finish within 5 s"
    target = tmp_path / "owned"
    python(f"open({str(target)!r}, 'w').write('x')")
    assert not target.exists()
