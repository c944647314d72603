"""--engine and --model on the command line: which one decodes, and when both is an error.

Rules: --engine URL and --model FILE together are a usage error on every
command that has both; $TOOLGRAD_EDGE_ENGINE is a default that a --model on
the command line overrides; --engine sets $TOOLGRAD_EDGE_ENGINE only while the
command runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolgrad_edge.cli import main
from toolgrad_edge.engines.llama_server import ENV_ENGINE

TOOLS = str(Path(__file__).resolve().parents[1] / "examples" / "tools.json")

# Each command that takes both options, with the arguments it needs besides them.
COMMANDS = {
    "call": ["call", "Weather in Paris?", "--tools", TOOLS],
    "ask": ["ask", "Weather in Paris?", "--tools", TOOLS],
    "chat": ["chat", "--tools", TOOLS],
    "serve": ["serve", "--port", "0"],
    "eval bfcl": ["eval", "bfcl", "--limit", "1"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_engine_and_model_together_are_a_usage_error(command, stand_in, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_ENGINE, raising=False)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    for order in (["--engine", stand_in.url, "--model", str(model)], ["-m", str(model), "--engine", stand_in.url]):
        result = CliRunner().invoke(main, COMMANDS[command] + order, input="")
        assert result.exit_code == 2, result.output
        assert ("--model and --engine both given: --engine runs on a remote llama-server, which uses its own "
                "model; drop one of them.") in result.output
        assert "Traceback" not in result.output
    assert stand_in.requests == []  # refused before anything was sent
    assert ENV_ENGINE not in os.environ


def test_model_on_the_command_line_wins_over_the_environment(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ENGINE, stand_in.url)
    missing = tmp_path / "local.gguf"
    result = CliRunner().invoke(main, ["call", "Weather in Paris?", "--tools", TOOLS, "--model", str(missing)])
    # The local file is what the command tried to open; the server in the environment was not asked.
    assert result.exit_code == 1 and f"{missing}: model file not found" in result.output
    assert stand_in.requests == []


def test_engine_in_the_environment_is_used_when_no_model_is_given(stand_in, monkeypatch):
    monkeypatch.setenv(ENV_ENGINE, stand_in.url)
    result = CliRunner().invoke(main, ["call", "Weather in Paris?", "--tools", TOOLS, "--tool-choice", "required",
                                       "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tool_calls"][0]["name"] == "get_weather"
    assert stand_in.completions()


def test_engine_option_is_passed_down_and_leaves_the_environment_alone(stand_in, monkeypatch):
    monkeypatch.setenv(ENV_ENGINE, "http://127.0.0.1:9")  # nothing listens there: --engine must win
    result = CliRunner().invoke(main, ["call", "Weather in Paris?", "--tools", TOOLS, "--engine", stand_in.url,
                                       "--tool-choice", "required", "--json"])
    assert result.exit_code == 0, result.output
    assert stand_in.completions()
    assert os.environ[ENV_ENGINE] == "http://127.0.0.1:9"


def test_a_bad_engine_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(ENV_ENGINE, "gpu-box:8080")
    result = CliRunner().invoke(main, ["call", "hi", "--tools", TOOLS])
    assert result.exit_code == 1
    assert f"${ENV_ENGINE}='gpu-box:8080': expected http://HOST:PORT" in result.output
    assert "Traceback" not in result.output


def test_engine_in_the_environment_beats_the_default_model_variable(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ENGINE, stand_in.url)
    monkeypatch.setenv("TOOLGRAD_EDGE_MODEL", str(tmp_path / "missing.gguf"))
    result = CliRunner().invoke(main, ["call", "Weather in Paris?", "--tools", TOOLS, "--json"])
    assert result.exit_code == 0, result.output
    assert stand_in.completions()
