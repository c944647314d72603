"""toolgrad-edge: run the ToolGrad tool-calling model on-device with llama.cpp.

The public names are imported lazily so that ``import toolgrad_edge`` (and the
model-free ``toolgrad_edge.grammars``) never loads llama.cpp by itself.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # grammars/: schema in, grammar and calls out
    "Tool": "toolgrad_edge.grammars",
    "ToolCall": "toolgrad_edge.grammars",
    "load_tools": "toolgrad_edge.grammars",
    "build_grammar": "toolgrad_edge.grammars",
    "parse_calls": "toolgrad_edge.grammars",
    "render_calls": "toolgrad_edge.grammars",
    "schema_grammar": "toolgrad_edge.grammars",
    "CallStreamParser": "toolgrad_edge.grammars",
    # runtime
    "ToolRuntime": "toolgrad_edge.runtime",
    "CallResult": "toolgrad_edge.runtime",
    # what ToolRuntime.stream yields
    "Decoded": "toolgrad_edge.runtime",
    "TextDelta": "toolgrad_edge.runtime",
    "CallDone": "toolgrad_edge.runtime",
    "Final": "toolgrad_edge.runtime",
    # errors
    "ToolgradEdgeError": "toolgrad_edge.errors",
    "SchemaError": "toolgrad_edge.errors",
    "ToolCallError": "toolgrad_edge.errors",
    "ConversionError": "toolgrad_edge.errors",
    "ModelLoadError": "toolgrad_edge.errors",
    "GenerationError": "toolgrad_edge.errors",
    "ContextLengthError": "toolgrad_edge.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'toolgrad_edge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
