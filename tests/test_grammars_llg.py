"""Tool model -> llguidance grammar (grammars/llg.py): the GBNF grammar's language, with more of JSON Schema enforced.

Most tests run llguidance's matcher over a byte-level tokenizer (one token per
byte), so acceptance is checked character by character and random walks
over the masks reach every byte; one test uses the real Gemma 3 vocabulary.
"""

from __future__ import annotations

import random
import time
import warnings

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_grammars_gbnf import NESTED, layout_cases
from test_grammars_property import parsed
from test_grammars_property import tools_and_meaning
from toolgrad_edge.errors import SchemaError
from toolgrad_edge.grammars import build_grammar, load_tools, parse_calls, render_calls
from toolgrad_edge.grammars.llg import build_llg_grammar

llguidance = pytest.importorskip("llguidance")

EOS = 256


class _Bytes:
    """A tokenizer with one token per byte and an end-of-sequence token."""

    eos_token_id = EOS
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]
    special_token_ids = [EOS]

    def __call__(self, data):
        return list(data if isinstance(data, bytes) else data.encode())


@pytest.fixture(scope="module")
def tok():
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))


def matcher(tok, grammar: str):
    m = llguidance.LLMatcher(tok, grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def accepts(tok, grammar: str, text: str) -> bool:
    """Byte by byte, never consuming a byte the matcher does not allow; then it may end."""
    return consumes(matcher(tok, grammar), text)


def consumes(m, text: str) -> bool:
    for b in text.encode():
        if m.validate_tokens([b]) != 1:
            return False
        assert m.consume_token(b)
    return m.is_accepting()


def walk(tok, grammar: str, rng: random.Random, steps: int = 800) -> str | None:
    """A random answer the grammar allows (None if it did not finish within ``steps``).

    Leans towards closing punctuation and the end as the text grows, so that strings and lists end.
    """
    m = matcher(tok, grammar)
    out = bytearray()
    for step in range(steps):
        if m.is_stopped():
            return out.decode()
        mask = m.compute_bitmask()
        allowed = [i for i in range(EOS + 1) if mask[i // 8] >> (i % 8) & 1]
        closing = [i for i in allowed if i == EOS or i < 128 and chr(i) in "'\")]},"]
        pick = rng.choice(closing if closing and rng.random() < min(0.9, 0.05 + step / 150) else allowed)
        if pick == EOS:
            return out.decode()
        assert m.consume_token(pick)
        out.append(pick)
    return None


TOOLS = load_tools([
    {"name": "get_weather", "description": "", "parameters": {"type": "dict", "properties": {
        "location": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    }, "required": ["location"]}},
    {"name": "math.factorial", "description": "", "parameters": {"type": "dict", "properties": {
        "number": {"type": "integer"}, "from": {"type": "float"}}, "required": ["number"]}},
])


# -- the same language as the GBNF grammar --------------------------------------------

@pytest.mark.parametrize("text, ok", [
    ("[get_weather(location='Paris')]", True),
    ("[get_weather(unit='celsius', location=\"Paris\", days=14)]", True),  # any order
    ("[get_weather(days=3, location='a\\'b\\n\\u00e9')]", True),
    ("[get_weather(location='Paris'), math.factorial(number=-5, from=1e-3)]", True),
    ("[math.factorial(from=2.5, number=0)]", True),
    ("[math.factorial(number=1, from=9e999)]", False),             # would overflow a float
    ("Sorry, I can't look that up.", True),
    ("`x` is not a call", True),
    ("[get_weather(unit='celsius')]", False),                      # required missing
    ("[get_weather(location='a', location='b')]", False),           # repeated
    ("[get_weather(location='a', unit='kelvin')]", False),          # not in enum
    ("[get_weather(location='a', days=15)]", False),                # above maximum
    ("[get_weather(location='a', days=0)]", False),                 # below minimum
    ("[get_weather(location='a', when='now')]", False),             # unknown argument
    ("[get_time(tz='CET')]", False),                                # unknown tool
    ("[math.factorial(number=1.5)]", False),                        # not an integer
    ("[get_weather(location='a')", False),                          # cannot end
    (" [get_weather(location='a')]", False),                        # text may not start with space
    ("\u00a0[get_weather(location='a')]", False),                   # nor with any Unicode space
    ("\u3000[get_weather(location='a')]", False),
    ("```\n[get_weather(location='a')]\n```", False),               # nor be a fenced call list
    ("[get_weather(location='\\U0000D800')]", False),               # a surrogate escape
    ("[I think so]", False),
])
def test_python_grammar(tok, text, ok):
    assert accepts(tok, build_llg_grammar(TOOLS), text) is ok
    assert accepts(tok, build_llg_grammar(TOOLS), text) is _gbnf_accepts(build_grammar(TOOLS), text)
    assert accepts(tok, build_llg_grammar(TOOLS, whitespace="flexible"), text) is ok  # layout-independent


@pytest.mark.parametrize("whitespace", ["compact", "flexible"])
def test_layouts(tok, whitespace):
    """test_grammars_gbnf.py's layout table: the same language in both engines."""
    for syntax, text, ok in layout_cases(whitespace):
        grammar = build_llg_grammar(TOOLS + NESTED, syntax=syntax, whitespace=whitespace)
        assert accepts(tok, grammar, text) is ok, (whitespace, text)
        gbnf = build_grammar(TOOLS + NESTED, syntax=syntax, whitespace=whitespace)
        assert _gbnf_accepts(gbnf, text) is ok, (whitespace, text)


@pytest.mark.parametrize("syntax, prefix, compact", [
    ("python", "[math.factorial(number=1,", " from="),
    ("json", '[{"name": "math.factorial", "arguments": {"number": 1,', ' "from": '),
    ("json", "[{", '"name": "'),
])
def test_compact_layout_leaves_separators_to_jump_forward(tok, syntax, prefix, compact):
    """What the runtime emits without a forward pass: the compact layout's spaces, not the flexible one's."""
    for whitespace, forced in (("compact", compact), ("flexible", "")):
        m = matcher(tok, build_llg_grammar(TOOLS, syntax=syntax, tool_choice="required", whitespace=whitespace))
        assert consumes(m, prefix) is False  # consumed, not finished
        assert bytes(m.compute_ff_tokens()).decode() == forced, whitespace


def test_whitespace_is_part_of_the_cache_key_and_checked():
    compact = build_llg_grammar(TOOLS)
    flexible = build_llg_grammar(TOOLS, whitespace="flexible")
    assert build_llg_grammar(TOOLS, whitespace="compact") is compact and build_llg_grammar(
        TOOLS, whitespace="flexible") is flexible
    assert "\nws:" not in compact and ' ws "," ws ' in flexible
    with pytest.raises(ValueError, match="unknown whitespace layout 'loose'; expected one of compact, flexible"):
        build_llg_grammar(TOOLS, whitespace="loose")


def _gbnf_accepts(grammar: str, text: str) -> bool:
    from gbnf_walk import load

    return load(grammar).accepts(text)


@pytest.mark.parametrize("choice, parallel, text, ok", [
    ("required", True, "No.", False),
    ("required", True, "[get_weather(location='a'), get_weather(location='b')]", True),
    ("none", True, "[get_weather(location='a')]", False),
    ("none", True, "Just text.", True),
    ("none", True, "\u2028[get_weather(location='a')]", False),
    ("math.factorial", True, "[get_weather(location='a')]", False),
    ("math.factorial", True, "[math.factorial(number=3)]", True),
    ({"type": "function", "function": {"name": "math.factorial"}}, True, "[math.factorial(number=3)]", True),
    ("auto", False, "[get_weather(location='a'), get_weather(location='b')]", False),
    ("auto", False, "[get_weather(location='a')]", True),
])
def test_tool_choice_and_parallel(tok, choice, parallel, text, ok):
    for whitespace in ("compact", "flexible"):
        grammar = build_llg_grammar(TOOLS, tool_choice=choice, parallel=parallel, whitespace=whitespace)
        assert accepts(tok, grammar, text) is ok


def test_json_syntax(tok):
    grammar = build_llg_grammar(TOOLS, syntax="json")
    call = '[{"name": "get_weather", "arguments": {"unit": "celsius", "location": "P\\"aris"}}]'
    assert accepts(tok, grammar, call)
    assert accepts(tok, grammar, render_calls(parse_calls(call, TOOLS, "json"), "json"))
    assert not accepts(tok, grammar, '[{"name":"math.factorial","arguments":{"number":3}}]')  # json.dumps' layout
    flexible = build_llg_grammar(TOOLS, syntax="json", whitespace="flexible")
    assert accepts(tok, flexible, '[{"name":"math.factorial","arguments":{"number":3}}]')
    assert not accepts(tok, flexible, '[\n  {"name": "math.factorial", "arguments": {"number": 3}}\n]')
    assert not accepts(tok, grammar, '[{"name": "get_weather", "arguments": {}}]')
    assert not accepts(tok, grammar, '[{"name": "get_weather", "arguments": {"location": "a", "x": 1}}]')
    assert not accepts(tok, grammar, '{"name": "get_weather"}')
    assert accepts(tok, grammar, "Sorry.")
    with pytest.raises(SchemaError, match="known tools"):
        build_llg_grammar(TOOLS, tool_choice="nope")


def test_cached_and_returned_as_lark_text():
    assert build_llg_grammar(TOOLS) is build_llg_grammar([t.spec for t in TOOLS])
    grammar = build_llg_grammar(TOOLS)
    assert grammar.startswith("start: root\n")
    assert llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(grammar)) == ""


# -- what the GBNF grammar only checks after --------------------------------------------

KEYWORDS = load_tools([{"name": "f", "parameters": {"type": "object", "properties": {
    "p": {"type": "number", "minimum": 0, "maximum": 1},
    "t": {"type": "number", "exclusiveMinimum": -1.5, "exclusiveMaximum": 2},
    "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"},
    "name": {"type": "string", "minLength": 2, "maxLength": 300},
    "tags": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 400},
    "m": {"type": "integer", "multipleOf": 5, "minimum": -20},
    "when": {"type": "string", "format": "date"},
    "big": {"type": "integer", "minimum": 12, "maximum": 1234},
}}}])


