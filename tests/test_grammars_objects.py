"""Issue 27, item 4: objects end.

An object with ``properties`` and no ``additionalProperties`` takes its declared
keys only, each once (llama.cpp's, Ollama's and OpenAI strict mode's reading);
where ``additionalProperties`` allows undeclared keys, their names are none of
the declared ones. Every table runs on both grammar engines: the GBNF grammar
through tests/gbnf_walk.py, the Lark grammar through llguidance's matcher over
a byte tokenizer (test_grammars_llg.py). What no grammar can prevent, an
undeclared key written twice, the parser refuses.
"""

from __future__ import annotations

import json
import random

import pytest

from gbnf_walk import load as gbnf
from toolgrad_edge.errors import ToolCallError
from toolgrad_edge.grammars import (CallStreamParser, build_grammar, build_llg_grammar, llg_schema_grammar,
                                    load_tools, parse_calls, schema_grammar)

CITY = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                         "zip": {"type": "string"}}, "required": ["city"]}
TRIP = {"type": "object", "properties": {"trip": {
    "type": "object", "properties": {"city": {"type": "string"}, "adults": {"type": "integer"}},
    "required": ["city"]}}, "required": ["trip"]}
OPEN = {**CITY, "additionalProperties": True}
# Declared names that need escapes, in both quotes.
ODD = {"type": "object", "properties": {"a'b": {}, 'q"r': {}, "x\\y": {}, "t\tab": {}},
       "additionalProperties": True}


def book(params: dict = TRIP, name: str = "book") -> list:
    return load_tools([{"type": "function", "function": {"name": name, "parameters": params}}])


@pytest.fixture(scope="module")
def tok():
    llguidance = pytest.importorskip("llguidance")
    from test_grammars_llg import _Bytes

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))


@pytest.fixture(params=["gbnf", "llguidance", "llguidance-reading-gbnf"])
def engine(request):
    """(grammar for tools, grammar for one schema) -> a function telling whether a text is accepted.

    "llguidance-reading-gbnf" is the GBNF grammar as llguidance converts it: how the
    server's ``format`` / ``response_format`` grammar runs on the llguidance engine.
    """
    if request.param == "gbnf":
        return (lambda tools, syntax: gbnf(build_grammar(tools, syntax=syntax)).accepts,
                lambda schema, syntax="json": gbnf(schema_grammar(schema, syntax)).accepts)
    from test_grammars_llg import accepts

    tok = request.getfixturevalue("tok")
    if request.param == "llguidance":
        calls, schema_text = build_llg_grammar, llg_schema_grammar
    else:
        from llguidance import grammar_from

        def calls(tools, syntax):
            return grammar_from("gbnf", build_grammar(tools, syntax=syntax))

        def schema_text(schema, syntax):
            return grammar_from("gbnf", schema_grammar(schema, syntax))
    return (lambda tools, syntax: lambda text: accepts(tok, calls(tools, syntax=syntax), text),
            lambda schema, syntax="json": lambda text: accepts(tok, schema_text(schema, syntax), text))


# -- format / response_format: one JSON value ----------------------------------------

