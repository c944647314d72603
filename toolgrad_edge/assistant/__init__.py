"""A local assistant that acts: tool calls from the model run, and their results go back to it.

Tool sources, mixed freely: Python functions (:func:`tool`), MCP servers
(the ``mcp`` extra) and JSON tool files (shown, not run). Built on top of the
runtime; nothing in the runtime imports this package.
"""

from __future__ import annotations

from .functions import FunctionTool, function_tool, tool
from .mcp_servers import ServerSpec, server_from_command, servers_from_config
from .permissions import Decision, Permissions
from .session import Assistant, CallRecord, Round, Transcript
from .toolbox import MAX_RESULT_CHARS, ToolEntry

__all__ = [
    "Assistant",
    "CallRecord",
    "Decision",
    "FunctionTool",
    "MAX_RESULT_CHARS",
    "Permissions",
    "Round",
    "ServerSpec",
    "ToolEntry",
    "Transcript",
    "function_tool",
    "server_from_command",
    "servers_from_config",
    "tool",
]
