"""Issue 12: a call the grammar allows is a call the parser returns, valid for the schema as written.

Each test here failed before its fix. Grammars are checked with tests/gbnf_walk.py
(a GBNF recogniser and sampler, cross-checked against llama.cpp in test_grammars_property.py).
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from gbnf_walk import load as gbnf
from toolgrad_edge.errors import SchemaError, ToolCallError
from toolgrad_edge.grammars import build_grammar, load_tools, parse_calls
from toolgrad_edge.grammars.calls import TEXT_START_EXCLUDED


def tool(params: dict, name: str = "f") -> list:
    return load_tools([{"type": "function", "function": {"name": name, "parameters": params}}])


def accepts(tools, text: str, syntax: str = "python", **options) -> bool:
    return gbnf(build_grammar(tools, syntax=syntax, **options)).accepts(text)


# -- 1. only declared arguments ---------------------------------------------------

WEATHER = tool({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
               "get_weather")
NO_ARGS = tool({"type": "object", "properties": {}}, "now")


@pytest.mark.parametrize("syntax, text", [
    ("json", '[{"name": "get_weather", "arguments": {"city": "Paris", "bogus": 1, "rm_rf": "/"}}]'),
    ("json", '[{"name": "now", "arguments": {"params_name1": "params_value1"}}]'),
    ("python", "[get_weather(city='Paris', bogus=1)]"),
    ("python", "[now(params_name1='params_value1')]"),
])
def test_undeclared_arguments_are_refused_by_grammar_and_parser(syntax, text):
    tools = WEATHER + NO_ARGS
    assert not accepts(tools, text, syntax)
    with pytest.raises(ToolCallError, match="unknown argument"):
        parse_calls(text, tools, syntax)


def test_top_level_is_closed_even_when_the_schema_says_otherwise():
    tools = tool({"type": "object", "properties": {"a": {"type": "integer"}},
                  "additionalProperties": {"type": "string"}})
    assert accepts(tools, '[{"name": "f", "arguments": {"a": 1}}]', "json")
    assert not accepts(tools, '[{"name": "f", "arguments": {"a": 1, "b": "x"}}]', "json")
    with pytest.raises(ToolCallError, match="unknown argument 'b'"):
        parse_calls('[{"name": "f", "arguments": {"a": 1, "b": "x"}}]', tools, "json")


def test_nested_objects_follow_their_additional_properties():
    # Issue 27: properties without additionalProperties is closed (llama.cpp's and OpenAI's
    # reading); additionalProperties: true opens it (tests/test_grammars_objects.py has the rest).
    tools = tool({"type": "object", "properties": {
        "open": {"type": "object", "properties": {"k": {"type": "integer"}}, "additionalProperties": True},
        "plain": {"type": "object", "properties": {"k": {"type": "integer"}}},
        "closed": {"type": "object", "properties": {"k": {"type": "integer"}}, "additionalProperties": False},
    }})
    assert accepts(tools, '[{"name": "f", "arguments": {"open": {"k": 1, "x": 2}}}]', "json")
    assert not accepts(tools, '[{"name": "f", "arguments": {"plain": {"k": 1, "x": 2}}}]', "json")
    assert not accepts(tools, '[{"name": "f", "arguments": {"closed": {"k": 1, "x": 2}}}]', "json")
    assert parse_calls('[{"name": "f", "arguments": {"open": {"k": 1, "x": 2}}}]', tools, "json")
    with pytest.raises(ToolCallError, match="the object at /plain has the undeclared key 'x'"):
        parse_calls('[{"name": "f", "arguments": {"plain": {"k": 1, "x": 2}}}]', tools, "json")


# -- 2. the text branch never hides a call ------------------------------------------

@pytest.mark.parametrize("space", ["\u00a0", "\u3000", "\u2028", "\u0085", "\u2003", "\u1680", "\x1c", " "])
@pytest.mark.parametrize("choice", ["none", "auto"])
def test_no_whitespace_before_a_call_in_the_text_branch(space, choice):
    text = space + "[get_weather(city='Paris')]"
    assert parse_calls(text, WEATHER) != []  # the parser sees a call here ...
    assert not accepts(WEATHER, text, tool_choice=choice)  # ... so no grammar may produce it
    assert not accepts(WEATHER, space + '[{"name": "get_weather", "arguments": {"city": "P"}}]', "json",
                       tool_choice=choice)


def test_text_branch_and_parser_agree_on_every_whitespace_character():
    assert set(TEXT_START_EXCLUDED) == {chr(c) for c in range(0x110000) if chr(c).isspace()}
    grammar = gbnf(build_grammar(WEATHER, tool_choice="none"))
    for ch in TEXT_START_EXCLUDED:
        assert not grammar.accepts(ch + "x"), hex(ord(ch))
    assert grammar.accepts("x\u00a0[get_weather(city='P')]")  # a call inside text is text
    assert parse_calls("x\u00a0[get_weather(city='P')]", WEATHER) == []


# -- 3. keywords compiled as JSON Schema reads them ----------------------------------

def test_nullable_is_enforced_and_validated():
    tools = tool({"type": "object", "properties": {
        "unit": {"type": "string", "enum": ["c", "f"], "nullable": True},
        "n": {"type": "integer", "nullable": True},
        "r": {"$ref": "#/$defs/p", "nullable": True},
    }, "$defs": {"p": {"type": "string", "maxLength": 2}}})
    for text in ["[f(unit=None)]", "[f(n=None)]", "[f(unit='c', n=3)]", "[f(r=None)]", "[f(r='ab')]"]:
        assert accepts(tools, text), text
        assert parse_calls(text, tools)
    assert not accepts(tools, "[f(unit='x')]")
    assert not accepts(tools, "[f(r='abc')]")


def test_any_of_members_add_to_the_parent():
    schema = {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0, "anyOf": [{"maximum": 10}, {"minimum": 100, "maximum": 200}]},
        "o": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "anyOf": [{"properties": {"b": {"type": "integer"}}, "required": ["b"]}, {"required": ["c"]}]},
    }}
    tools = tool(schema)
    assert accepts(tools, "[f(n=5)]") and accepts(tools, "[f(n=150)]")
    assert not accepts(tools, "[f(n=-1)]")  # the parent's minimum still applies
    assert not accepts(tools, "[f(n=50)]")
    assert accepts(tools, "[f(o={'a': 'x', 'b': 1})]")
    assert not accepts(tools, "[f(o={'b': 1})]")  # the parent's required still applies
    assert not accepts(tools, "[f(o={'a': 'x'})]")  # and so does the member's
    assert parse_calls("[f(o={'a': 'x', 'b': 1}, n=150)]", tools)


def test_ref_siblings_add_to_the_target():
    tools = tool({"type": "object", "$defs": {"name": {"type": "string", "maxLength": 5}},
                  "properties": {"a": {"$ref": "#/$defs/name", "minLength": 2, "maxLength": 10}}})
    assert accepts(tools, "[f(a='abcde')]")
    assert not accepts(tools, "[f(a='abcdef')]")  # the target's maxLength 5 holds
    assert not accepts(tools, "[f(a='a')]")  # the sibling's minLength 2 holds


def test_top_level_ref_with_siblings():
    tools = tool({"$ref": "#/$defs/args", "type": "object", "properties": {},
                  "$defs": {"args": {"type": "object", "properties": {"x": {"type": "integer"}},
                                     "required": ["x"]}}})
    assert accepts(tools, "[f(x=1)]") and not accepts(tools, "[f()]")
    assert parse_calls("[f(x=1)]", tools)[0].arguments == {"x": 1}


def test_all_of_respects_additional_properties_false():
    schema = {"type": "object", "properties": {"o": {"allOf": [
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
        {"properties": {"a": {"minimum": 0}}, "additionalProperties": False},
    ]}}}
    tools = tool(schema)
    assert accepts(tools, "[f(o={'a': 1})]")
    assert not accepts(tools, "[f(o={'a': -1})]")
    assert not accepts(tools, "[f(o={'b': 1})]")  # forbidden by the second member
    validator = jsonschema.Draft202012Validator(schema)
    assert not validator.is_valid({"o": {"b": 1}}) and validator.is_valid({"o": {"a": 1}})
    with pytest.raises(SchemaError, match="required"):
        tool({"type": "object", "properties": {"o": {"allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "integer"}}, "additionalProperties": False}]}}, "required": ["o"]})


def test_python_escapes_of_surrogates_are_refused_by_both():
    tools = tool({"type": "object", "properties": {"s": {"type": "string"}}})
    for text in ["[f(s='\\U0000D800')]", "[f(s='\\U0000dfff')]", "[f(s='\\uD800')]", "[f(s='\\U00110000')]"]:
        assert not accepts(tools, text), text
        with pytest.raises(ToolCallError):
            parse_calls(text, tools)
    for text in ["[f(s='\\U0000E000')]", "[f(s='\\U0001F600')]", "[f(s='\\U0010FFFF')]", "[f(s='\\x41')]"]:
        assert accepts(tools, text), text
        assert parse_calls(text, tools)


# -- 5. BFCL's enum reading only for BFCL schemas ------------------------------------

@pytest.mark.parametrize("prop, bad, good", [
    ({"type": "integer", "enum": [1, 2, "3"]}, ["42", "'3'"], ["1", "2"]),
    ({"type": "string", "enum": ["celsius", "fahrenheit", None]}, ["None", "'kelvin'"], ["'celsius'"]),
    ({"type": "string", "default": None}, ["None"], ["'x'"]),
])
def test_json_schema_tools_keep_their_schema_as_written(prop, bad, good):
    tools = tool({"type": "object", "properties": {"e": prop}})
    validator = jsonschema.Draft202012Validator({"type": "object", "properties": {"e": prop}})
    for text in bad:
        assert not accepts(tools, f"[f(e={text})]"), text
    for text in good:
        call = parse_calls(f"[f(e={text})]", tools)[0]
        assert accepts(tools, f"[f(e={text})]") and validator.is_valid(call.arguments)


def test_bfcl_schemas_keep_bfcl_reading():
    tools = load_tools([{"name": "f", "parameters": {"type": "dict", "properties": {
        "e": {"type": "integer", "enum": [1, 2, "3"]}, "d": {"type": "string", "default": None}}}}])
    assert accepts(tools, "[f(e=42)]") and accepts(tools, "[f(e='3')]") and accepts(tools, "[f(d=None)]")


# -- 8. bad input is one clear error --------------------------------------------------

def test_binary_tools_file_names_the_file(tmp_path):
    path = tmp_path / "tools.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + bytes(range(256)))
    with pytest.raises(SchemaError, match="tools.bin: not a UTF-8 text file"):
        load_tools(path)


def test_deeply_nested_schema_names_tool_and_depth(tmp_path):
    schema: dict = {"type": "string"}
    for _ in range(200):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(SchemaError, match=r"tool 'deep': .*more than 64 levels"):
        load_tools([{"name": "deep", "parameters": schema}])
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SchemaError, match="deep.json"):
        load_tools(path)
    from toolgrad_edge.grammars import schema_grammar

    with pytest.raises(SchemaError, match="more than 64 levels"):
        schema_grammar(schema)


# -- code review: the tool cache ------------------------------------------------------

def test_cached_tools_are_not_shared_between_callers():
    raw = {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}
    first = load_tools([json.loads(json.dumps(raw))])[0]
    first.spec["parameters"]["properties"]["a"]["type"] = "integer"
    first.parameters["properties"].clear()
    second = load_tools([json.loads(json.dumps(raw))])[0]  # an equal definition: a cache hit
    assert second.spec == raw and second.parameters["properties"] == {"a": {"type": "string"}}
    assert second.spec is not first.spec and second.parameters is not first.parameters
