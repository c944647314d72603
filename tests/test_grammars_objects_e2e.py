"""Issue 27, item 4, on the demo model: objects end by themselves, with declared keys only.

Before, the Gemma 3 270M GGUF (temperature 0) kept adding undeclared keys to a
``format`` object (``"zip": ..., "zip_code": ..., "zip_code": ...``) up to the
token limit, and wrote ``book(trip={"city": "Paris", "adults": ["1000...`` for
a nested ``adults: integer``. Each case runs with both grammar engines: the
GBNF grammar on llama.cpp's sampler and, as the server's ``format`` does, read
by llguidance; the Lark grammar on llguidance.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from toolgrad_edge import ToolRuntime, load_tools
from toolgrad_edge.grammar_engines import LarkGrammar
from toolgrad_edge.grammars import llg_schema_grammar, schema_grammar

pytestmark = pytest.mark.slow

# Ollama's `format` of the issue: properties, no additionalProperties.
PLACE = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                          "state": {"type": "string"}}, "required": ["city"]}
BOOK = load_tools([{"type": "function", "function": {
    "name": "book", "description": "Book a trip.",
    "parameters": {"type": "object", "properties": {"trip": {
        "type": "object", "properties": {"city": {"type": "string"}, "adults": {"type": "integer"}},
        "required": ["city", "adults"]}}, "required": ["trip"]}}}])


@pytest.fixture(scope="module", params=["llama", "llguidance"])
def runtime(request, gemma_270m_gguf, tmp_path_factory):
    if request.param == "llguidance":
        pytest.importorskip("llguidance")
    with ToolRuntime(gemma_270m_gguf, n_threads=2, n_ctx=2048, grammar_engine=request.param,
                     cache_dir=tmp_path_factory.mktemp("prefix")) as rt:
        assert rt.grammar_engine == request.param
        yield rt


def grammars_for(runtime, schema: dict) -> list:
    """The grammars a format reaches this engine with: GBNF (the server's), and Lark on llguidance."""
    out = [schema_grammar(schema)]
    if runtime.grammar_engine == "llguidance":
        out.append(LarkGrammar(llg_schema_grammar(schema)))
    return out


def test_a_format_object_ends_with_declared_keys_only(runtime):
    # Before: '{"state": "https://www.google.com/search?q=Empire+State+Building", "city": "New York",
    # "site": "https://www.google.com/search?' (length), on llama.cpp's sampler.
    prompt = "Where is the Empire State Building? Answer in JSON."
    for grammar in grammars_for(runtime, PLACE):
        # num_predict 48, as in the Ollama generate call
        result = runtime.call([{"role": "user", "content": prompt}], grammar=grammar, max_tokens=48, seed=0)
        assert result.finish_reason == "stop", result.raw_text
        value = json.loads(result.content)
        assert set(value) <= set(PLACE["properties"]), value
        jsonschema.validate(value, PLACE)


@pytest.mark.parametrize("syntax", ["python", "json"])
def test_a_nested_tool_argument_ends_with_declared_keys_only(runtime, syntax):
    # One call: the base 270M model otherwise repeats whole calls up to max_tokens (each of
    # them ended); what is tested here is that the trip object ends. Before: '[book(trip={"city":
    # "Paris", "adults": 1000000000000000000, "type": "object", "properties": {...' (length).
    result = runtime.call("Book a trip to Paris for two adults.", BOOK, tool_choice="required",
                          parallel=False, syntax=syntax, max_tokens=64, seed=0)
    assert result.finish_reason == "tool_calls" and result.parse_error is None, result.raw_text
    [call] = result.tool_calls
    assert call.name == "book"
    assert set(call.arguments["trip"]) == {"city", "adults"}, result.raw_text
    assert isinstance(call.arguments["trip"]["adults"], int)
    jsonschema.validate(call.arguments, BOOK[0].parameters)
