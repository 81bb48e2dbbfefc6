"""Multi-turn rollouts: tools (:mod:`rlkit.env.tools`), environments in TRL's ``environment_factory`` convention
(:mod:`rlkit.env.environments`), the episode runner, token in and token out (:mod:`rlkit.env.episodes`), the
``env:`` config section (:mod:`rlkit.env.schema`) and the built-in tools: ``calculator`` and ``python`` (the
code sandbox, :mod:`rlkit.sandbox`)."""

from rlkit.env.tools import ToolCall, ToolError, load_tools, parse_tool_calls, run_tool_call, tool_schema

__all__ = ["ToolCall", "ToolError", "load_tools", "parse_tool_calls", "run_tool_call", "tool_schema"]
