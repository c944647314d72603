"""Model text -> validated calls, calls -> canonical text, and the stream parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolgrad_edge.errors import ToolCallError
from toolgrad_edge.grammars import CallStreamParser, ToolCall, load_tools, parse_calls, render_calls

TOOLS = load_tools([
    {"name": "get_weather", "description": "", "parameters": {"type": "dict", "properties": {
        "location": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1},
    }, "required": ["location"]}},
    {"name": "math.hypot", "description": "", "parameters": {"type": "dict", "properties": {
        "x": {"type": "float"}, "y": {"type": "float"}, "from": {"type": "string"},
        "point": {"type": "dict", "properties": {"lat": {"type": "float"}}},
        "tags": {"type": "array", "items": {"type": "string"}},
        "extra": {"type": "any"},
    }, "required": ["x", "y"]}},
])


@pytest.mark.parametrize("text, expected", [
    ("[get_weather(location='Paris')]", [ToolCall("get_weather", {"location": "Paris"})]),
    ('[get_weather(unit="celsius", location="Par\\"is")]',
     [ToolCall("get_weather", {"unit": "celsius", "location": 'Par"is'})]),
    ("[get_weather(location='Paris'), math.hypot(x=3, y=4.5, from='a')]",
     [ToolCall("get_weather", {"location": "Paris"}), ToolCall("math.hypot", {"x": 3.0, "y": 4.5, "from": "a"})]),
    ("  \n```python\n[get_weather(location='\\u00e9t\\xe9 \\U0001F600')]\n```\n ",
     [ToolCall("get_weather", {"location": "été 😀"})]),
    ("[math.hypot(x=1, y=2, point={'lat': 1}, tags=('a', \"b\"), extra=[None, True, {'k': -1e3}])]",
     [ToolCall("math.hypot", {"x": 1.0, "y": 2.0, "point": {"lat": 1.0}, "tags": ["a", "b"],
                              "extra": [None, True, {"k": -1000.0}]})]),
    ("I can't help with that.", []),
    ("", []),
    ("[]", []),
])
def test_parse_python(text, expected):
    calls = parse_calls(text, TOOLS)
    assert calls == expected
    # coercion: an int where only a number is expected becomes a float
    for call in calls:
        for key in ("x", "y"):
            if key in call.arguments:
                assert isinstance(call.arguments[key], float)


def test_parse_json():
    text = '[{"name": "get_weather", "arguments": {"location": "Paris", "days": 2}}]'
    assert parse_calls(text, TOOLS, syntax="json") == [ToolCall("get_weather", {"location": "Paris", "days": 2})]
    assert parse_calls("Sorry, no.", TOOLS, syntax="json") == []


@pytest.mark.parametrize("text, fragment", [
    ("[get_weather(location='Paris'", "offset"),
    ("[get_weather(location='Paris', location='Rome')]", "no second value for argument 'location'"),
    ("[get_weather('Paris')]", "keyword argument"),
    ("[get_time(tz='CET')]", "unknown tool 'get_time'"),
    ("[get_weather(unit='celsius')]", "'location' is a required property"),
    ("[get_weather(location='Paris', unit='kelvin')]", "/unit"),
    ("[get_weather(location='Paris', days=0)]", "/days"),
    ("[get_weather(location=Paris)]", "expected a value"),
    ("[get_weather(location='Paris')] and more", "end of the answer"),
    ("[get_weather(location='Pa\nris')]", "closing"),
    ("[math.hypot(x=1, y=__import__('os'))]", "expected a value"),
])
def test_neither_call_nor_text_raises_with_position(text, fragment):
    with pytest.raises(ToolCallError) as info:
        parse_calls(text, TOOLS)
    assert fragment in str(info.value)


def test_error_position_is_line_and_column():
    with pytest.raises(ToolCallError) as info:
        parse_calls("[get_weather(\n  location=?)]", TOOLS)
    assert "line 2, column 12" in str(info.value)


def test_render_is_canonical():
    calls = [ToolCall("get_weather", {"location": "l'Aquila", "days": 2}), ToolCall("math.hypot", {"x": 1.5, "y": 2.0})]
    assert render_calls(calls) == "[get_weather(location=\"l'Aquila\", days=2), math.hypot(x=1.5, y=2.0)]"
    assert render_calls([c.to_dict() for c in calls], syntax="json") == (
        '[{"name": "get_weather", "arguments": {"location": "l\'Aquila", "days": 2}}, '
        '{"name": "math.hypot", "arguments": {"x": 1.5, "y": 2.0}}]')


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(args=st.dictionaries(st.sampled_from(["extra", "from", "tags_"]), json_values, max_size=3),
       location=st.text(max_size=20), syntax=st.sampled_from(["python", "json"]))
def test_render_parse_round_trip(args, location, syntax):
    args.pop("tags_", None)
    calls = [ToolCall("math.hypot", {"x": 1.0, "y": -2.5, **args}), ToolCall("get_weather", {"location": location})]
    if "from" in args and not isinstance(args["from"], str):
        calls[0].arguments["from"] = "x"
    text = render_calls(calls, syntax)
    assert parse_calls(text, TOOLS, syntax) == calls


@pytest.mark.parametrize("syntax", ["python", "json"])
def test_stream_parser_emits_each_call_once_complete(syntax):
    calls = [ToolCall("get_weather", {"location": "Pa)r]is", "unit": "celsius"}),
             ToolCall("math.hypot", {"x": 1.0, "y": 2.0, "point": {"lat": 0.5}})]
    text = "```\n" + render_calls(calls, syntax) + "\n```"
    parser = CallStreamParser(TOOLS, syntax)
    seen, names = [], []
    for i in range(0, len(text), 3):
        seen += parser.feed(text[i:i + 3])
        names.append(parser.pending_name)
    assert seen == calls
    assert "get_weather" in names and "math.hypot" in names
    assert parser.close() == []


def test_stream_parser_text_and_errors():
    parser = CallStreamParser(TOOLS)
    assert parser.feed("Sorry, ") == [] and parser.feed("[not a call]") == []
    assert parser.is_text and parser.close() == []
    parser = CallStreamParser(TOOLS)
    assert parser.feed("[get_weather(location='a'), get_") == [ToolCall("get_weather", {"location": "a"})]
    with pytest.raises(ToolCallError):
        parser.close()
    parser = CallStreamParser(TOOLS)
    with pytest.raises(ToolCallError, match="unknown tool"):
        parser.feed("[nope(a=1)]")
