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
    ("[get_time(tz='a'),", ["get_time"], ""),  # the optional space is the model's choice
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


def test_json_syntax_is_not_forced():
    assert forced_name_suffix('[{"name": "get_w', NAMES, syntax="json") == ""
