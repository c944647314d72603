"""Tool model -> a grammar for llguidance (its Lark dialect), enforcing more of JSON Schema.

The call structure is the GBNF compiler's (gbnf.py: the same tool_choice and
parallel semantics, the decline-to-text branch of ``auto``, the same
argument-order lattice, the same whitespace layouts, the same merging of
``$ref``/``allOf``/``anyOf``);
only the leaves differ. llguidance builds masks lazily, so what llama.cpp's
engine could not afford is enforced here while the model writes:

* number bounds and ``multipleOf``: llguidance's own ``%json{...}`` number
  (the same text in both call syntaxes); integer bounds: one digit-range regex;
* strings with ``pattern`` or ``format``: ``%json{...}`` strings, so in the
  python syntax such a string is written in double quotes, without ``\\u``
  or ``\\/`` escapes (what the python parser reads back as the same value);
* ``minLength``/``maxLength`` of any size, in either quote style;
* ``minItems``/``maxItems`` of any size; any number of tools.

What llguidance cannot express is still checked after generation by
parse_calls (see docs/grammars.md): ``uniqueItems``, ``oneOf`` exclusivity,
``minProperties``/``maxProperties``, a pattern llguidance's regex engine
refuses (look-around, backreferences), number bounds beyond its range, and
an undeclared key written twice (a declared one cannot be: undeclared key
names are one regex that leaves the declared names out, gbnf._key_except).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Iterable

from .calls import SYNTAXES, TEXT_START_EXCLUDED
from .gbnf import (DEFAULT_WHITESPACE, ORDER_STATES, _compile, _Compiler, _container_rules, _Context,
                   _int_range, _integer_bounds, _key_except, _KeySpelling, _num, _seq, _tool_choice,
                   check_whitespace)
from .gbnf import _class_char as _gbnf_class_char  # same rule, plus "/" (Lark's regex delimiter)
from .tools import Tool, as_tools

# One regex per lexeme; llguidance matches them with derivatives, so
# repetition bounds of any size cost nothing up front.
_HEX = "[0-9a-fA-F]"
_NOT_SURROGATE_4 = f"(?:[0-9a-cA-Ce-fE-F]{_HEX}{{3}}|[dD][0-7]{_HEX}{{2}})"
_PY_ESC = (r"\\(?:[\"'\\nrtbf]|x" + _HEX + "{2}|u" + _NOT_SURROGATE_4 + "|U(?:0000" + _NOT_SURROGATE_4
           + "|000[1-9a-fA-F]" + _HEX + "{4}|0010" + _HEX + "{4}))")
_JSON_ESC = r"\\(?:[\"\\\/bfnrt]|u" + _NOT_SURROGATE_4 + ")"  # "/" escaped: a regex ends at "/"
_UINT = "(?:0|[1-9][0-9]{0,18})"
# Exponents stop where a float would overflow, as in the GBNF grammar.
_NUMBER_TAIL = r"(?:\.[0-9]{1,17})?(?:[eE](?:-[0-9]{1,3}|\+?[0-9]{1,2}))?"

# Escapes allowed inside %json strings: the ones both parsers read the same way
# (python keeps "\/" as two characters, and llguidance would allow lone-surrogate
# "\u" escapes, which the parsers refuse; raw characters need neither).
_JSON_STRING_ESCAPES = "\"\\bfnrt"


def _class_char(ch: str) -> str:
    # A Lark regex is delimited by "/", which a class must escape too.
    return _gbnf_class_char(ch, special="[]^-\\/")


def _text_regex(also: str) -> str:
    """The text branch (calls.py's rule): no whitespace, control, call-list or fence start."""
    excluded = "".join(_class_char(c) for c in TEXT_START_EXCLUDED if ord(c) > 0x20)
    first = f"[^{also}`\\x00-\\x20{excluded}]"
    return f"/(?:{first}[^\\x00]*|`(?:[^`\\x00][^\\x00]*)?|``(?:[^`\\x00][^\\x00]*)?)/"


def _char_class(quote: str, escape: str) -> str:
    return f"(?:[^{quote}\\\\\\x00-\\x1F]|{escape})"


_LIB = {
    "python": {
        "string": "/" + "|".join(f"{q}{_char_class(q, _PY_ESC)}*{q}" for q in ("'", '"')) + "/",
        "boolean": '"True" | "False"',
        "null": '"None"',
        "text": _text_regex("\\["),
    },
    "json": {
        "string": '/"' + _char_class('"', _JSON_ESC) + '*"/',
        "boolean": '"true" | "false"',
        "null": '"null"',
        "text": _text_regex("\\[{"),
    },
}
for _syntax in SYNTAXES:
    _LIB[_syntax].update({
        "integer": f"/-?{_UINT}/",
        "number": f"/-?{_UINT}{_NUMBER_TAIL}/",
        "number-nonneg": f"/{_UINT}{_NUMBER_TAIL}/",
        "value": "object | array | string | number | boolean | null",
        "ws": '" "?',  # the flexible layout's optional space
    })


class _KeyRegex(_KeySpelling):
    """gbnf._key_except's expression as one regex (one lexeme for llguidance)."""

    def lit(self, text: str) -> str:
        return "".join(map(self.class_char, text))

    def class_char(self, ch: str) -> str:
        """Letters and digits as they are, any other character as \\x{...} (in or out of a class)."""
        return ch if ch.isascii() and ch.isalnum() else f"\\x{{{ord(ch):X}}}"

    def group(self, alts: list[str]) -> str:
        return "(?:" + "|".join(alts) + ")"

    def seq(self, *parts: str) -> str:
        return "".join(parts)

    def any_char(self, quote: str) -> None:
        return None  # a regex has no rules to name


_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_STRING_KEYWORDS = ("minLength", "maxLength", "pattern", "format")


def build_llg_grammar(tools: Iterable[Any], syntax: str = "python", tool_choice: Any = "auto",
                      parallel: bool = True, whitespace: str = DEFAULT_WHITESPACE) -> str:
    """A grammar for ``llguidance.LLMatcher(tokenizer, grammar)``: the answers allowed with these tools.

    The same language as :func:`build_grammar` (``tool_choice`` auto /
    required / none / a tool name, ``parallel``, the decline-to-text branch
    of ``auto``, argument order as free, the ``whitespace`` layout), written in llguidance's Lark
    dialect, with pattern, number bounds, multipleOf, lengths and item
    counts of any size enforced during generation, and no limit on the
    number of tools. Returns Lark text (what ``LLMatcher.grammar_from_lark``
    returns for it). Cached like build_grammar. Raises SchemaError for what
    load_tools or the compiler refuses.
    """
    if syntax not in SYNTAXES:
        raise ValueError(f"unknown call syntax {syntax!r}; expected one of {', '.join(SYNTAXES)}.")
    check_whitespace(whitespace)
    tools = as_tools(tools)
    choice = _tool_choice(tool_choice, tools)
    key = json.dumps([[t.name, t.parameters] for t in tools])
    return _cached_llg_grammar(key, syntax, choice, bool(parallel), whitespace)


@lru_cache(maxsize=64)
def _cached_llg_grammar(key: str, syntax: str, choice: str, parallel: bool, whitespace: str) -> str:
    tools = [Tool(name, "", params, {}) for name, params in json.loads(key)]
    return _compile(_LarkCompiler(syntax, order_states(len(tools)), whitespace), tools, choice, parallel)


def llg_schema_grammar(schema: dict | None, syntax: str = "json", whitespace: str = DEFAULT_WHITESPACE) -> str:
    """schema_grammar for llguidance: one value matching ``schema`` (None: any JSON object)."""
    from .tools import normalize_schema

    check_whitespace(whitespace)
    normal = normalize_schema({"type": "object"} if schema is None else schema, "response schema")
    compiler = _LarkCompiler(syntax, whitespace=whitespace)
    compiler.rules["root"] = compiler.expr(normal, _Context("response schema", normal), "")
    return compiler.render()


def order_states(n_tools: int) -> int:
    """The argument-order lattice budget per object (see gbnf.py) for a grammar of ``n_tools``.

    Up to 256 tools (what llama.cpp's GBNF sampler takes) the same as the GBNF grammar, so no
    answer it accepts is refused here; beyond, smaller in proportion, so the
    grammar stays within llguidance's symbol limit (65,535): 1,000 tools get 16.
    """
    if n_tools <= 256:
        return ORDER_STATES
    return max(4, ORDER_STATES * 256 // n_tools)


class _LarkCompiler(_Compiler):
    """The GBNF compiler's structure with llguidance's Lark spelling and leaves."""

    def __init__(self, syntax: str, order_states: int = ORDER_STATES, whitespace: str = DEFAULT_WHITESPACE):
        super().__init__(syntax, order_states, whitespace)
        self._lib = {**_LIB[syntax], **_container_rules(self.layout)}

    def render(self) -> str:
        lines = ["start: root", f"root: {self.rules['root']}"]
        lines += [f"{name}: {body}" for name, body in self.rules.items() if name != "root"]
        return "\n".join(lines) + "\n"

    def lit(self, text: str) -> str:
        out = ['"']
        for ch in text:
            code = ord(ch)
            if ch in '"\\':
                out.append("\\" + ch)
            elif 0x20 <= code < 0x7F or code > 0xFFFF:
                out.append(ch)  # Lark literals take no \U escapes; the raw character is fine
            elif code <= 0xFF:
                out.append(f"\\x{code:02x}")
            else:
                out.append(f"\\u{code:04x}")
        out.append('"')
        return "".join(out)

    def words(self, body: str) -> list[str]:
        if body.startswith("/") or body.startswith("%json"):
            return []  # a regex or an embedded schema names no rule
        return super().words(body)

    def leaf(self, hint: str, body: str) -> str:
        """A rule for a lexeme (a regex or an embedded JSON Schema), shared when equal."""
        return self.add(hint, body)

    def extra_key(self, declared: tuple[str, ...]) -> str:
        quotes = ("'", '"') if self.syntax == "python" else ('"',)
        return self.leaf("key", "/" + "|".join(_key_except(declared, q, _KeyRegex()) for q in quotes) + "/")

    # -- leaves -------------------------------------------------------------------
    def json_leaf(self, hint: str, schema: dict, escapes: str | None = None) -> str | None:
        """``%json{schema}`` if llguidance compiles it, else None (the keyword is checked after)."""
        options: dict = {"whitespace_flexible": False, "lenient": True}
        if escapes is not None:
            options["json_allowed_escapes"] = escapes
        text = "%json" + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)
        if not _llguidance_compiles(text):
            return None
        return self.leaf(hint, text)

    def typed(self, t: str, schema: dict, ctx: _Context, ptr: str) -> str:
        if t == "number":
            return self.number(schema)
        return super().typed(t, schema, ctx, ptr)

    def number(self, schema: dict) -> str:
        bounds = {k: schema[k] for k in _NUMBER_KEYWORDS if _num(schema.get(k)) is not None}
        if bounds:
            leaf = self.json_leaf("number", {"type": "number", **bounds})
            if leaf:
                return leaf
        low = _num(schema.get("minimum"))
        xlow = _num(schema.get("exclusiveMinimum"))
        if (low is not None and low >= 0) or (xlow is not None and xlow >= 0):
            return self.use("number-nonneg")
        return self.use("number")

    def integer(self, schema: dict, ctx: _Context, ptr: str) -> str:
        if _num(schema.get("multipleOf")) is not None:
            bounds = {k: schema[k] for k in _NUMBER_KEYWORDS if _num(schema.get(k)) is not None}
            leaf = self.json_leaf("integer", {"type": "integer", **bounds})
            if leaf:
                return leaf
        # Bounds alone: the GBNF compiler's digit ranges, as one regex (one
        # lexeme; an embedded schema per tool would cost grammar symbols).
        lo, hi = _integer_bounds(schema, ctx, ptr)
        if lo is None and hi is None:
            return self.use("integer")
        return self.leaf("int-range", "/" + _regex_from_digit_rule(_int_range(lo, hi)) + "/")

    def string(self, schema: dict, ctx: _Context, ptr: str) -> str:
        low = schema.get("minLength", 0) or 0
        high = schema.get("maxLength")
        if high is not None and high < low:
            raise ctx.fail(ptr, f"maxLength {high} is below minLength {low}", True)
        keywords = {k: schema[k] for k in _STRING_KEYWORDS if k in schema}
        if "pattern" in keywords or "format" in keywords or (keywords and self.syntax == "json"):
            leaf = self.json_leaf("string", {"type": "string", **keywords}, _JSON_STRING_ESCAPES)
            if leaf:
                return leaf
        if low == 0 and high is None:
            return self.use("string")
        rep = f"{{{low},{'' if high is None else high}}}"
        if self.syntax == "python":
            alts = [f"{q}{_char_class(q, _PY_ESC)}{rep}{q}" for q in ("'", '"')]
        else:
            alts = ['"' + _char_class('"', _JSON_ESC) + rep + '"']
        return self.leaf("string", "/" + "|".join(alts) + "/")

    def array(self, schema: dict, ctx: _Context, ptr: str) -> str:
        items = schema.get("items", True)
        low = schema.get("minItems", 0) or 0
        high = schema.get("maxItems")
        if high is not None and high < low:
            raise ctx.fail(ptr, f"maxItems {high} is below minItems {low}", True)
        if items is False or high == 0:
            if low > 0:
                raise ctx.fail(ptr, "the array must have items but 'items' allows none", True)
            return self.add("array", _seq('"["', self.layout.pad, '"]"'))
        item = self.expr(items, ctx, f"{ptr}/items")
        if low == 0 and high is None and item == "value":
            return self.use("array")
        # the items after the first: at least low - 1, at most high - 1
        first, most = max(low - 1, 0), None if high is None else high - 1
        more = f"({self.layout.comma} {item})"
        if most == 0:
            more = ""  # Lark has no {0,0}
        elif most is None:
            more += "*" if first == 0 else f"{{{first},}}"
        else:
            more += f"{{{first},{most}}}"
        items = f"{item} {more}".strip()
        pad = self.layout.pad
        body = _seq('"["', pad, f"({items})?" if low == 0 else items, pad, '"]"')
        return self.add("array", body)


@lru_cache(maxsize=4096)
def _llguidance_compiles(leaf: str) -> bool:
    """Whether llguidance accepts an embedded schema (a pattern may use what its regexes lack)."""
    try:
        from llguidance import LLMatcher
    except ImportError:
        return True  # nothing to ask; the engine that loads the grammar reports it
    return not LLMatcher.validate_grammar("start: " + leaf)


def _regex_from_digit_rule(body: str) -> str:
    """gbnf._int_range's GBNF (digit literals, classes, groups) as one regex."""
    return re.sub(r'"([0-9-]*)"', r"\1", body).replace(" ", "").replace("(", "(?:")