@pytest.mark.parametrize("schema, text, ok", [
    # the issue's case: properties and no additionalProperties -> declared keys only
    (CITY, '{"city": "New York", "country": "United States"}', True),
    (CITY, '{"country": "United States", "city": "New York", "zip": "10016"}', True),
    (CITY, '{"city": "New York", "state": "New York"}', False),
    (CITY, '{"city": "New York", "zip_code": "10016"}', False),
    (CITY, '{"city": "New York", "zip": "10016", "zip": "10016"}', False),
    (CITY, '{"city": "New York", "city": "Boston"}', False),
    # additionalProperties false: the same
    ({**CITY, "additionalProperties": False}, '{"city": "NY", "state": "NY"}', False),
    # additionalProperties true: JSON Schema's reading, undeclared names exclude the declared ones
    (OPEN, '{"city": "NY", "state": "NY", "zip_code": "1"}', True),
    (OPEN, '{"city": "NY", "cit": 1, "cityy": 2, "": 3, "ci\\ty": 4}', True),
    (OPEN, '{"city": "NY", "city": "Boston"}', False),
    (OPEN, '{"zip": "1", "city": "NY", "zip": "2"}', False),
    (OPEN, '{"city": "NY", "c\\u0069ty": "Boston"}', False),  # no second spelling of a declared name
    (OPEN, '{"city": "NY", "st\\/ate": "NY"}', False),  # undeclared names take no \/ or \u escapes
    # additionalProperties a schema: its values, still no declared name
    ({**CITY, "additionalProperties": {"type": "integer"}}, '{"city": "NY", "n": 1}', True),
    ({**CITY, "additionalProperties": {"type": "integer"}}, '{"city": "NY", "n": "x"}', False),
    ({**CITY, "additionalProperties": {"type": "integer"}}, '{"city": "NY", "zip": 1}', False),
    # free-form objects keep any keys
    ({"type": "object"}, '{"a": 1, "b": {"c": [2]}, "city": "x"}', True),
    ({"type": "object", "required": ["a"]}, '{"a": 1, "b": 2}', True),
    ({"type": "object", "required": ["a"]}, '{"b": 2, "a": 1}', False),  # undeclared keys come after
    ({"type": "object", "required": ["a"]}, '{"a": 1, "a": 2}', False),
    # properties: {} declares that there are none
    ({"type": "object", "properties": {}}, "{}", True),
    ({"type": "object", "properties": {}}, '{"a": 1}', False),
    ({"type": "object", "properties": {}, "required": ["a"]}, '{"a": 1}', True),
    ({"type": "object", "properties": {}, "required": ["a"]}, '{"a": 1, "b": 2}', False),
    # nested, through $ref, allOf (closed over every member's keys) and anyOf
    ({"type": "object", "properties": {"o": CITY}}, '{"o": {"city": "NY", "x": 1}}', False),
    ({"$defs": {"c": CITY}, "$ref": "#/$defs/c"}, '{"city": "NY", "x": 1}', False),
    ({"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}, '{"a": 1, "b": 2}', True),
    ({"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}, '{"a": 1, "c": 2}', False),
    ({"allOf": [{"properties": {"a": {}}}, {"additionalProperties": True}]}, '{"a": 1, "c": 2}', True),
    ({"allOf": [{"properties": {"a": {}}}, {"additionalProperties": True}]}, '{"a": 1, "a": 2}', False),
    ({"anyOf": [{"type": "object", "properties": {"a": {}}}, {"type": "object"}]}, '{"z": 1}', True),
    ({"type": "object", "properties": {"a": {}}, "anyOf": [{"properties": {"b": {}}}]},
     '{"a": 1, "b": 2}', True),
    ({"type": "object", "properties": {"a": {}}, "anyOf": [{"properties": {"b": {}}}]},
     '{"a": 1, "c": 2}', False),
])
def test_schema_grammar_objects(engine, schema, text, ok):
    _, schema_grammar_accepts = engine
    assert schema_grammar_accepts(schema)(text) is ok


# -- tool arguments: the nested object of the issue, both call syntaxes -----------------

# f(o=...): an open object whose declared names include ones that need escapes.
OPEN_ARG = {"type": "object", "properties": {"o": {**OPEN, "properties": {**OPEN["properties"],
                                                                          **ODD["properties"]}}}}


@pytest.mark.parametrize("params, syntax, text, ok", [
    (TRIP, "python", "[book(trip={'city': 'Paris', 'adults': 2})]", True),
    (TRIP, "python", "[book(trip={\"adults\": 2, 'city': 'Paris'})]", True),
    (TRIP, "python", "[book(trip={'city': 'Paris', 'country': 'France'})]", False),
    (TRIP, "python", "[book(trip={'city': 'Paris', 'adults': 2, 'adults': 3})]", False),
    (TRIP, "python", "[book(trip={'city': 'Paris', 'adults': [1000]})]", False),  # the issue's cut call
    (TRIP, "python", "[book(trip={'city': 'Paris', \"city\": 'Rome'})]", False),
    (TRIP, "json", '[{"name": "book", "arguments": {"trip": {"city": "Paris", "adults": 2}}}]', True),
    (TRIP, "json", '[{"name": "book", "arguments": {"trip": {"city": "Paris", "x": 1}}}]', False),
    (TRIP, "json", '[{"name": "book", "arguments": {"trip": {"city": "Paris", "adults": 1, "adults": 2}}}]', False),
    # additionalProperties: true: undeclared keys, but never a declared name again, in any spelling
    (OPEN_ARG, "python", "[book(o={'city': 'P', 'state': 'NY', 'zip_code': 1})]", True),
    (OPEN_ARG, "python", "[book(o={'city': 'P', 'city': 'Q'})]", False),
    (OPEN_ARG, "python", "[book(o={'city': 'P', \"city\": 'Q'})]", False),
    (OPEN_ARG, "python", "[book(o={'city': 'P', 'c\\x69ty': 'Q'})]", False),
    (OPEN_ARG, "python", "[book(o={'city': 'P', 'a\\'b': 1, \"a'b\": 2})]", False),
    (OPEN_ARG, "python", "[book(o={'city': 'P', 'ab': 1, \"a'\": 2})]", True),
    (OPEN_ARG, "json", '[{"name": "book", "arguments": {"o": {"city": "P", "state": "NY"}}}]', True),
    (OPEN_ARG, "json", '[{"name": "book", "arguments": {"o": {"city": "P", "city": "Q"}}}]', False),
])
def test_tool_objects_take_declared_keys_once(engine, params, syntax, text, ok):
    calls_accepts, _ = engine
    assert calls_accepts(book(params), syntax)(text) is ok


@pytest.mark.parametrize("name", ["a'b", 'q"r', "x\\y", "t\tab"])
@pytest.mark.parametrize("syntax", ["python", "json"])
def test_declared_names_with_escapes_are_not_undeclared_keys(engine, syntax, name):
    calls_accepts, _ = engine
    accepts = calls_accepts(book({"type": "object", "properties": {"o": ODD}}, "f"), syntax)
    other = {n: 1 for n in ODD["properties"] if n != name}
    if syntax == "json":
        text = '[{"name": "f", "arguments": {"o": %s}}]'
        declared = json.dumps({name: 1})[1:-1]
        assert accepts(text % json.dumps({name: 1}))
        assert not accepts(text % ("{" + json.dumps(other)[1:-1] + ", " + declared + ", " + declared + "}"))
    else:
        for quote in ("'", '"'):
            key = quote + name.replace("\\", "\\\\").replace(quote, "\\" + quote).replace("\t", "\\t") + quote
            assert accepts(f"[f(o={{{key}: 1}})]")
            assert not accepts(f"[f(o={{{key}: 1, 'z': 2, {key}: 3}})]"), key


def test_random_sentences_never_repeat_a_declared_key():
    tools = book({"type": "object", "properties": {"o": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}, "additionalProperties": {"type": "integer"}}},
        "required": ["o"]}, "f")
    grammar = gbnf(build_grammar(tools, syntax="json", tool_choice="required"))
    rng = random.Random(0)
    for _ in range(200):
        text = grammar.sample(rng, budget=200)
        pairs = []
        json.loads(text, object_pairs_hook=lambda items: pairs.append([k for k, _ in items]) or dict(items))
        for keys in pairs:
            assert keys.count("a") <= 1 and keys.count("b") <= 1, text


# -- the parser: what the grammars cannot prevent, and unconstrained text -------------------

def test_an_undeclared_key_written_twice_is_refused_never_returned():
    tools = book({"type": "object", "properties": {"o": OPEN}}, "f")
    text = "[f(o={'city': 'P', 'x': 1, 'x': 2})]"
    assert gbnf(build_grammar(tools)).accepts(text)  # no context-free grammar can refuse it
    with pytest.raises(ToolCallError, match=r"no second value for the key 'x' in the dict opened at offset 5"):
        parse_calls(text, tools)
    with pytest.raises(ToolCallError, match="no second value for the key 'x'"):
        parse_calls('[{"name": "f", "arguments": {"o": {"city": "P", "x": 1, "x": 2}}}]', tools, "json")
    stream = CallStreamParser(tools)
    with pytest.raises(ToolCallError, match="no second value for the key 'x'"):
        stream.feed(text)
        stream.close()


@pytest.mark.parametrize("params, text, message", [
    (TRIP, "[book(trip={'city': 'Paris', 'country': 'France'})]",
     "the object at /trip has the undeclared key 'country'; it declares 'city', 'adults'"),
    ({"type": "object", "properties": {"l": {"type": "array", "items": CITY}}},
     "[book(l=[{'city': 'a'}, {'city': 'b', 'x': 1}])]", "the object at /l/1 has the undeclared key 'x'"),
    ({"type": "object", "properties": {"o": {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}}},
     "[book(o={'a': 1, 'c': 2})]", "the object at /o has the undeclared key 'c'; it declares 'a', 'b'"),
    ({"type": "object", "properties": {"o": {"type": "object", "properties": {}}}},
     "[book(o={'a': 1})]", "it declares no keys"),
    ({"type": "object", "$defs": {"c": CITY},
      "properties": {"o": {"anyOf": [{"$ref": "#/$defs/c"}, {"type": "null"}]}}},
     "[book(o={'city': 'P', 'x': 1})]", "the object at /o has the undeclared key 'x'"),
    ({"type": "object", "properties": {"o": {"type": "object", "properties": {}, "required": ["a"]}}},
     "[book(o={'a': 1, 'b': 2})]", "the object at /o has the undeclared key 'b'; it declares 'a'"),
])
def test_parser_refuses_undeclared_keys_in_closed_objects(params, text, message):
    with pytest.raises(ToolCallError, match=message.replace("[", r"\[")):
        parse_calls(text, book(params))


@pytest.mark.parametrize("params, text", [
    ({"type": "object", "properties": {"o": {"type": "object"}}}, "[book(o={'a': 1, 'b': {'c': 2}})]"),
    ({"type": "object", "properties": {"o": OPEN}}, "[book(o={'city': 'P', 'x': 1})]"),
    ({"type": "object", "properties": {"o": {"anyOf": [CITY, {"type": "object"}]}}}, "[book(o={'z': 1})]"),
    ({"type": "object", "$defs": {"c": CITY},
      "properties": {"o": {"anyOf": [{"$ref": "#/$defs/c"}, {"type": "null"}]}}}, "[book(o={'city': 'P'})]"),
    ({"type": "object", "properties": {"o": {"allOf": [{"properties": {"a": {}}}, {"additionalProperties": True}]}}},
     "[book(o={'a': 1, 'c': 2})]"),
])
def test_parser_keeps_open_objects_open(params, text):
    [call] = parse_calls(text, book(params))
    assert call.arguments == parse_calls(text.replace("'", '"'), book(params))[0].arguments
    assert len(call.arguments) == 1
