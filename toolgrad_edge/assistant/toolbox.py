"""The tools of one assistant session, from every source, under names that do not collide.

Each :class:`ToolEntry` pairs the definition the model sees (name,
description, JSON schema) with what runs a call: an MCP server, a Python
function, or nothing (a tool from a JSON file is shown, never run). Names that
two sources share become ``<source>.<tool>`` for both, and a tool whose schema
cannot be compiled to a grammar is left out with a warning so the others work.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import SchemaError
from ..grammars import Tool, build_grammar, load_tools

# Longest tool result the model reads; longer ones are cut with a note. About
# 1,000 tokens: the default 8,192-token context holds the tools, the question
# and a few such results.
MAX_RESULT_CHARS = 4000


@dataclass
class ToolEntry:
    """One tool the model can call, and where its calls go."""

    name: str            # the name the model sees and calls
    original_name: str   # the name at its source (an MCP server's own tool name)
    source: str          # an MCP server's name, "python", or a JSON file's path
    kind: str            # "mcp", "python" or "file"
    spec: dict           # {"name", "description", "parameters"} as shown to the model
    read_only: bool = False
    server: Any = None   # the McpServer of an "mcp" tool
    function: Any = None  # the FunctionTool of a "python" tool
    tool: Tool | None = field(default=None, repr=False)

    @property
    def runnable(self) -> bool:
        return self.kind != "file"


def mcp_entries(server) -> list[ToolEntry]:
    entries = []
    for t in server.tools:
        annotations = getattr(t, "annotations", None)
        spec = {"name": t.name, "description": t.description or "", "parameters": dict(t.input_schema or {})}
        spec["parameters"].pop("title", None)
        entries.append(ToolEntry(t.name, t.name, server.name, "mcp", spec,
                                 read_only=bool(annotations and annotations.read_only_hint), server=server))
    return entries


def function_entries(functions) -> list[ToolEntry]:
    return [ToolEntry(f.name, f.name, "python", "python", f.spec, read_only=f.read_only, function=f)
            for f in functions]


def file_entries(path) -> list[ToolEntry]:
    return [ToolEntry(t.name, t.name, str(path), "file", t.spec, tool=t) for t in load_tools(path)]


def resolve_names(entries: list[ToolEntry]) -> tuple[list[ToolEntry], list[str]]:
    """Rename tools that several sources share to ``<source>.<tool>``; say which were renamed."""
    counts = Counter(e.name for e in entries)
    notes = []
    out = []
    for name in sorted(n for n, c in counts.items() if c > 1):
        sources = [e.source for e in entries if e.name == name]
        notes.append(f"tool {name!r} is offered by {', '.join(sources)}: "
                     f"renamed to {', '.join(f'{s}.{name}' for s in sources)}.")
    for entry in entries:
        if counts[entry.name] > 1:
            new = f"{entry.source}.{entry.name}"
            entry = replace(entry, name=new, spec={**entry.spec, "name": new})
        out.append(entry)
    return out, notes


def compile_entries(entries: list[ToolEntry]) -> tuple[list[ToolEntry], list[str]]:
    """Keep the tools whose definition loads and compiles to a grammar; warn about the rest."""
    kept, warnings = [], []
    for entry in entries:
        try:
            (tool,) = load_tools([entry.spec])
            build_grammar([tool], tool_choice="required")
        except SchemaError as exc:
            warnings.append(f"tool {entry.name!r} ({entry.source}) skipped: {exc}")
            continue
        kept.append(replace(entry, tool=tool))
    return kept, warnings


def cut_result(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    """Cut a result longer than `limit` characters, with a note the model and the user can read."""
    if limit <= 0 or len(text) <= limit:
        return text
    return f"{text[:limit]}\n[result cut: {len(text):,} characters in all, the first {limit:,} shown]"
