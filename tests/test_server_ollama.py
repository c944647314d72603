"""Tier 1: Ollama's API (/api/*) over a fake runtime, and its request/response translation (no model).

The real model and the official ``ollama`` client are in test_server_ollama_e2e.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from test_server_app import TIME, USER, WEATHER, FakeRuntime  # noqa: E402

from toolgrad_edge.errors import GenerationError  # noqa: E402
from toolgrad_edge.server import ServerSettings, create_app  # noqa: E402
from toolgrad_edge.server.errors import APIError  # noqa: E402
from toolgrad_edge.server.ollama import (  # noqa: E402
    MessageIn,
    ModelNames,
    chat_messages,
    ollama_name,
    parameter_size,
    parse_chat,
    parse_generate,
    raw_prompt_messages,
)

ollama = pytest.importorskip("ollama")


@dataclass
class FakeInfo:
    architecture: str = "gemma3"
    n_params: int = 268_098_176
    file_type: str = "Q4_K_M"
    metadata: dict = field(default_factory=lambda: {
        "general.architecture": "gemma3", "general.name": "Gemma 3 270m", "general.license": "gemma",
        "gemma3.context_length": 32768, "tokenizer.chat_template": "{{ bos_token }}..."})


class LocalFakeRuntime(FakeRuntime):
    """The fake, with what a local model adds: its GGUF's facts, a context and a prompt counter."""

    model_name = "Gemma 3 270m"

    def __init__(self, model_path, n_ctx: int = 2048, prompt_tokens: int = 100, **kwargs):
        super().__init__(**kwargs)
        self.model_path = model_path
        self.info = FakeInfo()
        self.n_ctx = n_ctx
        self.prompt_tokens = prompt_tokens
        self.counted = 0

    def count_prompt_tokens(self, messages, tools=None, syntax="python"):
        self.counted += 1
        return self.prompt_tokens


NAME = "gemma-3-270m:latest"


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 4096)
    return path


@pytest.fixture
def runtime(gguf):
    return LocalFakeRuntime(gguf)


def app_client(runtime, **settings):
    settings = {"max_tools": 4, "max_tokens_limit": 512, "max_body_bytes": 64 * 1024, **settings}
    return TestClient(create_app(runtime, ServerSettings(**settings)))


@pytest.fixture
def client(runtime):
    with app_client(runtime) as c:
        yield c


def chat(client, **body):
    body.setdefault("model", NAME)
    body.setdefault("messages", USER)
    return client.post("/api/chat", json=body)


def ndjson(response) -> list[dict]:
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [line for line in response.text.split("\n") if line]
    return [json.loads(line) for line in lines]


def joined(objects, key="message") -> tuple[str, list[dict], dict]:
    """(text, calls, final object) of a streamed answer."""
    text, calls = "", []
    for obj in objects[:-1]:
        assert obj["done"] is False
        part = obj[key] if key == "message" else {"content": obj["response"]}
        text += part.get("content") or ""
        calls += part.get("tool_calls") or []
    assert objects[-1]["done"] is True
    return text, calls, objects[-1]


# -- translation, without a server --------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("Gemma 3 270m", "gemma-3-270m"), ("ToolGrad 4B (Q4_K_M)", "toolgrad-4b-q4_k_m"), ("  ", "model"),
])
def test_ollama_name(name, expected):
    assert ollama_name(name) == expected


@pytest.mark.parametrize("requested, ok", [
    ("gemma-3-270m", True), ("gemma-3-270m:latest", True), ("Gemma-3-270M:Latest", True),
    ("gemma-3-270m:q4_k_m", True), ("gemma-3-270m-q4_k_m", True), ("gemma 3 270m", True),
    ("gemma-3-270m:7b", False), ("llama3.2", False), ("gemma3", False),
])
def test_model_name_rule(requested, ok):
    names = ModelNames.of("Gemma 3 270m", "/models/gemma-3-270m-q4_k_m.gguf", "Q4_K_M")
    assert names.served == NAME
    assert names.accepts(requested) is ok


