"""End to end: Ollama's API on the real server (uvicorn, loopback) and the real Gemma 3 270M GGUF,
driven by the official ``ollama`` Python client (and the ``openai`` one, on the same server).

One server for the module, started with ``tool_choice="required"`` (serve --tool-choice required):
Ollama has no tool-choice field, and the 270M base model declines to call under auto. The server
helpers, tools and schemas are test_server_e2e.py's.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

ollama = pytest.importorskip("ollama")
from test_server_e2e import (  # noqa: E402
    API_KEY,
    QUESTION,
    SCHEMAS,
    TOOLS,
    check_calls,
    health,
    httpx,
    jsonschema,
    openai,
    serve_demo,
)

pytestmark = pytest.mark.slow

NAME = "gemma-3-270m:latest"  # the GGUF's general.name, "Gemma 3 270m", as an Ollama name
NUM_PREDICT = 48
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# The official client keeps only type, items, description and enum of each property (its Tool
# model), so these two tools reach the server whole; book_table's bounds would not (sent raw below).
CLIENT_TOOLS = TOOLS[:2]
OPTIONS = {"temperature": 0, "seed": 1, "num_predict": NUM_PREDICT}


@pytest.fixture(scope="module")
def server(gemma_270m_gguf, tmp_path_factory):
    yield from serve_demo(gemma_270m_gguf, tmp_path_factory, tool_choice="required")


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server, headers=AUTH, timeout=300)


def chat(client, **kwargs):
    kwargs.setdefault("model", NAME)
    kwargs.setdefault("messages", QUESTION)
    kwargs.setdefault("options", OPTIONS)
    return client.chat(**kwargs)


def ollama_calls(calls) -> list[tuple[str, dict]]:
    """Every call: a known name, arguments (an object) that validate against the tool's schema."""
    out = []
    for call in calls or []:
        name, arguments = call.function.name, dict(call.function.arguments)
        assert name in SCHEMAS
        jsonschema.validate(arguments, SCHEMAS[name])
        out.append((name, arguments))
    return out


def streamed(parts) -> tuple[str, list, object]:
    """(text, calls, final part) of a streamed chat."""
    text, calls, final = "", [], None
    for part in parts:
        if part.done:
            final = part
            continue
        text += part.message.content or ""
        calls += list(part.message.tool_calls or [])
    assert final is not None, "the stream ends with a done object"
    return text, calls, final


def assert_final_metrics(reply) -> None:
    assert reply.done is True and reply.done_reason in ("stop", "length")
    assert reply.prompt_eval_count > 0 and reply.eval_count > 0
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration > 0  # nanoseconds
    assert reply.load_duration >= 0


# -- chat ------------------------------------------------------------------------------------


def test_chat_with_tools_whole_and_streamed_give_the_same_valid_calls(client):
    whole = chat(client, tools=CLIENT_TOOLS)
    assert_final_metrics(whole)
    expected = ollama_calls(whole.message.tool_calls)
    assert expected and whole.done_reason == "stop" and whole.message.content == ""
    text, calls, final = streamed(chat(client, tools=CLIENT_TOOLS, stream=True))
    assert ollama_calls(calls) == expected and text == ""
    assert_final_metrics(final)
    assert final.prompt_eval_count == whole.prompt_eval_count and final.eval_count == whole.eval_count


