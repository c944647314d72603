"""Server limits and options, in one place.

Plain data with no FastAPI import, so the ``serve`` command can build and
check it before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ToolgradEdgeError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# What serve --tool-choice may make the default. required-first: required when the last message is the
# user's, auto after tool results (a client's tool loop can end in text).
TOOL_CHOICES = ("auto", "required", "required-first", "none")


@dataclass(frozen=True)
class ServerSettings:
    """Limits on what one request may ask for, and how many may wait.

    The defaults fit a 4B model on a laptop: a tool list of a few hundred
    functions, answers of a few hundred tokens, a short queue.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 16            # requests waiting behind the one running
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON
    max_tools: int = 1024          # with llguidance the context is the real limit
    max_messages: int = 256
    max_tokens_limit: int = 2048   # the most a request may ask for
    default_max_tokens: int = 256  # when a request names no max_tokens
    syntax: str = "python"         # the call syntax the model writes
    model_name: str | None = None  # name shown by /v1/models; default: the GGUF's name
    tool_choice: str = "auto"      # for requests that send tools but name no tool choice (both APIs)

    def __post_init__(self) -> None:
        checks = [
            ("max_queue", self.max_queue, 1),
            ("max_body_bytes", self.max_body_bytes, 1024),
            ("max_tools", self.max_tools, 1),
            ("max_messages", self.max_messages, 1),
            ("max_tokens_limit", self.max_tokens_limit, 1),
            ("default_max_tokens", self.default_max_tokens, 1),
        ]
        for name, value, least in checks:
            if not isinstance(value, int) or value < least:
                raise ToolgradEdgeError(f"server setting {name} must be an integer >= {least}, got {value!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ToolgradEdgeError(
                f"default_max_tokens ({self.default_max_tokens}) is above max_tokens_limit "
                f"({self.max_tokens_limit}); lower the default or raise the limit"
            )
        if self.syntax not in ("python", "json"):
            raise ToolgradEdgeError(f"server setting syntax must be 'python' or 'json', got {self.syntax!r}")
        if self.tool_choice not in TOOL_CHOICES:
            raise ToolgradEdgeError(f"server setting tool_choice must be one of {', '.join(TOOL_CHOICES)}, "
                                    f"got {self.tool_choice!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ToolgradEdgeError("--api-key is empty; give a non-empty key or leave the option out")

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS
