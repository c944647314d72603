"""API errors: one type, rendered in each API's shape.

An ``APIError`` is raised wherever a request is refused, on either API; it
renders as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` or as
Ollama's ``{"error": "message"}``. The package's error hierarchy
(``toolgrad_edge.errors``) is translated here, once, into a status and that
error. Anything else is an internal failure: a 500 whose body says so
without a traceback (the traceback goes to the log).
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
    TooManyToolsError,
)

log = logging.getLogger("toolgrad_edge.server")

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"
NOT_FOUND = "not_found_error"


class APIError(Exception):
    """An HTTP error answer, raised wherever a request is refused; each API renders it in its shape."""

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

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}


def translate(exc: BaseException) -> APIError:
    """The one place where an exception becomes a status and an API error."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, TooManyToolsError):
        return APIError(400, str(exc), param="tools", code="too_many_tools")
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, SchemaError):
        # Tools are checked before queueing; a SchemaError from the runtime is
        # still the caller's tools or tool_choice, never the server's fault.
        return APIError(400, str(exc), param="tools", code="invalid_tools")
    if isinstance(exc, ModelLoadError):
        return APIError(503, str(exc), type=SERVER, code="model_unavailable")
    if isinstance(exc, (GenerationError, ToolCallError)):
        return APIError(500, str(exc), type=SERVER, code="generation_failed")
    if isinstance(exc, ToolgradEdgeError):
        return APIError(500, str(exc), type=SERVER, code="internal_error")
    log.error("internal error while serving a request", exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(
        500,
        f"The server hit an internal error ({type(exc).__name__}); the request was not completed. "
        "The server log has the details.",
        type=SERVER,
        code="internal_error",
    )