@pytest.mark.parametrize("syntax", ["python", "json"])
@pytest.mark.parametrize("args, ok", [
    ({"p": 0.5}, True), ({"p": 1}, True), ({"p": 42}, False), ({"p": -0.1}, False),
    ({"t": -1.25}, True), ({"t": -1.5}, False), ({"t": 2}, False),
    ({"code": "ABC-12"}, True), ({"code": "ABC"}, False), ({"code": "abc-1"}, False),
    ({"name": "ab"}, True), ({"name": "a"}, False), ({"name": "x" * 300}, True), ({"name": "x" * 301}, False),
    ({"tags": []}, False), ({"tags": [1, 2]}, True), ({"tags": list(range(400))}, True),
    ({"tags": list(range(401))}, False),
    ({"m": 10}, True), ({"m": -20}, True), ({"m": 11}, False), ({"m": -25}, False),
    ({"when": "2024-02-03"}, True), ({"when": "tomorrow"}, False),
    ({"big": 12}, True), ({"big": 1234}, True), ({"big": 11}, False), ({"big": 1235}, False),
])
def test_keywords_enforced_during_generation(tok, syntax, args, ok):
    text = render_calls([{"name": "f", "arguments": args}], syntax)
    if syntax == "python":
        # strings with a pattern or a format are written in double quotes (see llg.py)
        text = text.replace("'ABC", '"ABC').replace("-12'", '-12"').replace("'2024-02-03'", '"2024-02-03"')
    assert accepts(tok, build_llg_grammar(KEYWORDS, syntax=syntax), text) is ok, text
    if ok:
        assert parse_calls(text, KEYWORDS, syntax)[0].arguments == args


