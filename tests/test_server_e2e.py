"""End to end: the real server (uvicorn, loopback) on the real Gemma 3 270M GGUF,
driven by the official ``openai`` client.

One server for the module; every test keeps max_tokens small. The 270M
model is a base model, so what it says is not the point: the grammar makes
every answer the right shape, and that is what these tests check.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

from toolgrad_edge.server import ServerSettings, create_app  # noqa: E402

pytestmark = pytest.mark.slow

API_KEY = "test-key"
MAX_TOKENS = 48
REQUESTS_PER_CLIENT = 2  # benchmarks/server_load.py runs 8 x 5


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


# Enums and bounded integers keep the base model's arguments short.
TOOLS = [
    _tool("get_weather", "Current weather in a city.", {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    }, ["city"]),
    _tool("get_time", "Current time in a time zone.", {
        "tz": {"type": "string", "enum": ["CET", "UTC", "JST"]},
    }, ["tz"]),
    _tool("book_table", "Book a restaurant table.", {
        "people": {"type": "integer", "minimum": 1, "maximum": 9},
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
    }, ["people", "city"]),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo?"}]


@contextlib.contextmanager
def serving(app):
    """Run ``app`` with uvicorn on a free loopback port, in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()


def serve_demo(gguf, tmp_path_factory, **settings):
    """A real server on the demo model (2k context, its own prefix cache); yields its URL, then stops."""
    from toolgrad_edge.runtime import ToolRuntime

    runtime = ToolRuntime(gguf, n_ctx=2048, cache_dir=tmp_path_factory.mktemp("prefix-cache"))
    try:
        with serving(create_app(runtime, ServerSettings(api_key=API_KEY, max_queue=16, max_tokens_limit=512,
                                                        **settings))) as url:
            yield url
    finally:
        runtime.close()


@pytest.fixture(scope="module")
def server(gemma_270m_gguf, tmp_path_factory):
    yield from serve_demo(gemma_270m_gguf, tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def create(client, **kwargs):
    kwargs.setdefault("model", "gemma")
    kwargs.setdefault("messages", QUESTION)
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("seed", 1)
    return client.chat.completions.create(**kwargs)


def check_calls(calls, allowed=None) -> list[tuple[str, dict]]:
    """Every call: a unique id, type function, a known name, arguments that validate."""
    assert len({c.id for c in calls}) == len(calls)
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        name = call.function.name
        assert name in (allowed or SCHEMAS)
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[name])
        out.append((name, arguments))
    return out


def health(server) -> dict:
    r = httpx.get(server + "/health", timeout=10)
    assert r.status_code == 200
    return r.json()


# -- shapes ----------------------------------------------------------------------


@pytest.mark.parametrize("tool_choice", ["auto", "none", "required", "named"])
def test_tool_choice_shapes(client, tool_choice):
    """Each tool_choice gives its shape; parallel_tool_calls=False gives at most one call."""
    choice = {"type": "function", "function": {"name": "get_time"}} if tool_choice == "named" else tool_choice
    max_tokens = 16 if tool_choice in ("none", "auto") else MAX_TOKENS  # text runs to the limit: keep it short
    reply = create(client, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, max_tokens=max_tokens)
    message, finish = reply.choices[0].message, reply.choices[0].finish_reason
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if tool_choice == "none":
        assert not message.tool_calls and isinstance(message.content, str)
        assert finish in ("stop", "length")
    elif tool_choice == "auto":
        assert finish in ("tool_calls", "stop", "length")
        if message.tool_calls:
            check_calls(message.tool_calls)
        else:
            assert isinstance(message.content, str)
    else:
        assert finish == "tool_calls", message
        calls = check_calls(message.tool_calls, ["get_time"] if tool_choice == "named" else None)
        assert len(calls) == 1


def test_streamed_calls_reassemble_to_the_whole_answer(client):
    kwargs = dict(tools=TOOLS, tool_choice="required", seed=7, parallel_tool_calls=False)
    whole = create(client, **kwargs)
    expected = check_calls(whole.choices[0].message.tool_calls)
    calls: dict[int, dict] = {}
    order = []
    finish = None
    for chunk in create(client, stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                slot["id"] = tc.id
            if tc.function and tc.function.name:
                assert slot["arguments"] == "", "the name comes before any argument fragment"
                slot["name"] += tc.function.name
                order.append("name")
            if tc.function and tc.function.arguments:
                slot["arguments"] += tc.function.arguments
                order.append("args")
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert order[0] == "name" and "args" in order
    streamed = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    assert streamed == expected
    assert [c["arguments"] for _, c in sorted(calls.items())] == [
        c.function.arguments for c in whole.choices[0].message.tool_calls
    ]


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**64 - 1])
def test_any_64_bit_seed_samples(client, seed):
    reply = create(client, tools=TOOLS, tool_choice="required", temperature=0.8, seed=seed, max_tokens=24)
    assert reply.choices[0].finish_reason in ("tool_calls", "length")


