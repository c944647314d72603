"""ToolRuntime(engine="http://HOST:PORT"): the public API over a (stand-in) llama-server.

No model file is loaded: the prompt is rendered and tokenized through the
server, the grammar sent with the request, and the answer parsed here into
the same CallResult as in-process decoding.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from test_engine_llama_server import ANSWER, StandIn
from toolgrad_edge.engines.llama_server import ENV_ENGINE, LlamaServerEngine
from toolgrad_edge.errors import GenerationError
from toolgrad_edge.grammars import build_grammar, load_tools
from toolgrad_edge.runtime import CallDone, CallResult, Decoded, Final, ToolRuntime

TOOLS = str(Path(__file__).resolve().parents[1] / "examples" / "tools.json")


def test_call_parses_the_remote_answer_into_tool_calls(stand_in):
    with ToolRuntime(engine=stand_in.url) as rt:
        assert rt.backend == f"llama-server at {stand_in.url}" and rt.n_ctx == 4096
        result = rt.call("Weather in Paris?", TOOLS, tool_choice="required", max_tokens=64)
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    assert result.finish_reason == "tool_calls" and result.parse_error is None
    assert result.usage.cached_tokens == 7 and result.usage.prompt_tokens > 100
    body = stand_in.completions()[-1]
    assert body["grammar"] == build_grammar(load_tools(TOOLS), tool_choice="required")
    assert body["stream"] is True and body["n_predict"] == 64 and body["prompt"][:2] == [2, 105]


def test_stream_yields_deltas_then_the_call_result(stand_in):
    rt = ToolRuntime(engine=stand_in.url)
    items = list(rt.stream("Weather in Paris?", TOOLS))
    assert "".join(i.text for i in items if isinstance(i, Decoded)) == ANSWER
    assert [i.call.name for i in items if isinstance(i, CallDone)] == ["get_weather"]
    assert isinstance(items[-1], Final) and items[-1].result.tool_calls[0].name == "get_weather"


def test_output_that_ignores_the_grammar_is_a_parse_error(stand_in):
    stand_in.answer = '[get_weather(town="Paris")]'
    result = ToolRuntime(engine=stand_in.url).call("Weather in Paris?", TOOLS, tool_choice="required")
    assert result.tool_calls == [] and result.parse_error
    assert result.raw_text == stand_in.answer


def test_stop_strings_end_a_text_answer_here(stand_in):
    stand_in.answer = "Hello there. General Kenobi."
    result = ToolRuntime(engine=stand_in.url).call("Say hello", None, stop=["General"])
    assert result.content == "Hello there. " and result.finish_reason == "stop"


def test_the_environment_selects_the_engine_and_timeouts_are_configurable(stand_in, monkeypatch):
    monkeypatch.setenv(ENV_ENGINE, stand_in.url)
    assert ToolRuntime().backend.startswith("llama-server at")
    stand_in.mode = "hang"
    rt = ToolRuntime(engine=LlamaServerEngine(stand_in.url, read_timeout=0.5))
    with pytest.raises(GenerationError, match=r"no answer for 0.5 s"):
        rt.call("Weather in Paris?", TOOLS)


def test_an_unreachable_engine_is_one_line_naming_the_url():
    server = StandIn()
    url = server.url
    server.stop()
    with pytest.raises(GenerationError, match=f"cannot reach llama-server at {url}"):
        ToolRuntime(engine=url)


def test_cli_engine_option_runs_call_on_the_server(stand_in, monkeypatch):
    import json

    from click.testing import CliRunner

    from toolgrad_edge.cli import main

    monkeypatch.setenv(ENV_ENGINE, "")  # restored after the test: --engine sets it for the runtime
    result = CliRunner().invoke(main, ["call", "Weather in Paris?", "--tools", TOOLS, "--engine", stand_in.url,
                                       "--tool-choice", "required", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tool_calls"][0]["name"] == "get_weather"
    assert stand_in.completions(), "the request did not reach the server"
    bad = CliRunner().invoke(main, ["call", "hi", "--tools", TOOLS, "--engine", "gpu-box:8080"])
    assert bad.exit_code == 2 and "expected http://HOST:PORT" in bad.output


def test_the_openai_server_serves_calls_decoded_on_llama_server(stand_in):
    import json

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from toolgrad_edge.server import create_app

    tools = json.loads(Path(TOOLS).read_text())
    with TestClient(create_app(ToolRuntime(engine=stand_in.url))) as client:
        models = client.get("/v1/models").json()
        reply = client.post("/v1/chat/completions", json={
            "model": models["data"][0]["id"], "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": tools, "tool_choice": "required"})
    assert reply.status_code == 200, reply.text
    call = reply.json()["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert models["data"][0]["id"] == "stand-in"


def test_a_closed_remote_runtime_refuses_calls_like_a_closed_local_one(stand_in):
    rt = ToolRuntime(engine=stand_in.url)
    assert rt.call("Weather in Paris?", TOOLS, tool_choice="required").tool_calls
    sent = len(stand_in.completions())
    rt.close()
    with pytest.raises(GenerationError, match=rf"this ToolRuntime \(over llama-server at {stand_in.url}\) is closed"):
        rt.call("Weather in Paris?", TOOLS, tool_choice="required")
    with pytest.raises(GenerationError, match="is closed"):
        next(iter(rt.stream("Weather in Paris?", TOOLS)))
    assert len(stand_in.completions()) == sent  # nothing reached the server after close()
    rt.close()  # closing twice is harmless


def test_an_open_remote_runtime_says_it_has_no_local_session(stand_in):
    with ToolRuntime(engine=stand_in.url) as rt:
        with pytest.raises(GenerationError, match=f"decodes on llama-server at {stand_in.url}: it holds no local"):
            rt.session


@pytest.mark.parametrize("option", [{"draft_model": "draft.gguf"}, {"grammar_engine": "llama"}])
def test_local_decoding_options_over_llama_server_are_refused(stand_in, option, monkeypatch):
    from toolgrad_edge.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=f"{next(iter(option))} apply to a local model.*{stand_in.url}"):
        ToolRuntime(engine=stand_in.url, **option)
    monkeypatch.setenv("TOOLGRAD_EDGE_ENGINE", stand_in.url)
    with pytest.raises(ModelLoadError, match="TOOLGRAD_EDGE_ENGINE"):
        ToolRuntime(**option)


def test_closing_the_runtime_ends_its_running_remote_requests(stand_in):
    import threading
    import time

    stand_in.mode = "slow"  # 400 pieces, 20 ms apart: about 8 s unless stopped
    rt = ToolRuntime(engine=stand_in.url)
    outcome = {}

    def run():
        try:
            rt.call("Weather in Paris?", TOOLS, tool_choice="required", max_tokens=400)
        except GenerationError as exc:
            outcome["error"] = str(exc)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.3)
    rt.close()
    worker.join(30)
    assert not worker.is_alive()
    # Left alone, the request would end normally after about 8 s; the stand-in seeing the
    # connection go away (below) shows that close() cut it.
    assert "was closed during the request" in outcome["error"] and stand_in.url in outcome["error"]
    assert stand_in.disconnected.wait(5), "llama-server never saw the request go away"


def test_more_tools_than_the_gbnf_sampler_takes_are_refused_naming_llama_server(stand_in):
    from toolgrad_edge.errors import SchemaError

    tools = [{"name": f"tool_{i}", "parameters": {"type": "object"}} for i in range(257)]
    with ToolRuntime(engine=stand_in.url) as rt:
        with pytest.raises(SchemaError, match=rf"257 tools given; llama-server at {stand_in.url} decodes with "
                                              r"llama.cpp's GBNF grammar sampler.*llguidance"):
            rt.call("Weather in Paris?", tools, tool_choice="required")
        assert stand_in.completions() == []  # refused before anything is sent
        assert rt.call("Weather in Paris?", TOOLS, tool_choice="required").tool_calls  # still usable
