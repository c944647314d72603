"""Tier 1: the server's HTTP behaviour over a fake runtime (no model).

The fake has ToolRuntime's call/stream signature and answers from a script,
so request checking, error shapes, the queue and the SSE format are tested in
milliseconds. The real model is exercised in test_server_e2e.py.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from toolgrad_edge.errors import ContextLengthError, GenerationError  # noqa: E402
from toolgrad_edge.server import ServerSettings, create_app  # noqa: E402
from toolgrad_edge.server.queue import Job, QueueFull, RequestQueue  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}},
}
USER = [{"role": "user", "content": "Weather in Paris and time in CET?"}]


@dataclass
class FakeCall:
    name: str
    arguments: dict


@dataclass
class FakeUsage:
    prompt_tokens: int = 10
    completion_tokens: int = 5
    cached_tokens: int = 4


class FakeEngine:
    """The compile step of an in-process engine with ``grammar_engine`` (the llama one: GBNF, at most 256 tools)."""

    def __init__(self, grammar_engine: str):
        self.grammar_format = "lark" if grammar_engine == "llguidance" else "gbnf"

    def compile_calls(self, tools, **options):
        from toolgrad_edge.engines.inprocess import InProcessEngine

        return InProcessEngine.compile_calls(self, tools, **options)


def answer_events(text: str, tools, grammar=None, finish: str = "stop", pieces: int = 3, before_piece=None):
    """ToolRuntime's events for ``text`` decoded in ``pieces``-character steps: read by the runtime's own
    AnswerReader, so the fake's answers are parsed exactly as the runtime's are.

    ``before_piece(n, offset)`` runs before each piece; returning a finish reason ends the answer there."""
    from toolgrad_edge.runtime import AnswerReader, Final

    tool_list = getattr(tools, "tools", None) or []
    reader = AnswerReader(tool_list, "python", calls=bool(tool_list) and grammar is None)
    for n, i in enumerate(range(0, len(text), pieces)):
        cut = before_piece(n, i) if before_piece is not None else None
        if cut is not None:
            finish = cut
            break
        yield from reader.feed(text[i:i + pieces])
    events, result = reader.finish(finish)
    result.usage = FakeUsage()
    yield from events
    yield Final(result)


class FakeRuntime:
    """Answers like ToolRuntime: calls when tools allow, text otherwise; records what it was asked."""

    model_name = "fake-model"
    grammar_engine = "llama"

    def __init__(self, delay_s: float = 0.0, fail: BaseException | None = None, fail_after: int | None = None):
        self.delay_s = delay_s
        self.fail = fail
        self.fail_after = fail_after  # fail after this many text deltas (mid-stream)
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()  # set when a request starts running
        self.cancelled = 0

    @property
    def engine(self):
        return FakeEngine(self.grammar_engine)

    def compile_tools(self, tools, tool_choice="auto", parallel=True, syntax="python"):
        from toolgrad_edge.runtime import ToolRuntime

        return ToolRuntime.compile_tools(self, tools, tool_choice, parallel, syntax)

    def describe(self):
        from pathlib import Path

        from toolgrad_edge.engines import EngineDescription

        fmt = self.engine.grammar_format
        return EngineDescription(
            model_name=self.model_name, model_path=Path(getattr(self, "model_path", "fake.gguf")), backend="fake",
            n_ctx=getattr(self, "n_ctx", 2048), grammar_engine=self.grammar_engine, grammar_format=fmt,
            max_tools=None if fmt == "lark" else 256, concurrency=1, speculative=False,
            gguf=getattr(self, "info", None))

    def _answer(self, tools, tool_choice, parallel, grammar):
        if grammar is not None:
            return '{"city": "Paris"}'
        if not tools or tool_choice == "none":
            return " It is sunny. "  # the runtime strips it when it was parsed for calls
        calls = [FakeCall("get_weather", {"city": "Paris", "unit": "c"}), FakeCall("get_time", {"tz": "CET"})]
        calls = [c for c in calls if c.name in {t.name for t in tools}]  # only the tools it was given
        if tool_choice not in ("auto", "required"):
            calls = [c for c in calls if c.name == tool_choice]
        if not parallel:
            calls = calls[:1]
        return "[" + ", ".join(
            f"{c.name}(" + ", ".join(f"{k}={v!r}" for k, v in c.arguments.items()) + ")" for c in calls
        ) + "]"

    def stream(self, messages, tools=None, tool_choice="auto", parallel=True, syntax="python", max_tokens=256,
               temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=None, constrained=True, grammar=None,
               should_stop=None):
        if tools is not None and not hasattr(tools, "tools"):
            tools = self.compile_tools(tools, tool_choice, parallel, syntax)
        specs = [{"type": "function", "function": t.spec} for t in tools.tools] if tools is not None else None
        self.requests.append({"messages": messages, "tools": specs, "tool_choice": tool_choice,
                              "parallel": parallel, "max_tokens": max_tokens, "stop": stop, "seed": seed,
                              "temperature": temperature, "grammar": grammar})
        self.started.set()
        if self.fail is not None and self.fail_after is None:
            raise self.fail

        def before_piece(n, i):
            if self.fail_after is not None and n == self.fail_after:
                raise self.fail
            self.release.wait(10)
            if should_stop is not None and should_stop():
                self.cancelled += 1
                return "cancelled"
            time.sleep(self.delay_s)
            return None

        yield from answer_events(self._answer(tools.tools if tools else None, tool_choice, parallel, grammar),
                                 tools, grammar, before_piece=before_piece)

    def call(self, *args, **kwargs):
        from toolgrad_edge.runtime import Final

        for event in self.stream(*args, **kwargs):
            if isinstance(event, Final):
                return event.result


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def runtime():
    return FakeRuntime()


@pytest.fixture
def client(runtime):
    with TestClient(create_app(runtime, ServerSettings(max_tools=4, max_tokens_limit=512,
                                                       max_body_bytes=64 * 1024))) as c:
        yield c


def chat(client, **body):
    body.setdefault("model", "fake-model")
    body.setdefault("messages", USER)
    return client.post("/v1/chat/completions", json=body)


def sse_chunks(response) -> list[Any]:
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def reassemble(chunks) -> tuple[list[dict], str, str | None]:
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in chunks:
        if not chunk["choices"]:
            continue
        choice = chunk["choices"][0]
        delta = choice["delta"]
        content += delta.get("content") or ""
        for tc in delta.get("tool_calls") or []:
            slot = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in tc:
                slot["id"] = tc["id"]
            fn = tc.get("function", {})
            if fn.get("name"):
                assert slot["name"] is None, "a call's name is sent once"
                assert slot["arguments"] == "", "the name comes before the arguments"
                slot["name"] = fn["name"]
            slot["arguments"] += fn.get("arguments") or ""
        finish = choice["finish_reason"] or finish
    return [calls[i] for i in sorted(calls)], content, finish


# -- happy paths ---------------------------------------------------------------


def test_health_and_models(client):
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake-model"
    assert client.get("/v1/models/fake-model").status_code == 200
    assert client.get("/v1/models/other").status_code == 404


def test_tool_calls_have_openai_shape(client, runtime):
    r = chat(client, tools=[WEATHER, TIME], seed=7, max_tokens=64)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    assert all(c["type"] == "function" for c in calls)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                             "prompt_tokens_details": {"cached_tokens": 4}}
    asked = runtime.requests[-1]
    assert asked["tool_choice"] == "auto" and asked["seed"] == 7 and asked["max_tokens"] == 64


@pytest.mark.parametrize("choice, expected", [
    ("auto", "auto"), ("required", "required"), ("none", "none"),
    ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
])
def test_tool_choice_reaches_the_runtime(client, runtime, choice, expected):
    r = chat(client, tools=[WEATHER, TIME], tool_choice=choice)
    assert r.status_code == 200, r.text
    assert runtime.requests[-1]["tool_choice"] == expected
    message = r.json()["choices"][0]["message"]
    if expected == "none":
        assert message["content"] == "It is sunny." and "tool_calls" not in message
    elif expected == "get_time":
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time"]


def test_parallel_false_and_max_completion_tokens(client, runtime):
    r = chat(client, tools=[WEATHER, TIME], parallel_tool_calls=False, max_tokens=10, max_completion_tokens=20)
    assert len(r.json()["choices"][0]["message"]["tool_calls"]) == 1
    assert runtime.requests[-1]["parallel"] is False and runtime.requests[-1]["max_tokens"] == 20


def test_stream_reassembles_to_the_whole_answer(client):
    whole = chat(client, tools=[WEATHER, TIME]).json()["choices"][0]
    r = chat(client, tools=[WEATHER, TIME], stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_chunks(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 15
    calls, content, finish = reassemble(chunks)
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]
    ]
    assert all(c["id"].startswith("call_") for c in calls)


@pytest.mark.parametrize("tools", [None, [WEATHER]])
def test_stream_text_answer(client, tools):
    kwargs = {"tools": tools, "tool_choice": "none"} if tools else {}
    r = chat(client, stream=True, **kwargs)
    calls, content, finish = reassemble(sse_chunks(r))
    assert calls == [] and finish == "stop"
    assert content == chat(client, **kwargs).json()["choices"][0]["message"]["content"]


def test_response_format_passes_a_grammar(client, runtime):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = chat(client, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"city": "Paris"}
    assert isinstance(runtime.requests[-1]["grammar"], str) and "root" in runtime.requests[-1]["grammar"]
    r = chat(client, response_format={"type": "json_object"})
    assert r.status_code == 200, r.text


def test_messages_with_tool_results_pass_through(client, runtime):
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    r = chat(client, messages=messages, tools=[WEATHER])
    assert r.status_code == 200, r.text
    sent = runtime.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert sent[2]["tool_call_id"] == "call_1" and sent[2]["content"] == "18 C, sunny"


def test_developer_role_and_text_parts(client, runtime):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert chat(client, messages=messages).status_code == 200
    assert runtime.requests[-1]["messages"] == [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hi there"}]


# -- bad input: status, OpenAI error shape, and the server carries on ------------

BIG_TOOLS = [dict(WEATHER, function=dict(WEATHER["function"], name=f"t{i}")) for i in range(5)]

BAD_REQUESTS = [
    # (label, body or raw bytes, status, code or None, words in the message)
    ("malformed json", b'{"messages": [', 400, "invalid_json", "not valid JSON"),
    ("body is an array", b"[1, 2]", 400, "invalid_json", "JSON object"),
    ("unknown top-level field", {"messages": USER, "temprature": 0.5}, 400, "unknown_field", "temprature"),
    ("unknown message field", {"messages": [{"role": "user", "content": "x", "foo": 1}]}, 400, "unknown_field", "foo"),
    ("messages missing", {"model": "m"}, 400, "missing_field", "messages"),
    ("messages empty", {"messages": []}, 400, None, "empty"),
    ("messages not a list", {"messages": "hi"}, 400, "invalid_value", "messages"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value", "messages[0]"),
    ("temperature wrong type", {"messages": USER, "temperature": "hot"}, 400, "invalid_value", "temperature"),
    ("temperature out of range", {"messages": USER, "temperature": 9}, 400, "invalid_value", "temperature"),
    ("max_tokens wrong type", {"messages": USER, "max_tokens": "10"}, 400, "invalid_value", "max_tokens"),
    ("max_tokens zero", {"messages": USER, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("max_tokens over limit", {"messages": USER, "max_tokens": 100000}, 400, "max_tokens_too_large", "limit"),
    ("stream wrong type", {"messages": USER, "stream": "yes"}, 400, "invalid_value", "stream"),
    ("n above 1", {"messages": USER, "n": 3}, 400, None, "n=3"),
    ("too many stops", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, None, "stop"),
    ("tool_choice unknown tool", {"messages": USER, "tools": [WEATHER],
                                  "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     400, "unknown_tool", "nope"),
    ("tool_choice bad string", {"messages": USER, "tools": [WEATHER], "tool_choice": "always"},
     400, "invalid_value", "tool_choice"),
    ("tool_choice without tools", {"messages": USER, "tool_choice": "required"}, 400, None, "needs tools"),
    ("tool schema: required names unknown property", {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}}}]},
     400, "invalid_tools", "Invalid tools"),
    ("tool schema: bad type", {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "strang"}}}}}]}, 400, "invalid_tools", "Invalid tools"),
    ("tool: duplicate names", {"messages": USER, "tools": [WEATHER, WEATHER]}, 400, "invalid_tools", "get_weather"),
    ("tool: bad name", {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "get weather!", "parameters": {"type": "object"}}}]},
     400, "invalid_tools", "Invalid tools"),
    ("tool: wrong type field", {"messages": USER, "tools": [{"type": "retrieval"}]}, 400, None, "tools[0]"),
    ("too many tools", {"messages": USER, "tools": BIG_TOOLS}, 400, "too_many_tools", "limit is 4"),
    ("tool result without a call", {"messages": USER + [{"role": "tool", "tool_call_id": "x", "content": "1"}]},
     400, None, "tool_call_id"),
    ("assistant message last", {"messages": USER + [{"role": "assistant", "content": "ok"}]}, 400, None, "last"),
    ("assistant says nothing", {"messages": [{"role": "assistant"}] + USER}, 400, None, "content or tool_calls"),
    ("tool call arguments not JSON", {"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "1"}]}, 400, None, "arguments"),
    ("image content", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, None, "messages[0]"),
    ("response_format unknown type", {"messages": USER, "response_format": {"type": "yaml"}}, 400, None,
     "response_format"),
    ("response_format json_schema without schema", {"messages": USER, "response_format": {"type": "json_schema"}},
     400, None, "json_schema"),
    ("response_format with tool calls", {"messages": USER, "tools": [WEATHER],
                                         "response_format": {"type": "json_object"}}, 400, None, "tool_choice"),
    ("stream_options without stream", {"messages": USER, "stream_options": {"include_usage": True}}, 400, None,
     "stream"),
    ("body over the size limit", {"messages": [{"role": "user", "content": "x" * 70000}]}, 413,
     "request_too_large", "limit"),
    # Text JSON can carry but a prompt cannot: lone surrogates, non-finite numbers.
    ("lone surrogate in content", b'{"messages": [{"role": "user", "content": "bad \\ud800 text"}]}', 400,
     "invalid_value", "messages[0].content"),
    ("lone surrogate in a tool description", json.dumps({"messages": USER, "tools": [
        dict(WEATHER, function=dict(WEATHER["function"], description="x\udfff"))]}).encode(), 400,
     "invalid_value", "tools[0].function.description"),
    ("NaN temperature", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "invalid_value", "finite"),
    ("1e999 in a tool schema", json.dumps({"messages": USER, "tools": [WEATHER]}).replace(
        '"type": "string", "enum"', '"type": "string", "maxLength": 1e999, "enum"').encode(), 400,
     "invalid_value", "tools[0].function.parameters.properties.unit.maxLength"),
    *[(f"tool call arguments with {label}", {"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c", "content": "1"}]}, 400, "invalid_value", words)
      for label, arguments, words in [
          ("NaN", '{"city": NaN}', "function.arguments.city holds the number nan"),
          ("1e999", '{"city": "Paris", "days": [1, 1e999]}', "function.arguments.days[1] holds the number inf"),
          ("-Infinity", '{"city": -Infinity}', "holds the number -inf"),
          ("a lone surrogate", '{"city": "\\ud800"}', "function.arguments.city holds a lone UTF-16 surrogate"),
      ]],
    ("seed above 64 bits", {"messages": USER, "seed": 2**64}, 400, "invalid_value", "seed"),
    ("seed below 64 bits", {"messages": USER, "seed": -(2**63) - 1}, 400, "invalid_value", "seed"),
    ("deeply nested body", b'{"messages": ' + b"[" * 20000 + b"]" * 20000 + b"}", 400, "invalid_json", "nested"),
]


@pytest.mark.parametrize("label, body, status, code, words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_status_and_message(client, runtime, label, body, status, code, words):
    if isinstance(body, bytes):
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in r.text
    assert runtime.requests == [], "a refused request never reaches the model"
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("seed, expected", [(-1, 2**64 - 1), (-(2**63), 2**63), (2**64 - 1, 2**64 - 1), (0, 0), (7, 7)])
def test_any_64_bit_seed_is_accepted_modulo_2_64(client, runtime, seed, expected):
    r = chat(client, seed=seed)
    assert r.status_code == 200, r.text
    assert runtime.requests[-1]["seed"] == expected


# -- the tool limit follows the runtime's grammar engine -------------------------------

def numbered_tools(n: int) -> list[dict]:
    return [dict(WEATHER, function=dict(WEATHER["function"], name=f"tool_{i}")) for i in range(n)]


def serve_tools(grammar_engine, tools, **body):
    """One request with ``tools`` to a server whose runtime uses ``grammar_engine`` (None: has no such attribute)."""
    runtime = FakeRuntime()
    if grammar_engine is not None:
        runtime.grammar_engine = grammar_engine
    with TestClient(create_app(runtime, ServerSettings(max_tools=2000))) as client:
        return chat(client, tools=tools, **body), runtime


def test_default_settings_take_a_thousand_tools_with_llguidance():
    runtime = FakeRuntime()
    runtime.grammar_engine = "llguidance"
    with TestClient(create_app(runtime, ServerSettings())) as client:
        r = chat(client, tools=numbered_tools(1000), tool_choice="required")
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "tool_999"}}])
def test_llguidance_runtime_takes_a_thousand_tools(tool_choice):
    r, runtime = serve_tools("llguidance", numbered_tools(1000), tool_choice=tool_choice)
    assert r.status_code == 200, r.text
    (request,) = runtime.requests
    assert len(request["tools"]) == 1000 and request["tools"][-1]["function"]["name"] == "tool_999"


@pytest.mark.parametrize("grammar_engine, engine_words, instead", [
    # The one message of engines.base.check_gbnf_tools, as the engine words it.
    ("llama", "the llama grammar engine", "pip install 'toolgrad-edge[llguidance]'"),
    (None, "the llama grammar engine", "llguidance grammar engine"),  # the fake's default engine
])
def test_gbnf_runtime_refuses_over_256_tools_and_names_llguidance(grammar_engine, engine_words, instead):
    r, runtime = serve_tools(grammar_engine, numbered_tools(1000))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "too_many_tools" and error["param"] == "tools"
    assert error["message"].startswith(f"1000 tools given; {engine_words} decodes with llama.cpp's GBNF grammar "
                                       "sampler, which supports at most 256")
    assert instead in error["message"] and "no tool limit" in error["message"]
    assert runtime.requests == [], "a refused request never reaches the model"
    # 256 is still allowed.
    r, runtime = serve_tools(grammar_engine, numbered_tools(256))
    assert r.status_code == 200, r.text
    assert len(runtime.requests[0]["tools"]) == 256


@pytest.mark.parametrize("grammar_engine", ["llguidance", "llama"])
def test_bad_schema_is_still_a_precise_400_with_either_engine(grammar_engine):
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "required": ["a"],
        "properties": {"a": {"type": "integer", "minimum": 1.2, "maximum": 1.8}}}}}
    r, runtime = serve_tools(grammar_engine, [*numbered_tools(300 if grammar_engine == "llguidance" else 3), bad])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_tools"
    assert "tool 'f': no integer lies between minimum 1.2 and maximum 1.8 (at /properties/a)" in error["message"]
    assert runtime.requests == []


def test_max_tools_still_caps_an_llguidance_runtime():
    runtime = FakeRuntime()
    runtime.grammar_engine = "llguidance"
    with TestClient(create_app(runtime, ServerSettings(max_tools=500))) as client:
        r = chat(client, tools=numbered_tools(501))
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_tools"
    assert "501 tools; the limit is 500 (serve --max-tools raises it)" in r.json()["error"]["message"]


def test_over_llama_server_the_gbnf_limit_is_named(tmp_path):
    from test_engine_llama_server import StandIn

    from toolgrad_edge.runtime import ToolRuntime

    stand_in = StandIn()
    try:
        with ToolRuntime(engine=stand_in.url) as rt, \
                TestClient(create_app(rt, ServerSettings(max_tools=2000))) as client:
            assert rt.grammar_engine == "llama-server"
            r = chat(client, tools=numbered_tools(257))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "too_many_tools"
        assert error["message"].startswith(
            f"257 tools given; llama-server at {stand_in.url} decodes with llama.cpp's GBNF grammar sampler, "
            "which supports at most 256")
        assert "serve a local model (no --engine) with the llguidance grammar engine" in error["message"]
        assert stand_in.completions() == [], "a refused request never reaches llama-server"
    finally:
        stand_in.stop()


def test_a_loading_runtime_is_waited_for_before_its_engine_decides():
    release = threading.Event()

    def factory():
        release.wait(10)
        runtime = FakeRuntime()
        runtime.grammar_engine = "llama"
        return runtime

    with TestClient(create_app(factory, ServerSettings(max_tools=2000))) as client:
        assert client.get("/health").json()["status"] == "loading"
        threading.Timer(0.2, release.set).start()
        r = chat(client, tools=numbered_tools(300))
    assert r.status_code == 400 and "GBNF grammar sampler, which supports at most 256" in r.json()["error"]["message"]


WEATHER_DAYS = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}


class PostCheckFailure(FakeRuntime):
    """As ToolRuntime when the call breaks a keyword checked only after generation:
    the text comes back as content, with parse_error, and no calls."""

    TEXT = "[get_weather(city='Paris', days=42)]"

    def stream(self, messages, tools=None, should_stop=None, **kwargs):
        self.requests.append({"messages": messages, "tools": tools, **kwargs})
        yield from answer_events(self.TEXT, tools)


@pytest.mark.parametrize("stream", [False, True])
def test_call_that_fails_a_post_check_is_200_with_text_and_parse_error(stream):
    with TestClient(create_app(PostCheckFailure())) as client:
        r = chat(client, tools=[WEATHER_DAYS], tool_choice="required", stream=stream)
        assert r.status_code == 200, r.text
        if stream:
            chunks = sse_chunks(r)
            calls, content, finish = reassemble(chunks)
            choice = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]
        else:
            choice = r.json()["choices"][0]
            calls, content, finish = choice["message"].get("tool_calls") or [], choice["message"]["content"], \
                choice["finish_reason"]
            assert set(choice["message"]) == {"role", "content"}  # nothing a client would send back and get refused
        assert calls == [] and content == PostCheckFailure.TEXT and finish == "stop"
        assert "days" in choice["parse_error"] and "7" in choice["parse_error"]  # what is wrong, and where
        # The whole reply's message goes back into the history unchanged and is accepted.
        if not stream:
            history = [*USER, choice["message"], {"role": "user", "content": "Try again."}]
            assert chat(client, messages=history).status_code == 200


def test_unknown_route_and_method_are_openai_shaped(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


@pytest.mark.parametrize("failure, status, code", [
    (ContextLengthError("the prompt is 9000 tokens and max_tokens is 64, which exceeds the context of 8192"),
     400, "context_length_exceeded"),
    (GenerationError("decode failed"), 500, "generation_failed"),
    (RuntimeError("secret internal detail"), 500, "internal_error"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_runtime_failures_are_translated(failure, status, code, stream):
    with TestClient(create_app(FakeRuntime(fail=failure))) as client:
        r = chat(client, tools=[WEATHER], stream=stream)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["code"] == code
        assert "Traceback" not in r.text and "secret internal detail" not in r.text
        assert client.get("/health").json()["status"] == "ok"


def test_failure_mid_stream_ends_the_stream_in_order():
    with TestClient(create_app(FakeRuntime(fail=RuntimeError("secret detail"), fail_after=2))) as client:
        r = chat(client, tools=[WEATHER], stream=True)
        assert r.status_code == 200  # the stream had started
        chunks = sse_chunks(r)  # ends with data: [DONE]
        assert chunks[-1]["error"]["code"] == "internal_error"
        assert "secret detail" not in r.text and "Traceback" not in r.text
        assert client.get("/health").json()["queue"]["failed"] == 1


def test_runtime_factory_is_loaded_on_the_worker_and_closed():
    made = []

    class Closing(FakeRuntime):
        closed = False

        def close(self):
            self.closed = True

    def factory():
        made.append(Closing())
        return made[-1]

    with TestClient(create_app(factory)) as client:
        deadline = time.monotonic() + 5
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert chat(client).status_code == 200
    assert made and made[0].closed  # made by the app, so closed by the app


def test_model_that_fails_to_load_is_503_not_a_crash():
    from toolgrad_edge.errors import ModelLoadError

    def factory():
        raise ModelLoadError("/models/x.gguf: not a GGUF file")

    with TestClient(create_app(factory)) as client:
        deadline = time.monotonic() + 5
        while client.get("/health").json().get("status") == "loading" and time.monotonic() < deadline:
            time.sleep(0.01)
        health = client.get("/health")
        assert health.status_code == 503 and "not a GGUF" in health.json()["error"]
        r = chat(client)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"


def test_api_key(runtime):
    with TestClient(create_app(runtime, ServerSettings(api_key="s3cret"))) as client:
        r = chat(client)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "Missing" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", json={"messages": USER}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and "Incorrect" in r.json()["error"]["message"]
        assert client.get("/v1/models").status_code == 401
        assert client.get("/health").status_code == 200  # liveness needs no key
        ok = client.post("/v1/chat/completions", json={"messages": USER},
                         headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_full_queue_answers_429_with_retry_after():
    runtime = FakeRuntime()
    runtime.release.clear()  # the first request holds the worker
    app = create_app(runtime, ServerSettings(max_queue=1))
    with TestClient(app) as client:
        results: list[int] = []

        def post():
            results.append(chat(client, tools=[WEATHER]).status_code)

        threads = [threading.Thread(target=post) for _ in range(2)]
        threads[0].start()
        assert runtime.started.wait(5)  # the first one is running (held by release)
        threads[1].start()
        assert wait_for(lambda: app.state.queue.stats()["waiting"] == 1)  # the second one is waiting
        stats = client.get("/health").json()["queue"]
        assert stats["running"] and stats["waiting"] == 1
        r = chat(client, tools=[WEATHER])
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        runtime.release.set()
        for t in threads:
            t.join(10)
        assert results == [200, 200]
        assert client.get("/health").json()["queue"]["rejected"] == 1


# -- the queue itself ------------------------------------------------------------


def test_queue_runs_jobs_in_order_and_drops_cancelled_ones():
    import asyncio

    order: list[int] = []
    gate = threading.Event()
    taken = threading.Event()
    loop = asyncio.new_event_loop()

    def work_for(i):
        def work(rt, should_stop):
            taken.set()
            gate.wait(5)
            order.append(i)
            yield i
        return work

    queue = RequestQueue(object.__new__(FakeRuntime), max_queue=3)
    queue.start()
    try:
        jobs = [Job(work_for(i), loop) for i in range(4)]
        queue.submit(jobs[0])
        assert taken.wait(5)  # job 0 is taken by the worker; 1..3 wait
        for job in jobs[1:]:
            queue.submit(job)
        with pytest.raises(QueueFull):
            queue.submit(Job(work_for(9), loop))
        queue.cancel(jobs[2])
        assert queue.stats()["waiting"] == 2 and queue.stats()["cancelled"] == 1
        gate.set()
        deadline = time.monotonic() + 5
        while len(order) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert order == [0, 1, 3]
    finally:
        queue.stop()
        loop.close()


def test_cancelling_a_running_job_stops_it_at_the_next_token():
    import asyncio

    loop = asyncio.new_event_loop()
    produced: list[int] = []
    started = threading.Event()

    def work(rt, should_stop):
        for i in range(1000):
            if should_stop():
                return
            started.set()
            produced.append(i)
            time.sleep(0.01)
            yield i

    queue = RequestQueue(object.__new__(FakeRuntime), max_queue=2)
    queue.start()
    try:
        job = Job(work, loop)
        queue.submit(job)
        assert started.wait(5)
        queue.cancel(job)
        deadline = time.monotonic() + 5
        while queue.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not queue.stats()["running"] and len(produced) < 1000
        assert queue.stats()["cancelled"] == 1
    finally:
        queue.stop()
        loop.close()


def test_closing_the_queue_ends_a_running_job_with_its_final_record_and_refuses_waiting_ones():
    # As on SIGTERM: the running job stops at its next step and its last output (the runtime's final
    # record) still comes back, so its stream ends properly; a waiting job ends at once, never run.
    import asyncio

    from toolgrad_edge.server.queue import DONE, ITEM, QueueStopped

    loop = asyncio.new_event_loop()
    started = threading.Event()

    def work(rt, should_stop):
        for i in range(10_000):
            if should_stop():
                yield "final"
                return
            started.set()
            time.sleep(0.005)
            yield i

    queue = RequestQueue(object.__new__(FakeRuntime), max_queue=2)
    queue.start()
    try:
        running, waiting = Job(work, loop), Job(work, loop)
        queue.submit(running)
        assert started.wait(5)
        queue.submit(waiting)
        queue.close()
        with pytest.raises(QueueStopped):
            queue.submit(Job(work, loop))
        assert wait_for(lambda: running.finished)

        def drain(job):
            events = []
            while not events or events[-1][0] == ITEM:
                events.append(loop.run_until_complete(asyncio.wait_for(job.events.get(), 5)))
            return events

        ran = drain(running)
        assert ran[-2:] == [(ITEM, "final"), (DONE, None)]
        assert drain(waiting) == [(DONE, None)]
    finally:
        queue.stop()
        loop.close()


def test_a_runtime_serving_several_requests_at_once_gets_that_many_workers():
    # A runtime over llama-server reports its slots as `concurrency`; the queue then runs that
    # many jobs side by side (in arrival order), and one worker otherwise.
    import asyncio

    loop = asyncio.new_event_loop()
    both_running = threading.Barrier(2, timeout=5)

    def work(rt, should_stop):
        both_running.wait()  # passes only when two jobs run at the same time
        yield "ok"

    class TwoSlots:
        concurrency = 2

        def call(self, *a, **k):
            raise AssertionError("not used")

    queue = RequestQueue(TwoSlots(), max_queue=4)
    queue.start()
    try:
        assert queue.ready.wait(5)
        jobs = [Job(work, loop) for _ in range(2)]
        for job in jobs:
            queue.submit(job)
        assert wait_for(lambda: queue.stats()["served"] == 2)
        assert queue.stats()["workers"] == 2 and queue.stats()["failed"] == 0
    finally:
        queue.stop()
        loop.close()
    single = RequestQueue(object.__new__(FakeRuntime), max_queue=1)
    single.start()
    try:
        assert single.ready.wait(5) and single.stats()["workers"] == 1
    finally:
        single.stop()