def test_random_walks_satisfy_pattern_bounds_and_lengths(tok):
    rng = random.Random(11)
    validator = jsonschema.Draft202012Validator(KEYWORDS[0].parameters,
                                                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    finished = 0
    for syntax in ("python", "json"):
        grammar = build_llg_grammar(KEYWORDS, syntax=syntax, tool_choice="required")
        for _ in range(25):
            text = walk(tok, grammar, rng)
            if text is None:
                continue
            finished += 1
            for call in parse_calls(text, KEYWORDS, syntax):
                assert validator.is_valid(call.arguments), (text, list(validator.iter_errors(call.arguments)))
    assert finished >= 30


# -- any schema the property test draws ---------------------------------------------------

@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.filter_too_much])
@given(data=st.data(), syntax=st.sampled_from(["python", "json"]), seed=st.integers(0, 2**32))
def test_walks_over_generated_schemas_are_valid_calls(tok, data, syntax, seed):
    params, meant = data.draw(tools_and_meaning())
    tools = load_tools([{"name": "tool.f", "parameters": params}])
    validator = jsonschema.Draft202012Validator(meant)
    grammar = build_llg_grammar(tools, syntax=syntax, tool_choice="required")
    rng = random.Random(seed)
    for _ in range(3):
        text = walk(tok, grammar, rng, steps=400)
        if text is None:
            continue
        for call in parsed(text, tools, syntax) or []:  # None: an undeclared key written twice
            assert validator.is_valid(call.arguments), (text, call.arguments)


