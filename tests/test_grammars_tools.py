"""The tool model: loading both tool forms, BFCL normalisation, bad input."""

from __future__ import annotations

import json

import pytest

from toolgrad_edge.errors import SchemaError
from toolgrad_edge.grammars import Tool, build_grammar, load_tools

WEATHER_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["location"],
        },
    },
}
FACTORIAL_BFCL = {
    "name": "math.factorial",
    "description": "Factorial.",
    "parameters": {"type": "dict", "properties": {"number": {"type": "integer"}}, "required": ["number"]},
}


def test_both_forms_load_into_one_model(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([WEATHER_OPENAI, FACTORIAL_BFCL]))
    tools = load_tools(path)
    assert [t.name for t in tools] == ["get_weather", "math.factorial"]
    assert tools[1].parameters["type"] == "object"
    # spec is the bare function dict exactly as given (BFCL types kept)
    assert tools[0].spec == WEATHER_OPENAI["function"]
    assert tools[1].spec == FACTORIAL_BFCL
    assert tools[1].spec["parameters"]["type"] == "dict"
    assert load_tools(str(path)) == tools
    assert load_tools(tools) == tools
    assert load_tools({"tools": [WEATHER_OPENAI]})[0].name == "get_weather"
    assert isinstance(hash(tools[0]), int)


def test_bfcl_types_are_normalised():
    tool = load_tools([{
        "name": "f", "description": "",
        "parameters": {"type": "dict", "properties": {
            "a": {"type": "float"},
            "b": {"type": "tuple", "items": {"type": "float"}},
            "c": {"type": "any"},
            "d": {"type": "dict", "properties": {"x": {"type": "integer"}}},
            "e": {"type": "string", "optional": True},
        }},
    }])[0]
    props = tool.parameters["properties"]
    assert props["a"] == {"type": "number"}
    assert props["b"] == {"type": "array", "items": {"type": "number"}}
    assert props["c"] == {}
    assert props["d"]["type"] == "object"
    assert "optional" not in props["e"]


def test_bfcl_enum_habits():
    tool = load_tools([{
        "name": "f", "parameters": {"type": "dict", "required": ["a", "b", "c"], "properties": {
            "a": {"type": "boolean", "enum": ["True", "False", "dontcare"]},
            "b": {"type": "array", "items": {"type": "string"}, "enum": ["x", "y"]},
            "c": {"type": "string", "enum": ["p", "q"]},
            "d": {"type": "string", "default": None},
        }},
    }])[0]
    props = tool.parameters["properties"]
    # the type, or one of these values
    assert props["a"]["anyOf"] == [{"type": "boolean"}, {"enum": ["True", "False", "dontcare"]}]
    # an enum of scalars on an array constrains its items
    assert props["b"] == {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}}
    assert props["c"] == {"type": "string", "enum": ["p", "q"]}
    # optional with a null default accepts null
    assert props["d"]["type"] == ["string", "null"]


@pytest.mark.parametrize("data, fragment", [
    ([{"name": "a b", "parameters": {"type": "object"}}], "not a valid call name"),
    ([{"name": "1abc", "parameters": {"type": "object"}}], "not a valid call name"),
    ([{"description": "no name"}], 'missing "name"'),
    ([FACTORIAL_BFCL, FACTORIAL_BFCL], "duplicate tool name 'math.factorial'"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}},
                                   "required": ["b"]}}], "'required' names 'b'"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string", "enum": []}}}}],
     "enum"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}},
                                   "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}}}],
     "recursive $ref"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}],
     "unknown type 'strin'"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}],
     "unsupported JSON Schema keyword 'not'"),
    ([{"name": "f", "parameters": {"type": "string"}}], "must be an object schema"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "http://x/y"}}}}],
     "only local references"),
    (42, "expected a list"),
])
def test_bad_tools_raise_schema_error(data, fragment):
    with pytest.raises(SchemaError) as info:
        load_tools(data)
    assert fragment in str(info.value)


