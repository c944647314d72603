"""`toolgrad-edge bench --engine URL` against the local stand-in llama-server (protocol, shape, usage errors).

The stand-in answers the bench's tools with a fixed call in the syntax the
request's grammar asks for, or with scripted faults; figures are checked for
what they are (medians of the timed runs, valid fraction), not for speed.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from test_engine_llama_server import StandIn
from toolgrad_edge.bench import remote as bench_engine
from toolgrad_edge.bench.measure import bench_prompt
from toolgrad_edge.cli import main
from toolgrad_edge.grammars import build_grammar, load_tools

PY_CALL = '[Homes_2_FindHomeByArea(area="Denver, CO", intent="rent", number_of_beds=2, number_of_baths=1)]'
JSON_CALL = ('[{"name": "Homes_2_FindHomeByArea", "arguments": {"area": "Denver, CO", "intent": "rent", '
             '"number_of_beds": 2, "number_of_baths": 1}}]')
TOOLS = load_tools(bench_prompt(0)[1])
JSON_GRAMMAR = build_grammar(TOOLS, syntax="json", tool_choice="required")


def bench_answer(body: dict) -> str:
    return JSON_CALL if body.get("grammar") == JSON_GRAMMAR else PY_CALL


@pytest.fixture
def stand_in():
    server = StandIn()
    server.n_ctx = 100_000  # the stand-in spends one token per character of the ~6,700-character prompt
    server.answer = bench_answer
    yield server
    server.stop()


def test_measure_engine_sends_the_bench_queries_and_reports_client_figures(stand_in):
    report = bench_engine.measure_engine(stand_in.url, runs=3, max_tokens=64)
    bodies = stand_in.completions()
    assert len(bodies) == 2 * (3 + 1)  # python and json, warm-up + 3 timed runs each
    grammars = [b["grammar"] for b in bodies]
    assert grammars[:4] == [build_grammar(TOOLS, tool_choice="required")] * 4 and grammars[4:] == [JSON_GRAMMAR] * 4
    assert all(b["n_predict"] == 64 and b["stream"] is True for b in bodies)
    queries = [b["content"] for p, b in stand_in.requests if p == "/tokenize" and not b["parse_special"]
               and b["content"].startswith(bench_prompt(0)[0][0]["content"][:12])]
    assert queries  # the first bench query went to the server's tokenizer

    assert set(report) == {"machine", "runs", "server", "models"} and report["runs"] == 3
    assert report["server"] == {"url": stand_in.url, "model": "/models/stand-in.gguf", "n_ctx_per_slot": 100_000,
                                "n_vocab": 262144, "total_slots": 2, "build": "b0-standin"}
    [m] = report["models"]
    assert m["model"] == "/models/stand-in.gguf" and m["backend"] == f"llama-server at {stand_in.url}"
    assert m["prompt_tokens"] == len(bodies[0]["prompt"])
    assert m["decode_tps_constrained"] > 0 and m["json"]["decode_tps_constrained"] > 0
    assert 0 < m["ttft_warm_s"] <= m["latency_p50_s"]
    assert m["warm_cached_tokens"] == 7  # the stand-in's cache_n
    assert m["constrained_tokens"] == len(PY_CALL) // 4 + 1  # the stand-in's tokens_predicted
    assert m["valid_fraction"] == 1.0 and m["invalid_calls"] == [] and m["json"]["valid_fraction"] == 1.0
    assert m["constrained_output"] == PY_CALL
    # Measured only with a local file: absent, not estimated.
    for local_only in ("prefill_tps", "decode_tps_free", "decode_tps_stepwise", "decode_tps_baseline",
                       "peak_rss_bytes", "file_size_bytes", "quant", "ttft_cold_s", "tokens_per_forward",
                       "ratios", "quality"):
        assert local_only not in m
    json.dumps(report)  # plain data


def test_calls_that_do_not_validate_are_counted_and_listed(stand_in):
    answers = iter([PY_CALL, PY_CALL, '[Homes_2_FindHomeByArea(area="Denver, CO")]', PY_CALL])
    stand_in.answer = lambda body: next(answers, JSON_CALL)
    report = bench_engine.measure_engine(stand_in.url, runs=3)
    [m] = report["models"]
    assert m["valid_fraction"] == pytest.approx(2 / 3)
    [bad] = m["invalid_calls"]
    assert bad["query"] == 2 and "is a required property" in bad["parse_error"]
    assert "invalid (python, query 2" in bench_engine.format_table(report)


def test_cli_bench_engine_prints_a_table_json_and_markdown(stand_in):
    table = CliRunner().invoke(main, ["bench", "--engine", stand_in.url, "--runs", "1"])
    assert table.exit_code == 0, table.output
    assert f"llama-server at {stand_in.url} (build b0-standin, 2 slots of 100000 tokens)" in table.stdout
    assert "constrained t/s" in table.stdout and "TTFT warm s" in table.stdout and "100%" in table.stdout
    as_json = CliRunner().invoke(main, ["bench", "--engine", stand_in.url, "--runs", "1", "--max-tokens", "32",
                                        "--json"])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["models"][0]["max_tokens"] == 32 and report["runs"] == 1
    markdown = CliRunner().invoke(main, ["bench", "--engine", stand_in.url, "--runs", "1", "--markdown"])
    assert markdown.exit_code == 0 and "| model | prompt tokens | constrained t/s |" in markdown.stdout


@pytest.mark.parametrize("extra, named", [
    (["--draft-model", "FILE"], "--draft-model"),
    (["--grammar-engine", "llama"], "--grammar-engine"),
    (["--threads", "2"], "--threads"),
    (["--from", "FILE", "--quant", "Q8_0"], "--quant and --from"),
    (["--plot", "speed.png"], "--plot"),
])
def test_local_only_options_with_engine_are_usage_errors(extra, named, tmp_path):
    gguf = tmp_path / "draft.gguf"
    gguf.write_bytes(b"GGUF")
    args = [str(gguf) if a == "FILE" else a for a in extra]
    result = CliRunner().invoke(main, ["bench", "--engine", "http://127.0.0.1:9", *args])
    assert result.exit_code == 2, result.output
    assert f"{named} appl" in result.output and "drop" in result.output and "or --engine" in result.output
    assert "Traceback" not in result.output


def test_model_with_engine_is_the_shared_usage_error(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    result = CliRunner().invoke(main, ["bench", "--engine", "http://127.0.0.1:9", "-m", str(gguf)])
    assert result.exit_code == 2 and "--model and --engine both given" in result.output


def test_a_bad_or_unreachable_engine_is_one_line():
    bad = CliRunner().invoke(main, ["bench", "--engine", "gpu-box:8080"])
    assert bad.exit_code == 2 and "expected http://HOST:PORT" in bad.output
    server = StandIn()
    url = server.url
    server.stop()
    down = CliRunner().invoke(main, ["bench", "--engine", url, "--runs", "1"])
    assert down.exit_code == 1 and f"cannot reach llama-server at {url}" in down.output
    assert "Traceback" not in down.output


def test_the_environment_does_not_switch_bench_to_a_server(monkeypatch, stand_in):
    from toolgrad_edge.bench import compare as bench_compare

    seen = {}

    def fake_compare(paths, **kwargs):
        seen["paths"] = paths
        raise bench_compare.EvaluationError("stop here")

    monkeypatch.setenv("TOOLGRAD_EDGE_ENGINE", stand_in.url)
    monkeypatch.setattr(bench_compare, "compare_models", fake_compare)
    result = CliRunner().invoke(main, ["bench", "-m", __file__])
    assert result.exit_code == 1 and "stop here" in result.output
    assert [str(p) for p in seen["paths"]] == [__file__] and stand_in.requests == []


def test_the_environment_selects_the_server_when_no_file_is_named(monkeypatch, stand_in):
    monkeypatch.setenv("TOOLGRAD_EDGE_ENGINE", stand_in.url)
    result = CliRunner().invoke(main, ["bench", "--runs", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert stand_in.url in json.dumps(json.loads(result.stdout)) and stand_in.requests
    monkeypatch.setenv("TOOLGRAD_EDGE_ENGINE", "gpu-box:8080")
    bad = CliRunner().invoke(main, ["bench"])
    assert bad.exit_code == 2 and "$TOOLGRAD_EDGE_ENGINE is 'gpu-box:8080'" in bad.output
