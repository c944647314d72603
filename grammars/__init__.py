"""Tool schemas in, GBNF grammars out; model text back to validated tool calls.

Model-free: nothing here imports llama.cpp or the runtime.
"""

from __future__ import annotations

from .calls import CallStreamParser, ToolCall, parse_calls, render_calls
from .gbnf import WHITESPACE, build_grammar, schema_grammar
from .llg import build_llg_grammar, llg_schema_grammar
from .lookahead import forced_name_suffix
from .tools import Tool, load_tools

__all__ = [
    "CallStreamParser",
    "Tool",
    "ToolCall",
    "WHITESPACE",
    "build_grammar",
    "build_llg_grammar",
    "forced_name_suffix",
    "llg_schema_grammar",
    "load_tools",
    "parse_calls",
    "render_calls",
    "schema_grammar",
]
