"""One small error hierarchy, translated once at each boundary.

The CLI turns a ToolgradEdgeError into one line and a non-zero exit; the
server turns it into an OpenAI-shaped JSON error. Messages say what was
expected, what was found, and where (file, tensor, tool, JSON pointer).
"""

from __future__ import annotations


class ToolgradEdgeError(Exception):
    """Base class for every error meant to be shown to a user."""


class SchemaError(ToolgradEdgeError, ValueError):
    """A tool definition is malformed or uses an unsupported schema feature."""


class TooManyToolsError(SchemaError):
    """More tools than the engine's grammar sampler takes (llama.cpp's GBNF sampler: 256)."""


class ToolCallError(ToolgradEdgeError, ValueError):
    """Model text is neither a valid call list nor a plain-text answer."""


class ConversionError(ToolgradEdgeError):
    """A checkpoint cannot be converted or quantized."""


class ModelLoadError(ToolgradEdgeError):
    """A model file is missing, not GGUF, truncated, or of an unsupported kind."""


class GenerationError(ToolgradEdgeError):
    """Decoding failed or a request cannot be served."""


class ContextLengthError(GenerationError):
    """The prompt plus requested tokens do not fit the model's context."""


class EvaluationError(ToolgradEdgeError):
    """A benchmark or evaluation run cannot proceed."""


class ToolSourceError(ToolgradEdgeError):
    """A tool source (MCP server, Python function, config file) cannot be used."""
