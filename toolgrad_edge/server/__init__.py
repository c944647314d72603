"""The local server (``toolgrad-edge serve``): OpenAI's API and Ollama's, in the ``[server]`` extra.

FastAPI is imported only when the app is built, so importing this package
costs nothing when the server is not used.
"""

from __future__ import annotations

from typing import Any

from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def create_app(runtime: Any, settings: ServerSettings | None = None):
    """Build the FastAPI app over a ToolRuntime (or a factory returning one); see ``app.create_app``."""
    from .app import create_app as _create_app

    return _create_app(runtime, settings)
