"""``toolgrad-edge serve``: options, start-up message, bad settings; one real start in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from toolgrad_edge.cli import main

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


class _FakeRuntime:
    model_name = "fake"
    model_path = "/models/fake.gguf"

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture
def started(monkeypatch):
    """Run `serve` without a model or a socket; record what uvicorn would have been given."""
    import toolgrad_edge.runtime as runtime_module
    from toolgrad_edge.cli import serve_cmd

    seen: dict = {}
    monkeypatch.setattr(runtime_module, "ToolRuntime", _FakeRuntime)
    monkeypatch.setattr(serve_cmd, "_run_uvicorn",
                        lambda app, host, port, log_level: seen.update(app=app, host=host, port=port))
    return seen


def test_help_has_examples():
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "--api-key" in result.output and "--max-queue" in result.output


def test_binds_loopback_by_default_and_says_so(started):
    result = CliRunner().invoke(main, ["serve", "--port", "9999"])
    assert result.exit_code == 0, result.output
    assert started["host"] == "127.0.0.1" and started["port"] == 9999
    assert "http://127.0.0.1:9999/v1" in result.output
    assert "loopback" in result.output and "only this machine" in result.output
    settings = started["app"].state.settings
    assert settings.max_queue == 16 and settings.api_key is None


def test_tool_choice_default_reaches_the_settings(started):
    assert CliRunner().invoke(main, ["serve"]).exit_code == 0
    assert started["app"].state.settings.tool_choice == "auto"
    result = CliRunner().invoke(main, ["serve", "--tool-choice", "required"])
    assert result.exit_code == 0, result.output
    assert started["app"].state.settings.tool_choice == "required"
    assert "/api (Ollama)" in result.output
    bad = CliRunner().invoke(main, ["serve", "--tool-choice", "always"])
    assert bad.exit_code == 2 and "'always' is not one of" in bad.output


def test_other_hosts_warn_without_a_key(started):
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--max-queue", "3"])
    assert result.exit_code == 0
    assert "other machines" in result.output and "no --api-key" in result.output
    assert started["app"].state.settings.max_queue == 3


def test_limits_reach_the_settings(started):
    result = CliRunner().invoke(main, ["serve", "--api-key", "k", "--max-tools", "8", "--max-body-bytes", "4096",
                                       "--max-tokens-limit", "100", "--default-max-tokens", "50"])
    assert result.exit_code == 0, result.output
    s = started["app"].state.settings
    assert (s.api_key, s.max_tools, s.max_body_bytes, s.max_tokens_limit, s.default_max_tokens) == \
        ("k", 8, 4096, 100, 50)


@pytest.mark.parametrize("args, words", [
    (["--default-max-tokens", "5000"], "default_max_tokens"),
    (["--max-queue", "0"], "--max-queue"),
    (["--api-key", " "], "api-key"),
    (["--n-gpu-layers", "lots"], "--n-gpu-layers"),
])
def test_bad_settings_are_one_line(started, args, words):
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code != 0
    assert words in result.output and "Traceback" not in result.output


def test_missing_model_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "missing.gguf")])
    assert result.exit_code == 1
    assert "Error:" in result.output and "Traceback" not in result.output


@pytest.mark.server
def test_serve_starts_answers_and_stops(gemma_270m_gguf):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from toolgrad_edge.cli import main; main()", "serve",
           "--model", str(gemma_270m_gguf), "--port", str(port), "--n-ctx", "1024", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 90
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["status"]
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert status == "ok"
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        assert models["data"][0]["id"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"http://127.0.0.1:{port}/v1" in out and "loopback" in out
    assert proc.returncode == 0, out


def test_parallel_reaches_the_runtime(started, monkeypatch):
    import toolgrad_edge.runtime as runtime_module

    seen = []

    class Recording(_FakeRuntime):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            seen.append(kwargs)

    monkeypatch.setattr(runtime_module, "ToolRuntime", Recording)
    assert CliRunner().invoke(main, ["serve"]).exit_code == 0
    assert seen[-1]["parallel"] == "auto"  # chosen from the machine when the model loads
    assert CliRunner().invoke(main, ["serve", "--parallel", "8"]).exit_code == 0
    assert seen[-1]["parallel"] == 8
    for bad in ("0", "many"):
        result = CliRunner().invoke(main, ["serve", "--parallel", bad])
        assert result.exit_code != 0 and "--parallel" in result.output and "Traceback" not in result.output