def test_call_list_cut_by_max_tokens_streams_what_the_whole_reply_keeps(client):
    """Wherever max_tokens cuts a parallel call list, both replies hold the same complete calls."""
    kwargs = dict(tools=TOOLS, tool_choice="required", seed=3, parallel_tool_calls=True)
    for max_tokens in (6, 10, 14, 18, 24):
        whole = create(client, max_tokens=max_tokens, **kwargs).choices[0]
        expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
        calls: dict[int, dict] = {}
        finish = None
        for chunk in create(client, stream=True, max_tokens=max_tokens, **kwargs):
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
        streamed = [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
        assert streamed == expected and finish == whole.finish_reason, max_tokens
        check_calls(whole.message.tool_calls or [])
        assert all(isinstance(json.loads(arguments), dict) for _, arguments in streamed)


def test_streamed_text_matches_the_whole_answer(client):
    whole = create(client, tools=TOOLS, tool_choice="none", max_tokens=12)
    parts = []
    for chunk in create(client, tools=TOOLS, tool_choice="none", max_tokens=12, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == whole.choices[0].message.content


def test_response_format_json_schema_validates(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "London"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    reply = create(client, messages=[{"role": "user", "content": "Plan 3 days in Paris. Answer in JSON."}],
                   response_format={"type": "json_schema", "json_schema": {"name": "plan", "schema": schema}})
    assert reply.choices[0].finish_reason == "stop", reply
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_conversation_with_tool_results(client):
    messages = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18 C and sunny"},
    ]
    reply = create(client, messages=messages, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    check_calls(reply.choices[0].message.tool_calls)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data]
    assert health(server)["status"] == "ok"


# -- load ---------------------------------------------------------------------------


def test_load_run_has_no_errors_and_no_mixing(client, server):
    """8 clients at once, each sending a whole and a streamed request; each client forces its own
    tool and checks it got exactly that tool, with valid arguments, every time. (The longer
    8 x 5 run is benchmarks/server_load.py: on a shared 2-core machine it can take minutes.)"""
    names = list(SCHEMAS)

    def run_client(i: int) -> list[tuple[str, str]]:
        own = openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        mine = names[i % len(names)]
        seen = []
        for j in range(REQUESTS_PER_CLIENT):
            stream = j % 2 == 1
            kwargs = dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": mine}},
                          parallel_tool_calls=False, max_tokens=MAX_TOKENS, seed=i * 10 + j)
            if stream:
                got = {}
                for chunk in create(own, stream=True, **kwargs):
                    for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                        slot = got.setdefault(tc.index, ["", ""])
                        slot[0] += tc.function.name or ""
                        slot[1] += tc.function.arguments or ""
                calls = [(n, a) for n, a in got.values()]
            else:
                reply = create(own, **kwargs)
                assert reply.choices[0].finish_reason == "tool_calls"
                calls = [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls]
            assert len(calls) == 1 and calls[0][0] == mine, (i, j, calls)
            jsonschema.validate(json.loads(calls[0][1]), SCHEMAS[mine])
            seen.append(calls[0])
        return seen

    before = health(server)["queue"]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run_client, range(8)))
    assert sum(len(r) for r in results) == 8 * REQUESTS_PER_CLIENT
    after = health(server)["queue"]
    assert after["failed"] == before["failed"] and after["rejected"] == before["rejected"]
    assert after["served"] - before["served"] == 8 * REQUESTS_PER_CLIENT


# -- bad input ------------------------------------------------------------------------

TOO_MANY_TOOLS = [dict(TOOLS[0], function=dict(TOOLS[0]["function"], name=f"tool_{i}")) for i in range(1025)]  # over --max-tools
LONG_TEXT = "word " * 4000  # well past the 2,048-token context


