"""Where toolgrad-edge keeps its files.

Everything lives under one cache root so tests can point it at a temporary
folder: ``TOOLGRAD_EDGE_CACHE`` if set, else ``$XDG_CACHE_HOME/toolgrad-edge``,
else ``~/.cache/toolgrad-edge``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "TOOLGRAD_EDGE_CACHE"
ENV_MODEL = "TOOLGRAD_EDGE_MODEL"


def cache_root() -> Path:
    explicit = os.environ.get(ENV_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "toolgrad-edge"


def models_dir() -> Path:
    """Converted GGUF files (``convert`` writes here, ``ToolRuntime`` looks here)."""
    return cache_root() / "models"


def prefix_cache_dir() -> Path:
    """Saved llama.cpp states of evaluated tool prefixes."""
    return cache_root() / "prefix"


def llguidance_dir() -> Path:
    """llguidance's token files, one per model file and llama.cpp version."""
    return cache_root() / "llguidance"


def llama_server_dir() -> Path:
    """llama-server builds, one folder per llama-cpp-python version (``build-server``)."""
    return cache_root() / "llama-server"
