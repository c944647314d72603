"""Tier 1: the pure pieces of the server's streaming (no model, no HTTP)."""

from __future__ import annotations

import json

import pytest

from toolgrad_edge.grammars import load_tools
from toolgrad_edge.runtime import AnswerReader, Final, result_from_text
from toolgrad_edge.server.openai import (
    OpenAIStream,
    arguments_fragments,
    arguments_json,
    completion_body,
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


# -- the runtime's AnswerReader rendered by OpenAIStream ------------------------------------

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


class _Pipeline:
    """A streamed request's path: the runtime's AnswerReader turns text into events, OpenAIStream renders them."""

    def __init__(self, syntax: str, include_usage: bool = False):
        self.reader = AnswerReader(load_tools(TOOLS), syntax, calls=True)
        self.stream = OpenAIStream(completion_id="chatcmpl-x", model="m", include_usage=include_usage)

    def _render(self, events) -> list:
        return [chunk for event in events for chunk in self.stream.render(event)]

    def feed(self, piece: str) -> list:
        return self._render(self.reader.feed(piece))

    def finish(self, finish: str) -> tuple[list, object]:
        events, result = self.reader.finish(finish)
        return self._render([*events, Final(result)]), result


@pytest.mark.parametrize("syntax", ["python", "json"])
@pytest.mark.parametrize("size", [1, 4, 1000])
def test_chunk_stream_sends_names_first_and_matches_parse_calls(syntax, size):
    from toolgrad_edge.grammars import parse_calls

    text = ANSWERS[syntax]
    stream = _Pipeline(syntax)
    events = []  # (index, "name"|"args", value) in the order sent, while the text streams
    for i in range(0, len(text), size):
        for chunk in stream.feed(text[i:i + size]):
            for tc in chunk["choices"][0]["delta"]["tool_calls"]:
                fn = tc["function"]
                events.append((tc["index"], "name", fn["name"]) if "name" in fn else (tc["index"], "args", fn["arguments"]))
    calls = parse_calls(text, TOOLS, syntax=syntax)
    final, result = stream.finish("stop")
    assert result.tool_calls == calls
    assert final[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert len(final) == 1, "everything was streamed before the end"
    for index, call in enumerate(calls):
        mine = [e for e in events if e[0] == index]
        assert mine[0] == (index, "name", call.name)
        assert "".join(v for _, kind, v in mine[1:] if kind == "args") == arguments_json(call.arguments)


def test_chunk_stream_text_answer_is_stripped_and_usage_comes_last():
    stream = _Pipeline("python", include_usage=True)
    sent = ""
    for piece in ["  ", "No tool ", "fits this.", "  "]:
        for chunk in stream.feed(piece):
            sent += chunk["choices"][0]["delta"]["content"]
    final, result = stream.finish("stop")
    assert sent == result.content == "No tool fits this."
    assert final[0]["choices"][0]["finish_reason"] == "stop"
    assert final[-1]["choices"] == [] and final[-1]["usage"]["total_tokens"] == 0


# -- a call list cut by max_tokens: streamed and whole replies agree ---------------


def _whole_result(text: str, syntax: str):
    """What the runtime returns for ``text`` cut at max_tokens, read whole (not streamed): the complete calls
    only (none if the list does not parse as far as it goes), the text as content when no call is complete."""
    return result_from_text(text, load_tools(TOOLS), False, True, "length", syntax)


def _reassembled(chunks) -> tuple[list[tuple[str, str]], str, str | None, dict]:
    calls: dict[int, dict] = {}
    content, finish, last = "", None, {}
    for chunk in chunks:
        choice = chunk["choices"][0]
        content += choice["delta"].get("content") or ""
        for tc in choice["delta"].get("tool_calls") or []:
            slot = calls.setdefault(tc["index"], {"name": None, "arguments": ""})
            fn = tc["function"]
            if "name" in fn:
                assert slot["name"] is None and tc["id"].startswith("call_")
                slot["name"] = fn["name"]
            slot["arguments"] += fn["arguments"]
        if choice["finish_reason"]:
            finish, last = choice["finish_reason"], choice
    return [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)], content, finish, last


def _check_agreement(pieces: list[str], syntax: str) -> None:
    text = "".join(pieces)
    result = _whole_result(text, syntax)
    stream = _Pipeline(syntax)
    chunks = stream.stream.start()[1:]
    for piece in pieces:
        sent = stream.feed(piece)
        # A call goes out whole: the delta that names it also carries all of its arguments.
        for name, arguments in _reassembled(sent + [stream.stream._chunk({}, "x")])[0]:
            assert name is not None and isinstance(json.loads(arguments), dict), (pieces, name, arguments)
        chunks += sent
    chunks += stream.finish("length")[0]
    streamed, content, finish, last = _reassembled(chunks)
    whole = completion_body(result, completion_id="x", created=0, model="m")["choices"][0]
    expected = [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"].get("tool_calls", [])]
    assert streamed == expected, (pieces, streamed, expected)
    assert all(json.loads(arguments) is not None for _, arguments in streamed), "every streamed call is complete"
    assert finish == whole["finish_reason"]
    assert last.get("parse_error") == whole.get("parse_error")
    if not expected:
        assert content == (whole["message"]["content"] or ""), pieces


@pytest.mark.parametrize("syntax", ["python", "json"])
def test_cut_call_list_streams_what_the_whole_reply_keeps_at_every_cut_and_split(syntax):
    """max_tokens may cut the list anywhere; the stream may split the text anywhere."""
    text = ANSWERS[syntax]
    for cut in range(1, len(text) + 1):
        prefix = text[:cut]
        _check_agreement(list(prefix), syntax)  # one character at a time: every split at once
        for split in range(0, cut + 1, 3):
            _check_agreement([prefix[:split], prefix[split:]], syntax)


def test_cut_inside_the_second_call_streams_only_the_first():
    text = ANSWERS["python"]
    cut = text.index("math.factorial(") + len("math.factorial(")
    stream = _Pipeline("python")
    names = [tc["function"]["name"] for ch in stream.feed(text[:cut])
             for tc in ch["choices"][0]["delta"].get("tool_calls") or [] if "name" in tc["function"]]
    assert names == ["get_weather"], "math.factorial is not announced before its arguments are complete"


def test_a_call_list_stopped_midway_keeps_its_complete_calls_and_shows_no_half_call():
    """A stop (the client left, or the server shuts down) in the second call: the first call stands, and the
    half-written rest never reaches the client as text."""
    text = ANSWERS["python"]
    cut = text.index("math.factorial(") + len("math.factorial(")
    stream = _Pipeline("python")
    chunks = stream.feed(text[:cut])
    final, result = stream.finish("cancelled")
    streamed, content, finish, _ = _reassembled(chunks + final)
    assert [c.name for c in result.tool_calls] == ["get_weather"] and result.content is None
    assert [name for name, _ in streamed] == ["get_weather"] and content == ""
    assert finish == "tool_calls"  # OpenAI says tool_calls whenever calls are returned