@pytest.mark.parametrize("n, expected", [
    (268_098_176, "268.10M"), (3_880_000_000, "3.9B"), (8_000_000_000, "8B"), (12_000_000, "12M"), (999, "999"),
])
def test_parameter_size_is_ollamas_human_number(n, expected):
    assert parameter_size(n) == expected


def test_tool_messages_take_their_tool_name_from_the_call():
    messages = [MessageIn.model_validate(m) for m in [
        {"role": "User", "content": "Weather?"},  # roles are read in lower case, as Ollama reads them
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C", "tool_call_id": "c1"},
        {"role": "tool", "content": "also 18 C"},
        {"role": "tool", "content": "CET 12:00", "tool_name": "get_time"},
    ]]
    out = chat_messages(messages)
    assert out[1]["tool_calls"] == [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert [m.get("name") for m in out[2:]] == ["get_weather", "get_weather", "get_time"]
    assert out[2]["tool_call_id"] == "c1" and out[0]["role"] == "user"


def test_raw_prompt_in_gemmas_format_round_trips():
    prompt = "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n" \
             "<start_of_turn>user\nWeather?<end_of_turn>\n<start_of_turn>model\n"
    assert raw_prompt_messages(prompt) == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Weather?"}]
    assert raw_prompt_messages("<bos>" + prompt)[-1]["content"] == "Weather?"


@pytest.mark.parametrize("prompt", [
    "Once upon a time",                                                     # free text
    "<start_of_turn>user\nHi<end_of_turn>\n",                               # no open model turn
    "<start_of_turn>user\n  padded  <end_of_turn>\n<start_of_turn>model\n",  # would render differently
    "[INST] why is the sky blue? [/INST]",                                  # another model's template
])
def test_raw_prompt_not_in_gemmas_format_is_refused(prompt):
    with pytest.raises(APIError) as info:
        raw_prompt_messages(prompt)
    assert info.value.status == 400 and "Gemma 3 turns" in info.value.message


def test_options_reach_the_runtime_plan():
    names = ModelNames.of("Gemma 3 270m")
    body = {"model": NAME, "messages": USER, "tools": [WEATHER], "stream": False, "keep_alive": "5m",
            "think": False, "options": {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": -1,
                                        "num_predict": 32, "stop": ["\n\n"], "repeat_penalty": 1.1,
                                        "num_thread": 4, "made_up": 1}}
    plan = parse_chat(json.dumps(body).encode(), ServerSettings(), names)
    kwargs = plan.runtime_kwargs("python")
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"], kwargs["max_tokens"]) == (0.7, 0.9, 40, 32)
    assert kwargs["seed"] == 2**64 - 1 and kwargs["stop"] == ["\n\n"] and kwargs["tool_choice"] == "auto"
    assert plan.ignored_options == ["num_thread", "repeat_penalty"] and plan.stream is False


def test_generate_plan_has_system_and_prompt_and_no_tools():
    body = {"model": NAME, "prompt": "Why is the sky blue?", "system": "Be brief.", "format": "json"}
    plan = parse_generate(json.dumps(body).encode(), ServerSettings(), ModelNames.of("Gemma 3 270m"))
    assert plan.chat.messages == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Why is the sky blue?"}]
    assert plan.chat.tools == [] and plan.chat.grammar is not None and plan.stream is True


# -- the HTTP API over the fake --------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_chat_with_tools_in_ollamas_shape(stream, runtime):
    with app_client(runtime, tool_choice="required") as client:
        r = chat(client, tools=[WEATHER, TIME], stream=stream, options={"seed": 7, "num_predict": 64})
    assert r.status_code == 200, r.text
    if stream:
        text, calls, final = joined(ndjson(r))
    else:
        final = r.json()
        text, calls = final["message"]["content"], final["message"]["tool_calls"]
    reply = ollama.ChatResponse(**final)  # the official client's own model of the answer
    assert reply.done and reply.done_reason == "stop" and final["model"] == NAME
    assert text == ""
    assert [(c["function"]["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (0, "get_weather", {"city": "Paris", "unit": "c"}), (1, "get_time", {"tz": "CET"})]
    assert all(c["id"].startswith("call_") for c in calls)
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration"):
        assert isinstance(final[key], int) and final[key] >= 0, key
    assert final["prompt_eval_count"] == 10 and final["eval_count"] == 5
    asked = runtime.requests[-1]
    assert asked["tool_choice"] == "required" and asked["seed"] == 7 and asked["max_tokens"] == 64


def test_streamed_text_is_the_whole_text(client):
    whole = chat(client, stream=False).json()
    text, calls, final = joined(ndjson(chat(client)))  # stream is Ollama's default
    assert text == whole["message"]["content"] == " It is sunny. " and calls == []
    assert final["message"] == {"role": "assistant", "content": ""}


def test_default_tool_choice_applies_to_both_apis(runtime):
    with app_client(runtime, tool_choice="required") as client:
        assert chat(client, tools=[WEATHER], stream=False).status_code == 200
        assert runtime.requests[-1]["tool_choice"] == "required"
        r = client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER]})
        assert r.status_code == 200 and runtime.requests[-1]["tool_choice"] == "required"
        r = client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER], "tool_choice": "auto"})
        assert r.status_code == 200 and runtime.requests[-1]["tool_choice"] == "auto"  # a request that says wins
        r = client.post("/v1/chat/completions", json={"messages": USER})
        assert r.status_code == 200 and runtime.requests[-1]["tool_choice"] == "none"  # no tools: no calls


