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
