"""The llama-server engine against a real llama-server on the Gemma 3 270M GGUF.

Runs when $TOOLGRAD_EDGE_LLAMA_SERVER names a llama-server binary
(``toolgrad-edge build-server`` builds one from llama-cpp-python's sources and
prints its path; .ci/run does so before the tests); skipped otherwise. The server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from toolgrad_edge.engines.llama_server import Completion, LlamaServerEngine
from toolgrad_edge.grammars import build_grammar, load_tools, parse_calls
from toolgrad_edge.prompt import render_prompt
from toolgrad_edge.runtime import Decoded

BINARY = os.environ.get("TOOLGRAD_EDGE_LLAMA_SERVER")
TOOLS = Path(__file__).resolve().parents[1] / "examples" / "tools.json"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BINARY or not os.access(BINARY, os.X_OK),
                       reason="set TOOLGRAD_EDGE_LLAMA_SERVER to a llama-server binary"),
]


@pytest.fixture(scope="module")
def server_url(gemma_270m_gguf):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [BINARY, "-m", str(gemma_270m_gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", "2",
         "--ctx-size", "4096", "--threads", "2", "--swa-full", "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, "llama-server exited while starting"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama-server was not healthy within 120 s"
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _slots_busy(url: str) -> bool | None:
    try:
        with urllib.request.urlopen(url + "/slots", timeout=5) as r:
            return any(slot.get("is_processing") for slot in json.load(r))
    except OSError:
        return None  # /slots disabled on this build


def test_connects_and_sees_a_gemma3_vocabulary(server_url):
    engine = LlamaServerEngine(server_url)
    assert engine.info.n_vocab == 262144
    assert engine.info.n_ctx == 2048  # 4096 shared by 2 slots
    assert engine.info.total_slots == 2


def test_server_tokens_match_the_in_process_tokenizer(server_url, gemma_270m_gguf):
    import llama_cpp

    tools = load_tools(str(TOOLS))
    parts = render_prompt("Weather in Paris? Ünïcode ✓ and <end_of_turn> typed by the user", tools)
    remote = LlamaServerEngine(server_url).tokenize_segments(parts.prefix + parts.rest)
    vocab_only = llama_cpp.Llama(str(gemma_270m_gguf), vocab_only=True, verbose=False)
    try:
        control = {"<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}
        local = []
        for seg in parts.prefix + parts.rest:
            if seg.control:
                local.append(control[seg.text])
            elif seg.text:
                local += vocab_only.tokenize(seg.text.encode(), add_bos=False, special=False)
    finally:
        vocab_only.close()
    assert remote == local
    assert remote.count(106) == 1  # the user's "<end_of_turn>" stayed text


def test_grammar_constrained_call_parses(server_url):
    tools = load_tools(str(TOOLS))
    engine = LlamaServerEngine(server_url)
    # A phrasing the base 270M model answers with one short call in the grammar's compact layout.
    parts = render_prompt("Weather in Paris, in celsius?", tools)
    items = list(engine.generate(parts.prefix + parts.rest, build_grammar(tools, tool_choice="required"),
                                 max_tokens=48, stream=True))
    final = items[-1]
    assert isinstance(final, Completion) and final.finish_reason == "stop"
    assert "".join(i for i in items if isinstance(i, str)) == final.text
    calls = parse_calls(final.text, tools)
    assert calls and calls[0].name in {t.name for t in tools}
    again = list(engine.generate(parts.prefix + parts.rest, build_grammar(tools, tool_choice="required"),
                                 max_tokens=48, stream=False))[-1]
    assert again.text == final.text  # temperature 0, same slot or not
    assert again.cached_tokens > 0  # cache_prompt kept the prompt


def test_cancelling_stops_the_remote_generation(server_url):
    engine = LlamaServerEngine(server_url)
    seen = []
    prompt = render_prompt("Write a very long story about a lighthouse keeper.", [])
    for item in engine.generate(prompt.prefix + prompt.rest, None, max_tokens=2000,
                                should_stop=lambda: len(seen) >= 3, stream=True):
        if isinstance(item, str):
            seen.append(item)
        else:
            assert item.finish_reason == "cancelled", f"finished ({item.finish_reason}) before it was cancelled"
    # 2000 tokens take 30 s or more even on an idle 2-core machine: a slot idle well before that was
    # cancelled, not finished.
    deadline = time.monotonic() + 15
    while _slots_busy(server_url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _slots_busy(server_url) in (False, None), "the slot kept generating after the client left"


def test_tool_runtime_over_the_server_gives_valid_calls(server_url):
    from toolgrad_edge.runtime import ToolRuntime

    with ToolRuntime(engine=server_url) as rt:
        result = rt.call("What is the weather in Paris in celsius?", str(TOOLS), tool_choice="get_weather",
                         max_tokens=48)
        streamed = list(rt.stream("Time in Tokyo?", str(TOOLS), tool_choice="required", max_tokens=48))
    assert result.parse_error is None and [c.name for c in result.tool_calls] == ["get_weather"]
    assert result.usage.cached_tokens > 0 or result.usage.prompt_tokens > 0
    final = streamed[-1].result
    assert final.tool_calls and final.parse_error is None
    assert "".join(i.text for i in streamed if isinstance(i, Decoded)) == final.raw_text


def test_bench_engine_measures_the_bench_workload_on_the_server(server_url, gemma_270m_gguf):
    from toolgrad_edge.bench.measure import bench_prompt
    from toolgrad_edge.bench.remote import format_table, measure_engine

    report = measure_engine(server_url, runs=1, max_tokens=64)
    [m] = report["models"]
    assert report["server"]["n_vocab"] == 262144 and report["server"]["total_slots"] == 2
    assert Path(m["model"]).name == gemma_270m_gguf.name
    # The server's tokenizer saw the shipped tool prompt (about 1,500 tokens), and kept its prefix between calls.
    assert 1000 < m["prompt_tokens"] < 2048
    assert m["warm_cached_tokens"] > 1000
    assert m["decode_tps_constrained"] > 0 and 0 < m["ttft_warm_s"] <= m["latency_p50_s"]
    for figures in (m, m["json"]):
        assert figures["valid_fraction"] == 1 - len(figures["invalid_calls"])
    assert m["constrained_output"].startswith("[")  # the required grammar held
    tool_names = {t["name"] for t in bench_prompt(0)[1]}
    assert m["constrained_output"][1:].split("(", 1)[0] in tool_names
    assert "constrained t/s" in format_table(report)