def test_tool_choice_setting_is_checked():
    from toolgrad_edge.errors import ToolgradEdgeError

    with pytest.raises(ToolgradEdgeError, match="tool_choice must be one of auto, required, required-first, none"):
        ServerSettings(tool_choice="always")


def test_history_with_tool_message_reaches_the_runtime(client, runtime):
    messages = USER + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C and sunny", "tool_name": "get_weather"},
    ]
    r = chat(client, messages=messages, tools=[WEATHER], stream=False)
    assert r.status_code == 200, r.text
    sent = runtime.requests[-1]["messages"]
    # The call's arguments reach the prompt as the object the client sent (no JSON text in between).
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert sent[2] == {"role": "tool", "content": "18 C and sunny", "name": "get_weather"}


def test_format_schema_becomes_the_grammar(client, runtime):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = chat(client, format=schema, stream=False)
    assert r.status_code == 200 and json.loads(r.json()["message"]["content"]) == {"city": "Paris"}
    assert runtime.requests[-1]["grammar"] is not None
    r = client.post("/api/generate", json={"model": NAME, "prompt": "City?", "format": "json", "stream": False})
    assert r.status_code == 200 and r.json()["response"] == '{"city": "Paris"}'


def test_empty_requests_only_load(client, runtime):
    r = chat(client, messages=[], keep_alive=0, stream=False)
    assert r.json()["done"] is True and r.json()["done_reason"] == "load"
    r = client.post("/api/generate", json={"model": NAME})
    assert r.json()["done_reason"] == "load" and r.json()["response"] == ""
    assert runtime.requests == []


def test_num_ctx_below_the_loaded_context_limits_the_request(gguf):
    runtime = LocalFakeRuntime(gguf, n_ctx=2048, prompt_tokens=900)
    with app_client(runtime) as client:
        r = chat(client, stream=False, options={"num_ctx": 1000, "num_predict": 200})
        assert r.status_code == 400
        assert r.json() == {"error": "the prompt is 900 tokens and num_predict is 200, which exceeds options.num_ctx "
                            "of 1000 tokens; shorten the request, lower num_predict, or raise num_ctx (up to the "
                            "loaded context of 2048)."}
        counted = runtime.counted
        r = chat(client, stream=False, options={"num_ctx": 8192, "num_predict": 200})  # above: the loaded one
        assert r.status_code == 200 and runtime.requests[-1]["max_tokens"] == 200
        assert runtime.counted == counted  # nothing to count: the runtime's own check holds
        r = chat(client, stream=False, options={"num_predict": -1})  # to the end of the context, within the limit
        assert r.status_code == 200 and runtime.requests[-1]["max_tokens"] == 512
        r = chat(client, stream=False, options={"num_predict": -2, "num_ctx": 1000})
        assert r.status_code == 200 and runtime.requests[-1]["max_tokens"] == 100


