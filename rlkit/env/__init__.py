"""Environments and tools for multi-turn rollouts (issue 20): so far the tools (:mod:`rlkit.env.tools`)."""

from rlkit.env.tools import ToolCall, ToolError, load_tools, parse_tool_calls, run_tool_call, tool_schema

__all__ = ["ToolCall", "ToolError", "load_tools", "parse_tool_calls", "run_tool_call", "tool_schema"]
