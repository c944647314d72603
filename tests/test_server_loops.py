"""A client's tool loop ends under `serve --tool-choice required-first` (issue 27, item 5).

The server default forces a call only where one is due: when the last message is the user's. After
tool results the model may answer in text (``auto``), so the loop (user -> forced call -> tool result
-> answer) ends, on both APIs. A request's own ``tool_choice`` always wins. First over the fake
runtime (what tool choice reaches the runtime), then on the real 270M demo model (the answer after
the tool result is text).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from test_server_app import USER, WEATHER, FakeRuntime  # noqa: E402

from toolgrad_edge.server import ServerSettings, create_app  # noqa: E402

OLLAMA_NAME = "fake-model"


def _round_two(first_calls: list[dict], api: str, question: list[dict] = USER) -> list[dict]:
    """The history a client sends after running the calls of round one."""
    if api == "openai":
        return [*question, {"role": "assistant", "content": None, "tool_calls": first_calls},
                *({"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": "18 C and sunny"}
                  for c in first_calls)]
    return [*question, {"role": "assistant", "content": "", "tool_calls": first_calls},
            *({"role": "tool", "tool_name": c["function"]["name"], "content": "18 C and sunny"} for c in first_calls)]


def _ask(client, api: str, messages: list[dict], **extra) -> tuple[int, list[dict]]:
    if api == "openai":
        r = client.post("/v1/chat/completions", json={"messages": messages, "tools": [WEATHER], **extra})
        return r.status_code, r.json()["choices"][0]["message"].get("tool_calls") or []
    r = client.post("/api/chat", json={"model": OLLAMA_NAME, "messages": messages, "tools": [WEATHER],
                                       "stream": False, **extra})
    return r.status_code, r.json()["message"].get("tool_calls") or []


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_required_first_forces_the_first_call_and_allows_text_after_tool_results(api):
    runtime = FakeRuntime()
    with TestClient(create_app(runtime, ServerSettings(tool_choice="required-first"))) as client:
        status, calls = _ask(client, api, USER)
        assert status == 200 and calls and runtime.requests[-1]["tool_choice"] == "required"
        status, _ = _ask(client, api, _round_two(calls, api))
        assert status == 200 and runtime.requests[-1]["tool_choice"] == "auto"  # text allowed: the loop can end
        # A new user turn after the tool round is due a call again.
        later = [*_round_two(calls, api), {"role": "assistant", "content": "It is sunny."},
                 {"role": "user", "content": "And in Rome?"}]
        assert _ask(client, api, later)[0] == 200 and runtime.requests[-1]["tool_choice"] == "required"
        if api == "openai":  # the request's own tool_choice wins
            assert _ask(client, api, USER, tool_choice="none")[0] == 200
            assert runtime.requests[-1]["tool_choice"] == "none"


def test_required_still_forces_every_turn():
    runtime = FakeRuntime()
    with TestClient(create_app(runtime, ServerSettings(tool_choice="required"))) as client:
        status, calls = _ask(client, "openai", USER)
        _ask(client, "openai", _round_two(calls, "openai"))
        assert runtime.requests[-1]["tool_choice"] == "required"


# -- on the real demo model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_server(gemma_270m_gguf, tmp_path_factory):
    from test_server_e2e import serve_demo

    yield from serve_demo(gemma_270m_gguf, tmp_path_factory, tool_choice="required-first")


@pytest.mark.slow
@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_a_two_round_loop_on_the_demo_model_is_forced_once_then_free(demo_server, api):
    """Round one is forced (the base model declines under auto); round two, after the tool results, runs
    under auto: its answer is the one an explicit tool_choice "auto" gets (text allowed, not forced)."""
    from test_server_e2e import API_KEY, QUESTION, TOOLS

    headers = {"Authorization": f"Bearer {API_KEY}"}
    options = {"temperature": 0, "seed": 1}
    with httpx.Client(base_url=demo_server, headers=headers, timeout=120) as http:
        def ask(messages, via=api, **extra):
            if via == "openai":
                r = http.post("/v1/chat/completions", json={"model": "m", "messages": messages, "tools": TOOLS,
                                                            "max_tokens": 48, **options, **extra})
                assert r.status_code == 200, r.text
                message = r.json()["choices"][0]["message"]
                return [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                        for c in message.get("tool_calls") or []], message["content"] or "", message
            r = http.post("/api/chat", json={"model": "gemma-3-270m", "messages": messages, "tools": TOOLS,
                                             "stream": False, "options": {**options, "num_predict": 48}})
            assert r.status_code == 200, r.text
            message = r.json()["message"]
            return [(c["function"]["name"], c["function"]["arguments"])
                    for c in message.get("tool_calls") or []], message["content"], message

        calls, _, message = ask(QUESTION)
        assert calls, "the user's turn is due a call: forced"
        history = _round_two(message["tool_calls"], api, QUESTION)
        second = ask(history)[:2]
        openai_history = history if api == "openai" else _round_two(
            [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
             for i, (n, a) in enumerate(calls)], "openai", QUESTION)
        assert second == ask(openai_history, via="openai", tool_choice="auto")[:2]