def test_ignored_options_are_named_in_a_header(client):
    r = chat(client, stream=False, options={"repeat_penalty": 1.1, "mirostat": 0, "temperature": 0})
    assert r.status_code == 200 and r.headers["x-toolgrad-ignored-options"] == "mirostat, repeat_penalty"
    assert "x-toolgrad-ignored-options" not in chat(client, stream=False).headers


def test_tags_show_ps_version_parse_with_the_official_types(client, gguf):
    tags = ollama.ListResponse(**client.get("/api/tags").json())
    (entry,) = tags.models
    assert entry.model == NAME and entry.size == gguf.stat().st_size and len(entry.digest) == 64
    assert entry.details.family == "gemma3" and entry.details.parameter_size == "268.10M"
    assert entry.details.quantization_level == "Q4_K_M" and entry.details.format == "gguf"
    show = ollama.ShowResponse(**client.post("/api/show", json={"model": "gemma-3-270m"}).json())
    assert "tools" in show.capabilities and "completion" in show.capabilities
    assert show.modelinfo["general.architecture"] == "gemma3"
    assert show.modelinfo["general.parameter_count"] == 268_098_176 and show.license == "gemma"
    assert "num_ctx" in show.parameters and "temperature" in show.parameters
    ps = ollama.ProcessResponse(**client.get("/api/ps").json())
    assert ps.models[0].model == NAME and ps.models[0].context_length == 2048
    assert client.get("/api/version").json()["version"].count(".") == 2
    assert client.head("/").status_code == 200 and "running" in client.get("/").text
    assert client.post("/api/show", json={"model": "llama3.2"}).status_code == 404


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"), ("POST", "/api/copy"),
    ("DELETE", "/api/delete"), ("POST", "/api/embed"), ("POST", "/api/embeddings"),
    ("POST", "/api/blobs/sha256:abc"), ("HEAD", "/api/blobs/sha256:abc"),
])
def test_refused_endpoints_say_why_in_ollamas_shape(client, method, path):
    r = client.request(method, path, json={"model": NAME, "name": NAME, "source": NAME, "destination": "x"})
    assert r.status_code == 501
    if method != "HEAD":
        body = r.json()
        assert set(body) == {"error"} and "not supported: toolgrad-edge" in body["error"]
    assert client.get("/health").json()["status"] == "ok"


