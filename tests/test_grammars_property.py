"""Property: whatever the grammar lets a model write parses into arguments valid for the schema as written.

Hypothesis builds tool schemas from the keywords docs/grammars.md says the
grammar enforces (nested anyOf/oneOf/allOf, $ref with siblings, OpenAPI
nullable, enums and constants of mixed types, integer bounds, string and
array lengths, open and closed objects); random sentences drawn from the
GBNF grammar (tests/gbnf_walk.py) must parse, and their arguments must
validate with jsonschema against what the user wrote. The sampler itself is
checked against llama.cpp's grammar engine where llama-cpp-python is installed.
"""

from __future__ import annotations

import random

import jsonschema
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from gbnf_walk import Grammar
from toolgrad_edge.errors import ToolCallError
from toolgrad_edge.grammars import build_grammar, load_tools, parse_calls
from toolgrad_edge.grammars.gbnf import _NoValue as NoValue  # a schema no value satisfies

# Multi-letter declared names. The grammar keeps undeclared keys off them; an undeclared
# key the sampler writes twice (no grammar can prevent that) is refused by the parser (parsed).
NAMES = ["alpha", "beta", "gamma", "delta"]

scalars = st.one_of(st.text(st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FFF), max_size=4),
                    st.integers(-50, 50), st.floats(-10, 10, allow_nan=False).map(lambda x: round(x, 2)),
                    st.booleans(), st.none())
