"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

The package's error hierarchy (``toolgrad_edge.errors``) is translated here,
once, into a status and that body. Anything else is an internal failure: a
500 whose body says so without a traceback (the traceback goes to the log).
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import (
    ContextLengthError,
    GenerationError,
    ModelLoadError,
    SchemaError,
    ToolCallError,
    ToolgradEdgeError,
)

log = logging.getLogger("toolgrad_edge.server")

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"
NOT_FOUND = "not_found_error"


class OpenAIError(Exception):
    """An HTTP answer in OpenAI's error shape, raised wherever a request is refused."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def translate(exc: BaseException) -> OpenAIError:
    """The one place where an exception becomes a status and an OpenAI error body."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return OpenAIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, SchemaError):
        # Tools are checked before queueing; a SchemaError from the runtime is
        # still the caller's tools or tool_choice, never the server's fault.
        return OpenAIError(400, str(exc), param="tools", code="invalid_tools")
    if isinstance(exc, ModelLoadError):
        return OpenAIError(503, str(exc), type=SERVER, code="model_unavailable")
    if isinstance(exc, (GenerationError, ToolCallError)):
        return OpenAIError(500, str(exc), type=SERVER, code="generation_failed")
    if isinstance(exc, ToolgradEdgeError):
        return OpenAIError(500, str(exc), type=SERVER, code="internal_error")
    log.error("internal error while serving a request", exc_info=(type(exc), exc, exc.__traceback__))
    return OpenAIError(
        500,
        f"The server hit an internal error ({type(exc).__name__}); the request was not completed. "
        "The server log has the details.",
        type=SERVER,
        code="internal_error",
    )