# -- many tools --------------------------------------------------------------------------

def test_a_thousand_tools_build_and_run(tok):
    raw = [{"name": f"tool_{i}", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "n": {"type": "integer", "minimum": 0, "maximum": 100 + i},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "p": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["city"]}} for i in range(1000)]
    tools = load_tools(raw)
    assert "tool_999" in build_grammar(tools)  # GBNF too: only llama.cpp's GBNF sampler is limited (engines)
    grammar = build_llg_grammar(tools)
    m = matcher(tok, grammar)  # once per tool set (seconds for 1,000 tools); a copy per request
    assert consumes(m.deep_copy(), "[tool_999(n=1099, city='Paris', p=0.5)]")
    assert consumes(m.deep_copy(), "[tool_0(city='Paris'), tool_500(unit='f', city='x')]")
    assert not consumes(m.deep_copy(), "[tool_999(n=1100, city='Paris')]")
    assert not consumes(m.deep_copy(), "[tool_1000(city='Paris')]")


# -- the real vocabulary -----------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_tok(gemma_270m_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    import llama_cpp._logger
    import llguidance.llamacpp

    llama_cpp._logger.set_verbose(False)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gemma_270m_gguf).encode(), params)
    assert model
    vocab = llama_cpp.llama_model_get_vocab(model)
    started = time.perf_counter()
    with warnings.catch_warnings():  # llguidance calls llama_token_get_attr, deprecated in llama-cpp-python
        warnings.simplefilter("ignore", DeprecationWarning)
        tok = llguidance.llamacpp.lltokenizer_from_vocab(vocab)
    print(f"LLTokenizer from the Gemma 3 vocabulary: {time.perf_counter() - started:.2f} s")
    yield tok
    llama_cpp.llama_model_free(model)


def test_bfcl_ground_truth_token_by_token_with_gemma(gemma_tok):
    from test_grammars_gbnf import _bfcl_sample, _first_allowed

    from toolgrad_edge.grammars import ToolCall

    accepted, rejected = [], []
    for entry in _bfcl_sample():
        tools = load_tools(entry["function"])
        grammar = build_llg_grammar(tools)
        m = matcher(gemma_tok, grammar)
        if "ground_truth" not in entry:
            continue
        calls = [ToolCall(name, {k: _first_allowed(v) for k, v in params.items() if not v or v[0] != ""})
                 for item in entry["ground_truth"] for name, params in item.items()]
        text = render_calls(calls)
        ok = all(m.validate_tokens([t]) == 1 and m.consume_token(t) for t in gemma_tok.tokenize_str(text))
        ok = ok and m.is_accepting()
        assert ok is _gbnf_accepts(build_grammar(tools), text), (entry["id"], text)
        (accepted if ok else rejected).append(entry["id"])
    assert len(accepted) >= 19
    # an undeclared argument (862), undeclared keys in a closed object (189; see test_grammars_gbnf)
    assert rejected == ["live_multiple_189-83-0", "live_multiple_862-181-3"]


def test_schema_grammar_for_response_format(tok):
    from toolgrad_edge.grammars import llg_schema_grammar

    schema = {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1},
                                               "label": {"type": "string", "pattern": "^[a-z]+$"}},
              "required": ["score"], "additionalProperties": False}
    grammar = llg_schema_grammar(schema)
    assert accepts(tok, grammar, '{"score": 0.5, "label": "ok"}')
    assert not accepts(tok, grammar, '{"score": 2}')
    assert not accepts(tok, grammar, '{"score": 0.5, "label": "OK"}')
    assert accepts(tok, llg_schema_grammar(None), '{"any": [1, {"b": null}]}')
    assert not accepts(tok, llg_schema_grammar(None), '{"any":[1]}')
    assert accepts(tok, llg_schema_grammar(None, whitespace="flexible"), '{"any":[1]}')