def test_full_schemas_sent_raw_are_enforced(server):
    """Bounds the official client would drop (minimum, maximum) hold when they reach the server."""
    body = {"model": NAME, "messages": [{"role": "user", "content": "Book a table for 4 in Paris."}],
            "tools": TOOLS, "stream": False, "options": OPTIONS}
    r = httpx.post(server + "/api/chat", json=body, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    calls = r.json()["message"]["tool_calls"]
    assert calls and all(c["id"].startswith("call_") and c["function"]["index"] == i for i, c in enumerate(calls))
    for call in calls:
        jsonschema.validate(call["function"]["arguments"], SCHEMAS[call["function"]["name"]])


def test_streamed_chat_cut_by_num_predict_matches_the_whole_one(client):
    for num_predict in (6, 10, 14, 20):
        options = {**OPTIONS, "seed": 3, "num_predict": num_predict}
        whole = chat(client, tools=CLIENT_TOOLS, options=options)
        text, calls, final = streamed(chat(client, tools=CLIENT_TOOLS, options=options, stream=True))
        assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
            (c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls or []], num_predict
        assert text == (whole.message.content or "") and final.done_reason == whole.done_reason, num_predict
        ollama_calls(whole.message.tool_calls)


def test_two_rounds_with_a_tool_message(client):
    first = chat(client, tools=CLIENT_TOOLS)
    (name, arguments), *_ = ollama_calls(first.message.tool_calls)
    messages = [*QUESTION, first.message,  # the client's own Message, sent back as it is
                {"role": "tool", "content": "18 C and sunny", "tool_name": name}]
    second = chat(client, messages=messages, tools=CLIENT_TOOLS)
    assert ollama_calls(second.message.tool_calls)
    # without tools the model answers in text, reading the tool result
    reply = chat(client, messages=messages, options={**OPTIONS, "num_predict": 12})
    assert isinstance(reply.message.content, str) and not reply.message.tool_calls


def test_format_json_schema_is_enforced(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Plan 3 days in Paris. Answer in JSON."}]
    reply = chat(client, messages=messages, format=schema)
    assert reply.done_reason == "stop"
    jsonschema.validate(json.loads(reply.message.content), schema)
    generated = client.generate(model=NAME, prompt="Plan 3 days in Paris. Answer in JSON.", format=schema,
                                options=OPTIONS)
    jsonschema.validate(json.loads(generated.response), schema)


# -- generate, list, show, version, ps ------------------------------------------------------------


def test_generate_whole_streamed_and_raw_agree(client):
    options = {**OPTIONS, "num_predict": 12}
    whole = client.generate(model=NAME, prompt="Say hello.", options=options)
    assert isinstance(whole.response, str) and whole.response and whole.done
    assert_final_metrics(whole)
    parts = list(client.generate(model=NAME, prompt="Say hello.", options=options, stream=True))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done
    raw = client.generate(model=NAME, prompt="<start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\n",
                          raw=True, options=options)
    assert raw.response == whole.response  # the same prompt, written out by the caller


def test_list_show_version_ps(client, gemma_270m_gguf):
    (model,) = client.list().models
    assert model.model == NAME and model.size == gemma_270m_gguf.stat().st_size
    assert model.details.family == "gemma3" and model.details.quantization_level == "Q4_K_M"
    assert model.details.parameter_size == "268.10M"
    shown = client.show(NAME)
    assert "tools" in shown.capabilities and shown.details.family == "gemma3"
    assert shown.modelinfo["general.architecture"] == "gemma3" and shown.modelinfo["gemma3.context_length"] == 32768
    assert client.show("gemma-3-270m").details.parameter_size == "268.10M"  # the tag is optional
    (running,) = client.ps().models
    assert running.model == NAME and running.context_length == 2048
    assert httpx.get(client._client.base_url.join("/api/version"), timeout=10).json()["version"]


# -- refusals and bad input ---------------------------------------------------------------------------------


def test_refused_endpoints_raise_a_clear_response_error(client):
    for call in (lambda: client.pull(NAME), lambda: client.push(NAME), lambda: client.delete(NAME),
                 lambda: client.copy(NAME, "backup"), lambda: client.create("mine", from_=NAME),
                 lambda: client.embed(model=NAME, input="hello"), lambda: client.embeddings(model=NAME, prompt="x")):
        with pytest.raises(ollama.ResponseError) as info:
            call()
        assert info.value.status_code == 501 and "not supported: toolgrad-edge" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        chat(client, model="llama3.2")
    assert info.value.status_code == 404 and NAME in info.value.error


@pytest.mark.parametrize("body, status, words", [
    (b'{"model": "gemma-3-270m", "messages": [', 400, "not valid JSON"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi", "images": ["iVBORw0KGgo="]}]}, 400,
     "reads text only"),
    ({"model": NAME, "messages": QUESTION, "options": {"num_predict": 100_000}}, 400, "limit of 512"),
    ({"model": NAME, "messages": [{"role": "user", "content": "word " * 4000}], "options": {"num_predict": 16}},
     400, "exceeds the context"),
    ({"model": NAME, "messages": QUESTION, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strnig"}}}}}]}, 400,
     "Invalid tools"),
], ids=["malformed json", "images", "num_predict over the limit", "context too long", "bad tool schema"])
def test_bad_bodies_are_ollama_shaped_and_the_server_survives(server, body, status, words):
    kwargs = {"content": body, "headers": {**AUTH, "content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": AUTH}
    r = httpx.post(server + "/api/chat", timeout=120, **kwargs)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and words in r.json()["error"]
    assert health(server)["status"] == "ok"


def test_api_key_is_required(server):
    bare = ollama.Client(host=server, timeout=60)
    with pytest.raises(ollama.ResponseError) as info:
        bare.list()
    assert info.value.status_code == 401


# -- the default tool choice on the OpenAI side, and a mixed load --------------------------------------------


def test_tool_choice_required_default_on_the_openai_api(server):
    oai = openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    reply = oai.chat.completions.create(model="any", messages=QUESTION, tools=TOOLS, max_tokens=NUM_PREDICT,
                                        temperature=0, seed=1)  # no tool_choice: the server's default
    assert reply.choices[0].finish_reason == "tool_calls"
    assert check_calls(reply.choices[0].message.tool_calls)


def test_mixed_openai_and_ollama_clients_get_no_errors(server):
    """8 clients at once (4 OpenAI, 4 Ollama), 2 requests each (one streamed); each sends or forces its own
    tool and must get exactly that tool, with valid arguments."""
    names = [t["function"]["name"] for t in TOOLS]

    def run_client(i: int) -> int:
        mine = names[i % len(names)]
        tool = [t for t in TOOLS if t["function"]["name"] == mine]
        for j in range(2):
            stream = j == 1
            if i % 2 == 0:
                own = openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=600)
                reply = own.chat.completions.create(
                    model="any", messages=QUESTION, tools=TOOLS, max_tokens=NUM_PREDICT, temperature=0, seed=i + j,
                    tool_choice={"type": "function", "function": {"name": mine}}, parallel_tool_calls=False,
                    stream=stream)
                if stream:
                    got: dict[int, list[str]] = {}
                    for chunk in reply:
                        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                            slot = got.setdefault(tc.index, ["", ""])
                            slot[0] += tc.function.name or ""
                            slot[1] += tc.function.arguments or ""
                    calls = [(n, json.loads(a)) for n, a in got.values()]
                else:
                    calls = [(c.function.name, json.loads(c.function.arguments))
                             for c in reply.choices[0].message.tool_calls]
            else:
                body = {"model": NAME, "messages": QUESTION, "tools": tool, "stream": stream,
                        "options": {**OPTIONS, "seed": i + j}}
                with httpx.Client(timeout=600, headers=AUTH) as http:
                    r = http.post(server + "/api/chat", json=body)
                    assert r.status_code == 200, r.text
                    objects = [json.loads(line) for line in r.text.splitlines() if line]
                calls = [(c["function"]["name"], c["function"]["arguments"])
                         for obj in objects for c in obj.get("message", {}).get("tool_calls") or []]
            assert calls and all(name == mine for name, _ in calls), (i, j, calls)
            for name, arguments in calls:
                jsonschema.validate(arguments, SCHEMAS[name])
        return 2

    before = health(server)["queue"]
    with ThreadPoolExecutor(8) as pool:
        done = sum(pool.map(run_client, range(8)))
    after = health(server)["queue"]
    assert done == 16
    assert after["failed"] == before["failed"] and after["rejected"] == before["rejected"]
    assert after["served"] - before["served"] == 16
