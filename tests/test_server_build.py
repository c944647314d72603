"""Building llama-server from the installed llama-cpp-python's sources: where, reuse, and the errors.

The build itself (many minutes) is run by .ci/run, whose binary the real-server tests
(tests/test_engine_llama_server_real.py) start; these tests cover what happens around it.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import stat

import pytest
from click.testing import CliRunner

from toolgrad_edge.cli import main
from toolgrad_edge.engines import server_build
from toolgrad_edge.engines.server_build import ServerBuildError, build_llama_server, server_binary
from toolgrad_edge.paths import cache_root

VERSION = importlib.metadata.version("llama-cpp-python")
XEON = {"avx2", "avx512f", "avx512bw", "avx512vl", "amx_int8", "amx_tile", "amx_bf16", "fma", "f16c"}
EPYC = {"avx2", "avx512f", "avx512bw", "avx512vl", "fma", "f16c"}


def test_binary_path_per_cpu_variant():
    root = cache_root() / "llama-server" / VERSION
    assert server_binary(VERSION, EPYC) == root / "build" / "bin" / "llama-server"
    # An AMX CPU gets its own build, without the AMX kernels (-march=native would turn them on).
    assert server_binary(VERSION, XEON) == root / "build-no-amx" / "bin" / "llama-server"


def _fake_binary(path, script="#!/bin/sh\necho 'version: 1 (test)'\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_a_built_binary_is_reused_and_printed():
    binary = _fake_binary(server_binary())
    assert build_llama_server() == binary
    result = CliRunner().invoke(main, ["build-server"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(binary)
    assert "export TOOLGRAD_EDGE_LLAMA_SERVER=" in result.stderr


def test_missing_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(server_build.shutil, "which", lambda tool: None if tool == "cmake" else "/usr/bin/" + tool)
    result = CliRunner().invoke(main, ["build-server"])
    assert result.exit_code == 1
    assert "building llama-server needs cmake on PATH" in result.output
    assert "Traceback" not in result.output
    assert not server_binary().parent.exists()


@pytest.fixture
def build_tools(monkeypatch):
    """cmake and a compiler 'on PATH': these tests never run them, so they pass where neither is installed."""
    which = shutil.which
    monkeypatch.setattr(server_build.shutil, "which",
                        lambda tool: "/usr/bin/" + tool if tool in ("cmake", "c++") else which(tool))


def test_a_truncated_sdist_is_removed_with_nothing_left_behind(build_tools):
    root = cache_root() / "llama-server" / VERSION
    root.mkdir(parents=True)
    sdist = root / f"llama_cpp_python-{VERSION}.tar.gz"
    sdist.write_bytes(b"\x1f\x8b\x08\x00 truncated")
    with pytest.raises(ServerBuildError, match="could not be unpacked .* it was removed, run again"):
        build_llama_server()
    assert os.listdir(root) == []  # neither the bad file nor a half-unpacked tree


def test_a_binary_that_does_not_run_is_removed(monkeypatch, tmp_path, build_tools):
    # The build "succeeds" but leaves a binary that fails: it is not kept as a finished build.
    binary = server_binary()
    source = cache_root() / "llama-server" / VERSION / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    (source / "tools" / "server").mkdir(parents=True)
    calls = []

    def fake_run(cmd, log, what):
        calls.append(what)
        if what == "cmake's build step":
            _fake_binary(binary, "#!/bin/sh\necho 'illegal instruction' >&2\nexit 132\n")

    monkeypatch.setattr(server_build, "_run", fake_run)
    with pytest.raises(ServerBuildError, match=r"does not run \(--version exited with 132\): illegal instruction"):
        build_llama_server(log=open(os.devnull, "w"))
    assert calls == ["cmake's configure step", "cmake's build step"]
    assert not binary.exists()