# (label, path, body (dict or raw bytes), status, words in the error)
BAD_BODIES = [
    ("missing body", "/api/chat", b"", 400, "missing request body"),
    ("malformed json", "/api/chat", b'{"model": ', 400, "not valid JSON"),
    ("not an object", "/api/chat", b"[1, 2]", 400, "must be a JSON object"),
    ("no model", "/api/chat", {"messages": USER}, 400, "Missing required field 'model'"),
    ("empty model", "/api/chat", {"model": "", "messages": USER}, 400, "model is required"),
    ("unknown model", "/api/chat", {"model": "llama3.2", "messages": USER}, 404, "model 'llama3.2' not found"),
    ("unknown role", "/api/chat", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("content not a string", "/api/chat", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("images on a text model", "/api/chat",
     {"model": NAME, "messages": [{"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo="]}]},
     400, "reads text only"),
    ("arguments as a string", "/api/chat", {"model": NAME, "messages": USER + [
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "x"}]}, 400, "arguments"),
    ("last message from the assistant", "/api/chat",
     {"model": NAME, "messages": USER + [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
    ("stream not a bool", "/api/chat", {"model": NAME, "messages": USER, "stream": "yes"}, 400, "stream"),
    ("option of the wrong type", "/api/chat", {"model": NAME, "messages": USER, "options": {"temperature": "hot"}},
     400, "options.temperature"),
    ("num_predict over the limit", "/api/chat", {"model": NAME, "messages": USER, "options": {"num_predict": 9999}},
     400, "above this server's limit of 512"),
    ("bad keep_alive", "/api/chat", {"model": NAME, "messages": USER, "keep_alive": "soon"}, 400, "keep_alive"),
    ("format not json", "/api/chat", {"model": NAME, "messages": USER, "format": "yaml"}, 400, "format"),
    ("invalid format schema", "/api/chat", {"model": NAME, "messages": USER, "format": {"type": "strnig"}}, 400,
     "Invalid format schema"),
    ("format with tools", "/api/chat", {"model": NAME, "messages": USER, "tools": [WEATHER], "format": "json"},
     400, "format cannot be combined with tools"),
    ("invalid tool schema", "/api/chat", {"model": NAME, "messages": USER, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "strnig"}}}}}]}, 400, "Invalid tools"),
    ("too many tools", "/api/chat", {"model": NAME, "messages": USER, "tools": [
        dict(WEATHER, function=dict(WEATHER["function"], name=f"t{i}")) for i in range(5)]}, 400, "limit is 4"),
    ("logprobs", "/api/chat", {"model": NAME, "messages": USER, "logprobs": True}, 400, "logprobs"),
    ("NaN in arguments", "/api/chat", b'{"model": "gemma-3-270m", "messages": [{"role": "user", "content": "x"}, '
     b'{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": NaN}}}]}, '
     b'{"role": "tool", "content": "y"}]}', 400, "finite"),
    ("body over the limit", "/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "x" * 70000}]},
     413, "limit"),
    ("suffix", "/api/generate", {"model": NAME, "prompt": "def f():", "suffix": "return x"}, 400, "suffix"),
    ("template", "/api/generate", {"model": NAME, "prompt": "x", "template": "{{ .Prompt }}"}, 400, "template"),
    ("context", "/api/generate", {"model": NAME, "prompt": "x", "context": [1, 2, 3]}, 400, "context"),
    ("raw with system", "/api/generate", {"model": NAME, "prompt": "x", "raw": True, "system": "s"}, 400,
     "raw mode does not support"),
    ("raw in another template", "/api/generate", {"model": NAME, "prompt": "[INST] hi [/INST]", "raw": True}, 400,
     "Gemma 3 turns"),
    ("generate images", "/api/generate", {"model": NAME, "prompt": "x", "images": ["iVBORw0KGgo="]}, 400,
     "reads text only"),
    ("show unknown model", "/api/show", {"model": "mistral"}, 404, "not found"),
]


@pytest.mark.parametrize("label, path, body, status, words", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_get_one_precise_error_in_ollamas_shape(client, runtime, label, path, body, status, words):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()
    assert set(error) == {"error"} and words in error["error"], error
    assert "Traceback" not in r.text
    assert runtime.requests == []  # refused before any work
    assert chat(client, stream=False).status_code == 200  # and the server keeps serving


def test_api_key_guards_api_routes_in_ollamas_shape(runtime):
    with app_client(runtime, api_key="secret") as client:
        r = chat(client)
        assert r.status_code == 401 and set(r.json()) == {"error"} and "API key" in r.json()["error"]
        assert client.get("/api/tags").status_code == 401
        assert client.post("/api/pull", json={"model": "x"}).status_code == 401
        ok = client.get("/api/tags", headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200
        assert client.get("/api/version").status_code == 200  # as /health: no key


def test_errors_keep_each_apis_shape(client):
    r = client.get("/api/nothing")
    assert r.status_code == 404 and r.json() == {"error": "GET /api/nothing: Not Found"}
    r = client.get("/api/chat")
    assert r.status_code == 405 and set(r.json()) == {"error"}
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_runtime_failure_is_ollama_shaped_before_and_during_the_stream(gguf):
    failing = LocalFakeRuntime(gguf, fail=GenerationError("decode failed"))
    with app_client(failing) as client:
        r = chat(client, stream=False)
        assert r.status_code == 500 and r.json() == {"error": "decode failed"}
    mid = LocalFakeRuntime(gguf, fail=GenerationError("decode failed"), fail_after=2)
    with app_client(mid) as client:
        objects = ndjson(chat(client))
        assert objects[-1] == {"error": "decode failed"} and objects[0]["done"] is False
        assert client.get("/health").json()["status"] == "ok"


def test_ollama_and_openai_requests_share_the_queue(runtime):
    with app_client(runtime) as client:
        chat(client, stream=False)
        client.post("/v1/chat/completions", json={"messages": USER})
        assert client.get("/health").json()["queue"]["served"] == 2