def test_errors_name_tool_and_pointer():
    with pytest.raises(SchemaError) as info:
        load_tools([{"name": "book", "parameters": {"type": "object", "properties": {
            "when": {"type": "object", "properties": {"day": {"type": "string", "enum": []}}}}}}])
    message = str(info.value)
    assert "tool 'book'" in message and "/properties/when/properties/day/enum" in message


def test_malformed_json_file_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"name": "f",\n "parameters": }]')
    with pytest.raises(SchemaError) as info:
        load_tools(path)
    assert "broken.json" in str(info.value) and "line 2" in str(info.value)
    with pytest.raises(SchemaError, match="cannot read"):
        load_tools(tmp_path / "missing.json")


def test_a_thousand_tools_load_and_export_but_are_too_many_for_gbnf_sampling():
    from toolgrad_edge.engines.base import check_gbnf_tools

    tools = [{"name": f"tool_{i}", "parameters": {"type": "object"}} for i in range(1000)]
    assert len(load_tools(tools)) == 1000  # the llguidance compiler takes them (test_grammars_llg.py)
    assert "tool_999" in build_grammar(tools)  # the grammar itself has no limit (vLLM, export)
    # Only engines that decode with llama.cpp's GBNF sampler refuse them, naming themselves and the way out.
    with pytest.raises(SchemaError, match="1000 tools given; the llama grammar engine decodes with llama.cpp's GBNF"):
        check_gbnf_tools(1000, "the llama grammar engine", "use the llguidance grammar engine")
    check_gbnf_tools(256, "the llama grammar engine", "use the llguidance grammar engine")


def test_keyword_and_hyphenated_names():
    tools = load_tools([{"name": "trains-find", "parameters": {"type": "dict", "properties": {
        "from": {"type": "string"}, "in": {"type": "string"}, "_from": {"type": "string"}}}}])
    assert isinstance(tools[0], Tool)
    assert '"from" "=" string' in build_grammar(tools)
    assert '"from" ws "=" ws string' in build_grammar(tools, whitespace="flexible")


def test_grammar_command(tmp_path):
    from click.testing import CliRunner

    from toolgrad_edge.cli import main

    path = tmp_path / "tools.json"
    path.write_text(json.dumps([WEATHER_OPENAI, FACTORIAL_BFCL]))
    result = CliRunner().invoke(main, ["grammar", "--tools", str(path), "--tool-choice", "required"])
    assert result.exit_code == 0 and result.output.startswith("root ::= calls\n")
    result = CliRunner().invoke(main, ["grammar", "--tools", str(path), "--syntax", "json", "--json"])
    assert json.loads(result.output)["tools"] == ["get_weather", "math.factorial"]
    result = CliRunner().invoke(main, ["grammar", "--tools", str(path), "--tool-choice", "nope"])
    assert result.exit_code == 1 and "known tools" in result.output and "Traceback" not in result.output


def test_grammar_command_whitespace_layout(tmp_path):
    from click.testing import CliRunner

    from toolgrad_edge.cli import main

    path = tmp_path / "tools.json"
    path.write_text(json.dumps([WEATHER_OPENAI, FACTORIAL_BFCL]))
    tools = load_tools(path)

    def run(*args):
        result = CliRunner().invoke(main, ["grammar", "--tools", str(path), *args])
        assert result.exit_code == 0, result.output
        return result.output

    assert run() == build_grammar(tools) == run("--whitespace", "compact")
    assert run("--whitespace", "flexible") == build_grammar(tools, whitespace="flexible") != run()
    body = json.loads(run("--whitespace", "flexible", "--request", "llama-server", "--prompt", "Hi"))
    assert body["grammar"] == build_grammar(tools, whitespace="flexible")
    body = json.loads(run("--syntax", "json", "--request", "vllm", "--prompt", "Hi"))
    assert body["structured_outputs"]["grammar"] == build_grammar(tools, syntax="json")
    assert json.loads(run("--json", "--whitespace", "flexible"))["whitespace"] == "flexible"
    bad = CliRunner().invoke(main, ["grammar", "--tools", str(path), "--whitespace", "loose"])
    assert bad.exit_code == 2 and "'loose' is not one of 'compact', 'flexible'" in bad.output
    assert "Traceback" not in bad.output