TYPE_OF = [(bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (type(None), "null")]


def _type_of(value) -> str:
    return next(name for cls, name in TYPE_OF if isinstance(value, cls))


class Defs:
    """The $defs of the schema being drawn, as written and as meant."""

    def __init__(self):
        self.written: dict = {}
        self.meant: dict = {}


@st.composite
def schemas(draw, defs: Defs, depth: int = 0):
    """(schema as written, the same as plain JSON Schema)."""
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const"]
    if depth < 3:
        kinds += ["array", "object", "any_of", "one_of", "all_of", "ref", "any_of_parent"]
    kind = draw(st.sampled_from(kinds))
    written: dict
    if kind == "string":
        written = {"type": "string"}
        if draw(st.booleans()):
            low = draw(st.integers(0, 3))
            written.update(minLength=low, maxLength=low + draw(st.integers(0, 4)))
    elif kind == "integer":
        written = {"type": "integer"}
        low = draw(st.integers(-300, 300))
        bound = draw(st.sampled_from(["none", "min", "max", "both", "exclusive"]))
        if bound in ("min", "both"):
            written["minimum"] = low
        if bound in ("max", "both"):
            written["maximum"] = low + draw(st.integers(0, 1200))
        if bound == "exclusive":
            written.update(exclusiveMinimum=low, exclusiveMaximum=low + draw(st.integers(2, 40)))
    elif kind == "number":
        written = {"type": "number", "minimum": 0} if draw(st.booleans()) else {"type": "number"}
    elif kind in ("boolean", "null"):
        written = {"type": kind}
    elif kind == "enum":
        values = draw(st.lists(scalars, min_size=1, max_size=5, unique_by=repr))
        written = {"enum": values}
        if draw(st.booleans()):
            written["type"] = _type_of(draw(st.sampled_from(values)))  # a mixed enum under a type
    elif kind == "const":
        value = draw(scalars)
        written = {"const": value}
        if draw(st.booleans()):
            written["type"] = _type_of(value)
    elif kind == "array":
        item, item_meant = draw(schemas(defs, depth + 1))
        low = draw(st.integers(0, 2))
        written = {"type": "array", "items": item, "minItems": low, "maxItems": low + draw(st.integers(0, 2))}
        return _maybe_nullable(draw, written, {**written, "items": item_meant})
    elif kind == "object":
        return draw(objects(defs, depth))
    elif kind in ("any_of", "one_of"):
        members = [draw(schemas(defs, depth + 1)) for _ in range(draw(st.integers(1, 3)))]
        if kind == "one_of":
            # exclusive by construction: one member per type (oneOf is compiled as anyOf)
            members = [({"type": t}, {"type": t}) for t in draw(st.lists(
                st.sampled_from(["string", "integer", "boolean", "null"]), min_size=1, max_size=3, unique=True))]
        key = "anyOf" if kind == "any_of" else "oneOf"
        written = {key: [w for w, _ in members]}
        return _maybe_nullable(draw, written, {key: [m for _, m in members]})
    elif kind == "any_of_parent":
        # the parent's keywords hold in every member
        if draw(st.booleans()):
            low = draw(st.integers(-20, 20))
            written = {"type": "integer", "minimum": low, "anyOf": [
                {"maximum": low + draw(st.integers(0, 30))},
                {"minimum": low + 100, "maximum": low + 100 + draw(st.integers(0, 30))}]}
            return _maybe_nullable(draw, written, written)
        a, a_meant = draw(schemas(defs, depth + 1))
        b, b_meant = draw(schemas(defs, depth + 1))
        written = {"type": "object", "properties": {"alpha": a}, "required": ["alpha"],
                   "anyOf": [{"properties": {"beta": b}, "required": ["beta"]}, {"required": ["gamma"]},
                             {"additionalProperties": False}]}
        meant = {**written, "properties": {"alpha": a_meant},
                 "anyOf": [{"properties": {"beta": b_meant}, "required": ["beta"]}, {"required": ["gamma"]},
                           {"additionalProperties": False}]}
        return _maybe_nullable(draw, written, meant)
    elif kind == "all_of":
        low = draw(st.integers(-20, 20))
        other, other_meant = draw(schemas(defs, depth + 1))
        closed = draw(st.booleans())
        first = {"type": "object", "properties": {"alpha": {"type": "integer", "minimum": low}, "beta": other},
                 "required": ["alpha"]}
        second = {"properties": {"alpha": {"maximum": low + draw(st.integers(0, 50))}}}
        if closed:
            second["additionalProperties"] = False  # beta is forbidden by the second member
        written = {"allOf": [first, second]}
        meant = {"allOf": [{**first, "properties": {**first["properties"], "beta": other_meant}}, second]}
        return _maybe_nullable(draw, written, meant)
    else:  # ref, with sibling keywords that add to the target
        target, target_meant = draw(schemas(defs, depth + 1))
        name = f"d{len(defs.written)}"
        defs.written[name] = target
        defs.meant[name] = target_meant
        written = {"$ref": f"#/$defs/{name}"}
        if draw(st.booleans()):
            written["description"] = "a reference"
        if target.get("type") == "string" and draw(st.booleans()):
            written["maxLength"] = 2
        return _maybe_nullable(draw, written, dict(written))
    return _maybe_nullable(draw, written, dict(written))


def _maybe_nullable(draw, written: dict, meant: dict):
    if draw(st.integers(0, 4)) == 0:
        return {**written, "nullable": True}, {"anyOf": [meant, {"type": "null"}]}
    return written, meant


@st.composite
def objects(draw, defs: Defs, depth: int):
    names = draw(st.lists(st.sampled_from(NAMES), min_size=0, max_size=3, unique=True))
    subs = {n: draw(schemas(defs, depth + 1)) for n in names}
    required = [n for n in names if draw(st.booleans())]
    written = {"type": "object", "properties": {n: w for n, (w, _) in subs.items()}, "required": required}
    meant = {**written, "properties": {n: m for n, (_, m) in subs.items()}}
    extra = draw(st.sampled_from(["absent", "false", "true", "schema"]))
    if extra == "absent":
        meant["additionalProperties"] = False  # properties without additionalProperties: closed
    elif extra == "false":
        written["additionalProperties"] = meant["additionalProperties"] = False
    elif extra == "true":
        written["additionalProperties"] = meant["additionalProperties"] = True
    elif extra == "schema":
        written["additionalProperties"] = meant["additionalProperties"] = {"type": "integer"}
    return _maybe_nullable(draw, written, meant)


@st.composite
def tools_and_meaning(draw):
    defs = Defs()
    params, meant = draw(objects(defs, 0).filter(lambda wm: "nullable" not in wm[0]))
    params = {**params, "$defs": defs.written}
    meant = {**meant, "$defs": defs.meant}
    return params, meant


@pytest.mark.slow  # needs nothing, but 1,500 examples take about a minute on 2 cores
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(schema=tools_and_meaning(), syntax=st.sampled_from(["python", "json"]), seed=st.integers(0, 2**32))
def test_sentences_the_grammar_accepts_are_valid_calls(schema, syntax, seed):
    params, meant = schema
    validator = jsonschema.Draft202012Validator(meant)
    try:
        # load_tools already compiles each tool once (check_tool), so it can refuse it too.
        tools = load_tools([{"type": "function", "function": {"name": "tool.f", "parameters": params}}])
        grammar = Grammar(build_grammar(tools, syntax=syntax, tool_choice="required"))
    except NoValue:
        # The strategy can draw a required argument that no value satisfies (e.g. a $ref to
        # const "000" beside maxLength 2, or to minLength 3 beside maxLength 2); refusing such
        # a tool is right, and this property is about the sentences of tools that do compile.
        reject()
    rng = random.Random(seed)
    for _ in range(6):
        text = grammar.sample(rng, budget=300)
        calls = parsed(text, tools, syntax)
        assert calls or calls is None, text
        for call in calls or []:
            errors = [e.message for e in validator.iter_errors(call.arguments)]
            assert not errors, (text, call.arguments, errors)
    auto = Grammar(build_grammar(tools, syntax=syntax, tool_choice="auto"))
    for _ in range(4):
        text = auto.sample(rng, budget=200)
        for call in parsed(text, tools, syntax) or []:
            assert validator.is_valid(call.arguments), (text, call.arguments)


def parsed(text: str, tools, syntax: str):
    """parse_calls' calls, or None where the text writes one undeclared key twice: the one
    thing no grammar can prevent, which the parser refuses (docs/grammars.md, "Objects end")."""
    try:
        return parse_calls(text, tools, syntax)
    except ToolCallError as exc:
        assert "no second value for the key" in str(exc), (text, str(exc))
        return None


# -- the sampler agrees with llama.cpp ---------------------------------------------

def test_sampled_sentences_are_accepted_by_llama_cpp(gemma_270m_gguf):
    pytest.importorskip("llama_cpp")
    from test_grammars_gbnf import Engine

    engine = Engine(gemma_270m_gguf)
    rng = random.Random(3)
    for params in _FIXED_SCHEMAS:
        tools = load_tools([{"name": "tool.f", "parameters": params}])
        for syntax, choice in (("python", "required"), ("json", "required"), ("python", "none")):
            text = build_grammar(tools, syntax=syntax, tool_choice=choice)
            grammar = Grammar(text)
            for _ in range(6):
                sentence = grammar.sample(rng, budget=150)
                assert engine.accepts(text, sentence), (syntax, sentence)


def _fixed_schemas() -> list[dict]:
    """A few fixed schemas covering the constructs of the strategy above."""
    rich = {"type": "object", "$defs": {"p": {"type": "string", "maxLength": 3}}, "properties": {
        "alpha": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 300}, {"const": "n/a"}],
                  "nullable": True},
        "beta": {"$ref": "#/$defs/p", "minLength": 1},
        "gamma": {"type": "array", "items": {"enum": ["x", 1, None, True]}, "maxItems": 3},
        "delta": {"type": "object", "properties": {"alpha": {"type": "boolean"}},
                  "additionalProperties": {"type": "integer"}},
    }, "required": ["beta"]}
    plain = {"type": "object", "properties": {"alpha": {"type": "string"}, "beta": {"type": "number"}}}
    nested = {"type": "object", "properties": {"alpha": {"allOf": [
        {"type": "object", "properties": {"alpha": {"type": "integer", "minimum": 0}}, "required": ["alpha"]},
        {"properties": {"alpha": {"maximum": 9}}, "additionalProperties": False}]}}}
    return [rich, plain, nested]


_FIXED_SCHEMAS = _fixed_schemas()