def test_random_walks_on_the_gemma_vocabulary_are_valid(gemma_tok):
    """Real tokens span lexeme boundaries (`='`, `')]`): what they build must still parse and validate."""
    import numpy as np

    rng = random.Random(5)
    validator = jsonschema.Draft202012Validator(KEYWORDS[0].parameters,
                                                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    eos = gemma_tok.eos_token
    n = gemma_tok.vocab_size
    short = np.array([len(gemma_tok.decode_bytes([t])) <= 3 for t in range(n)])
    short[eos] = False
    finished = 0
    for syntax in ("python", "json"):
        grammar = build_llg_grammar(KEYWORDS, syntax=syntax, tool_choice="required")
        for _ in range(6):
            m = matcher(gemma_tok, grammar)
            tokens: list[int] = []
            for step in range(300):
                if m.is_stopped():
                    break
                bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8),
                                     bitorder="little")[:n].astype(bool)
                if bits[eos] and rng.random() < min(0.9, step / 100):
                    break
                choices = np.flatnonzero(bits & short)
                if not len(choices):
                    choices = np.flatnonzero(bits)
                pick = int(choices[rng.randrange(len(choices))])
                if pick == eos:
                    break
                assert m.consume_token(pick)
                tokens.append(pick)
            else:
                continue
            finished += 1
            text = gemma_tok.decode_str(tokens)
            for call in parse_calls(text, KEYWORDS, syntax):
                assert validator.is_valid(call.arguments), (text, list(validator.iter_errors(call.arguments)))
    assert finished >= 6


def test_what_llguidance_refuses_falls_back_to_a_check_after(tok):
    tools = load_tools([{"name": "f", "parameters": {"type": "object", "properties": {
        "big": {"type": "number", "maximum": 1e20},
        "look": {"type": "string", "pattern": "^(?!x)[a-z]+$"},
        "set": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}}])
    grammar = build_llg_grammar(tools)
    assert accepts(tok, grammar, "[f(big=-3.5, look='abc', set=[1, 2])]")
    assert accepts(tok, grammar, "[f(look='xyz')]")  # generated, then refused by the parser
    with pytest.raises(Exception, match="does not match"):
        parse_calls("[f(look='xyz')]", tools)
    assert accepts(tok, grammar, "[f(set=[1, 1])]")
    with pytest.raises(Exception, match="non-unique"):
        parse_calls("[f(set=[1, 1])]", tools)


def test_argument_order_as_free_as_the_gbnf_grammar(tok):
    props = {f"p{i}": {"type": "integer"} for i in range(5)}
    small = load_tools([{"name": "f", "parameters": {"type": "object", "properties": props, "required": ["p0", "p4"]}},
                        {"name": "now", "parameters": {"type": "object", "properties": {}}}])
    grammar = build_llg_grammar(small)
    order = ["p4", "p2", "p0", "p3", "p1"]
    assert accepts(tok, grammar, "[f(" + ", ".join(f"{p}=1" for p in order) + ")]")
    assert accepts(tok, grammar, "[f(p4=1, p0=2)]")
    assert not accepts(tok, grammar, "[f(p3=1, p0=2)]")
    assert accepts(tok, grammar, "[now()]") and not accepts(tok, grammar, "[now(x=1)]")
    props = {f"q{i}": {"type": "integer"} for i in range(20)}
    large = load_tools([{"name": "g", "parameters": {"type": "object", "properties": props}}])
    grammar = build_llg_grammar(large)
    for text in ["[g(" + ", ".join(f"q{i}=1" for i in range(20)) + ")]", "[g(q0=1, q13=2, q12=3)]",
                 "[g(q0=1, q13=2, q13=3)]", "[g(q5=1, q0=1)]"]:
        assert accepts(tok, grammar, text) is _gbnf_accepts(build_grammar(large), text), text