def _bad_inputs():
    auth = {"Authorization": f"Bearer {API_KEY}"}
    ok = {"model": "m", "messages": QUESTION}
    return [
        # (label, headers, body (dict or raw bytes), status, code)
        ("no api key", {}, ok, 401, "invalid_api_key"),
        ("wrong api key", {"Authorization": "Bearer nope"}, ok, 401, "invalid_api_key"),
        ("malformed json", auth, b'{"messages": [{"role": "user", ', 400, "invalid_json"),
        ("not an object", auth, b'"hello"', 400, "invalid_json"),
        ("unknown field", auth, {**ok, "frobnicate": True}, 400, "unknown_field"),
        ("wrong type", auth, {**ok, "max_tokens": "lots"}, 400, "invalid_value"),
        ("wrong type in a message", auth, {"messages": [{"role": "user", "content": 42}]}, 400, "invalid_value"),
        ("tool_choice names an unknown tool", auth,
         {**ok, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}},
         400, "unknown_tool"),
        ("invalid tool schema", auth, {**ok, "tools": [_tool("f", "x", {"a": {"type": "strnig"}}, [])]},
         400, "invalid_tools"),
        ("required names an unknown property", auth, {**ok, "tools": [_tool("f", "x", {"a": {"type": "string"}},
                                                                             ["b"])]}, 400, "invalid_tools"),
        ("too many tools", auth, {**ok, "tools": TOO_MANY_TOOLS}, 400, "too_many_tools"),
        ("max_tokens over the limit", auth, {**ok, "max_tokens": 100_000}, 400, "max_tokens_too_large"),
        ("body over the limit", auth, {"messages": [{"role": "user", "content": "x" * (1 << 20)}]},
         413, "request_too_large"),
        ("context too long", auth, {"messages": [{"role": "user", "content": LONG_TEXT}], "max_tokens": 16},
         400, "context_length_exceeded"),
        ("context too long, streamed", auth,
         {"messages": [{"role": "user", "content": LONG_TEXT}], "max_tokens": 16, "stream": True},
         400, "context_length_exceeded"),
        ("NaN in a tool call's arguments", auth, {**ok, "tools": TOOLS, "messages": [*QUESTION, {
            "role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": NaN}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}, 400, "invalid_value"),
        ("lone surrogate in the prompt", auth,
         b'{"messages": [{"role": "user", "content": "caf\\udce9"}]}', 400, "invalid_value"),
        ("seed over 64 bits", auth, {**ok, "seed": 2**64}, 400, "invalid_value"),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("label, headers, body, status, code", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_its_status_and_the_server_survives(server, label, headers, body, status, code):
    url = server + "/v1/chat/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={**headers, "content-type": "application/json"}, timeout=60)
    else:
        r = httpx.post(url, json=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code
    assert "Traceback" not in r.text
    assert health(server)["status"] == "ok"


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "nope" in str(info.value)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        create(bad)


def test_a_thousand_tools_pass_the_llguidance_check_and_meet_the_context(gemma_270m_gguf, tmp_path):
    """With llguidance there is no tool limit: the context is the limit, and the 400 gives the counts."""
    import re

    pytest.importorskip("llguidance")
    from fastapi.testclient import TestClient

    from toolgrad_edge.runtime import ToolRuntime

    tools = [dict(TOOLS[0], function=dict(TOOLS[0]["function"], name=f"tool_{i}")) for i in range(1000)]
    with ToolRuntime(gemma_270m_gguf, n_ctx=2048, cache_dir=tmp_path) as runtime, \
            TestClient(create_app(runtime, ServerSettings(max_tools=1000))) as http:
        assert runtime.grammar_engine == "llguidance"
        r = http.post("/v1/chat/completions", json={"messages": QUESTION, "tools": tools, "max_tokens": 16})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    found = re.fullmatch(r"the prompt is (\d+) tokens and max_tokens is 16, which exceeds the context of 2048 "
                         r"tokens; shorten the request, lower max_tokens, or raise n_ctx\.", error["message"])
    assert found and int(found[1]) > 20_000, error["message"]  # the tools' JSON, about 30 tokens a tool


# -- disconnects ----------------------------------------------------------------------


def test_disconnect_mid_stream_frees_the_queue(server):
    before = health(server)["queue"]
    body = {"model": "m", "messages": QUESTION, "tools": TOOLS, "tool_choice": "none", "max_tokens": 400,
            "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]  # the stream has started: the model is decoding
            assert got[0].startswith("data: ")
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = health(server)["queue"]
        if not now["running"] and now["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.1)
    assert now["cancelled"] == before["cancelled"] + 1 and not now["running"] and now["waiting"] == 0
    # and the next request is served at once
    r = httpx.post(server + "/v1/chat/completions", headers=headers, timeout=60,
                   json={"model": "m", "messages": QUESTION, "tools": TOOLS, "tool_choice": "required",
                         "parallel_tool_calls": False, "max_tokens": 32})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"]
