"""Tier 1: the pure pieces of the server's streaming (no model, no HTTP)."""

from __future__ import annotations

import json

import pytest

from toolgrad_edge.server.streaming import (
    arguments_fragments,
    arguments_json,
    finish_reason,
)


@pytest.mark.parametrize("arguments", [
    {}, {"a": 1}, {"city": "Zürich", "days": [1, 2], "opts": {"x": None, "y": True}}, {"q": "a \"quoted\" \\ text"},
])
def test_argument_fragments_join_to_the_arguments_json(arguments):
    pieces = arguments_fragments(arguments)
    assert "".join(pieces) == arguments_json(arguments)
    assert json.loads("".join(pieces)) == arguments


class _Result:
    def __init__(self, finish, calls=()):
        self.finish_reason = finish
        self.tool_calls = list(calls)


@pytest.mark.parametrize("finish, calls, expected", [
    ("tool_calls", [object()], "tool_calls"),
    ("stop", [object()], "tool_calls"),
    ("length", [object()], "length"),
    ("stop", [], "stop"),
    ("length", [], "length"),
    ("cancelled", [], "stop"),
])
def test_finish_reason_mapping(finish, calls, expected):
    assert finish_reason(_Result(finish, calls)) == expected


# -- ChunkStream over grammars.CallStreamParser ------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "math.factorial", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}},
]
ANSWERS = {
    "python": "[get_weather(city='Par)is', days=3), math.factorial(n=5)]",
    "json": '[{"name": "get_weather", "arguments": {"city": "Par)is", "days": 3}}, '
            '{"name": "math.factorial", "arguments": {"n": 5}}]',
}


def _stream(syntax: str, **kw):
    from toolgrad_edge.server.streaming import ChunkStream

    return ChunkStream(completion_id="chatcmpl-x", model="m", tools=TOOLS, syntax=syntax,
                       text_only=False, strip_text=True, **kw)


@pytest.mark.parametrize("syntax", ["python", "json"])
@pytest.mark.parametrize("size", [1, 4, 1000])
def test_chunk_stream_sends_names_first_and_matches_parse_calls(syntax, size):
    from toolgrad_edge.grammars import parse_calls

    text = ANSWERS[syntax]
    stream = _stream(syntax)
    events = []  # (index, "name"|"args", value) in the order sent, while the text streams
    for i in range(0, len(text), size):
        for chunk in stream.feed(text[i:i + size]):
            for tc in chunk["choices"][0]["delta"]["tool_calls"]:
                fn = tc["function"]
                events.append((tc["index"], "name", fn["name"]) if "name" in fn else (tc["index"], "args", fn["arguments"]))
    calls = parse_calls(text, TOOLS, syntax=syntax)
    final = stream.finish(_Result("tool_calls", calls))
    assert final[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert len(final) == 1, "everything was streamed before the end"
    for index, call in enumerate(calls):
        mine = [e for e in events if e[0] == index]
        assert mine[0] == (index, "name", call.name)
        assert "".join(v for _, kind, v in mine[1:] if kind == "args") == arguments_json(call.arguments)


def test_chunk_stream_text_answer_is_stripped_and_usage_comes_last():
    stream = _stream("python", include_usage=True)
    sent = ""
    for piece in ["  ", "No tool ", "fits this.", "  "]:
        for chunk in stream.feed(piece):
            sent += chunk["choices"][0]["delta"]["content"]
    result = _Result("stop")
    result.content = "No tool fits this."
    result.usage = None
    final = stream.finish(result)
    assert sent == "No tool fits this."
    assert final[0]["choices"][0]["finish_reason"] == "stop"
    assert final[-1]["choices"] == [] and final[-1]["usage"]["total_tokens"] == 0
