"""Forced tool-name continuations in the python call syntax."""

from __future__ import annotations

import pytest

from toolgrad_edge.grammars import forced_name_suffix

NAMES = ["get_weather", "get_time", "get", "math.factorial"]


@pytest.mark.parametrize("text, names, expected", [
    ("[get_w", NAMES, "eather("),
    ("[get_t", NAMES, "ime("),
    ("[get", NAMES, ""),            # 'get' itself and two longer names fit
    ("[get_", NAMES, ""),           # two names fit
    ("[m", NAMES, "ath.factorial("),
    ("[", ["only_tool"], "only_tool("),  # a single tool: the whole name
    ("[", NAMES, ""),
    ("[get_time(tz='a'), ", ["get_time"], "get_time("),
    ("[get_time(tz='a'),", ["get_time"], " get_time("),  # the compact layout's space, then the name
    ("[get_time(tz='a'),", NAMES, ""),  # the space alone is left to the model (a token such as ' get')
    ("[get_time(tz='a, [x", NAMES, ""),       # inside a string
    ("[get_time(tz=[1, ", ["get_time"], ""),  # inside an argument list
    ("[get_time(", NAMES, ""),
    ("Sorry, I can't", NAMES, ""),
    ("", NAMES, ""),
    ("[xyz", NAMES, ""),
    ("[get_time(tz='a)'), get_w", NAMES, "eather("),
])
def test_forced_name_suffix(text, names, expected):
    assert forced_name_suffix(text, names) == expected


def test_flexible_layout_leaves_the_optional_space_to_the_model():
    assert forced_name_suffix("[get_time(tz='a'),", ["get_time"], whitespace="flexible") == ""
    assert forced_name_suffix("[get_time(tz='a'), ", ["get_time"], whitespace="flexible") == "get_time("
    assert forced_name_suffix("[ ", ["get_time"], whitespace="flexible") == "get_time("


def test_forced_text_is_what_both_grammars_allow():
    from gbnf_walk import load

    from toolgrad_edge.grammars import build_grammar, load_tools

    tools = load_tools([{"name": "get_time", "parameters": {"type": "object", "properties": {
        "tz": {"type": "string"}}}}])
    for whitespace, text in [("compact", "["), ("compact", "[get_t"), ("compact", "[get_time(tz='a'),"),
                             ("flexible", "[ get_t"), ("flexible", "[get_time(tz='a'), ")]:
        forced = forced_name_suffix(text, ["get_time"], whitespace=whitespace)
        assert forced and load(build_grammar(tools, whitespace=whitespace)).accepts(text + forced + ")]"), \
            (whitespace, text, forced)


def test_json_syntax_is_not_forced():
    assert forced_name_suffix('[{"name": "get_w', NAMES, syntax="json") == ""
