"""Tool model -> GBNF grammar (llama.cpp's grammar format).

One compiler serves both call syntaxes; only the spelling of literals, keys
and the call frame differs. Value rules are shared: every plain string uses
the one ``string`` rule, every equal subschema the same rule, because
llama.cpp's masking cost grows with the grammar.

Argument order. A context-free grammar that accepts every order of n
arguments, each at most once, needs exponentially many rules. The compiler
builds a lattice of states (i, done): ``i`` is the first argument in declared
order not yet written or skipped, ``done`` the set of later ones already
written; an argument may be written if it lies within ``window`` places of
``i``. The window is the widest one whose lattice has at most
``ORDER_STATES`` states: small tools (up to 6 arguments) get every order,
larger ones every order in which no argument jumps more than ``window``
unwritten arguments ahead. Required arguments must all be written and none
twice, in every case.

Whitespace is a property of the layout (``LAYOUTS``), which the compiler asks
for its separators. ``compact`` (the default) fixes it: one space after each
comma and each ':' of an object member, none elsewhere, as BFCL writes calls
(``[f(a='x', b=[1, 2]), g()]``) and json.dumps writes JSON. ToolGrad was
trained on that layout, and a layout without choices lets the runtime emit
separators without a forward pass. ``flexible`` allows one optional space at
every structural position instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

import jsonschema

from ..errors import SchemaError
from .calls import PY_ARG_NAME, SYNTAXES, TEXT_START_EXCLUDED
from .merge import ANNOTATIONS, MergeError, additional_properties, declared_members, flatten, same_value
from .pyliteral import py_string_forms, render_value
from .tools import TOOL_CHECKS, Tool, as_tools

# Lattice size per argument list / object (see the module docstring).
ORDER_STATES = 64
# Longest exact repetition (maxLength, maxItems) written into the grammar;
# longer bounds are checked after generation instead.
MAX_REPEAT = 256
# Integers longer than this are outside int64 anyway.
MAX_DIGITS = 19

# Keywords checked by jsonschema after generation instead of by the grammar.
RELAXED = frozenset({"pattern", "format", "multipleOf", "uniqueItems", "minProperties",
                     "maxProperties"})
# JSON Schema keywords the compiler cannot express: a SchemaError, never dropped.
UNSUPPORTED = ("not", "if", "then", "else", "patternProperties", "propertyNames",
               "dependentSchemas", "dependentRequired", "dependencies",
               "unevaluatedProperties", "unevaluatedItems", "contains", "minContains",
               "maxContains", "$dynamicRef", "$recursiveRef", "additionalItems", "prefixItems")

TOOL_CHOICES = ("auto", "required", "none")


@dataclass(frozen=True)
class Layout:
    """Where a call list holds whitespace: the separators the compiler writes.

    Each is a grammar expression spelled the same in GBNF and in Lark (a
    literal, or the ``ws`` rule), so both compilers write one language.
    """

    comma: str   # between arguments, calls, array items and object members
    colon: str   # between an object key and its value
    equals: str  # between an argument name and its value (python syntax)
    pad: str     # just inside a bracket, after the opening and before the closing one


LAYOUTS = {
    # BFCL's `[f(a='x', b=[1, 2]), g()]` and json.dumps' `{"a": 1}`: what ToolGrad
    # writes, and no separator is a choice, so the runtime emits them unsampled.
    "compact": Layout(comma='", "', colon='": "', equals='"="', pad=""),
    # One optional space at every structural position, for a model that writes
    # spaces elsewhere. Never more than one: a small model given room for
    # newlines and indentation fills max_tokens with them (seen on Gemma 3 270M).
    "flexible": Layout(comma='ws "," ws', colon='ws ":" ws', equals='ws "=" ws', pad="ws"),
}
WHITESPACE = tuple(LAYOUTS)
DEFAULT_WHITESPACE = "compact"


def check_whitespace(whitespace: str) -> None:
    if whitespace not in LAYOUTS:
        raise ValueError(f"unknown whitespace layout {whitespace!r}; expected one of {', '.join(WHITESPACE)}.")


def _seq(*parts: str) -> str:
    """A grammar sequence of the non-empty parts (a compact layout's padding is empty)."""
    return " ".join(p for p in parts if p)


def _container_rules(layout: Layout) -> dict[str, str]:
    """The library's any-value array, object and object member, in ``layout`` (GBNF and Lark alike)."""
    return {
        "array": _seq('"["', layout.pad, f"(value ({layout.comma} value)*)?", layout.pad, '"]"'),
        "object": _seq('"{"', layout.pad, f"(pair ({layout.comma} pair)*)?", layout.pad, '"}"'),
        "pair": f"string {layout.colon} value",
    }


_COMMON_RULES = {
    "ws": r'" "?',  # the flexible layout's optional space
    "hex": r"[0-9a-fA-F]",
    "uint": r'"0" | [1-9] [0-9]{0,18}',
    "integer": r'"-"? uint',
    "frac": r'"." [0-9]{1,17}',
    # Positive exponents stop at 99 so that no literal overflows a float.
    "exp": r'[eE] ("-" [0-9]{1,3} | "+"? [0-9]{1,2})',
    "number": r'"-"? uint frac? exp?',
    "number-nonneg": r"uint frac? exp?",
    # \u escapes exclude surrogates: a lone one is not a character.
    "esc-u": r'"u" ([0-9a-cA-Ce-fE-F] hex{3} | [dD] [0-7] hex{2})',
    # A character of an undeclared key's name: one spelling each (see _key_units).
    "key-dq-char": r'[^"\\\x00-\x1F] | "\\" ["\\bfnrt]',
    "key-sq-char": r"""[^'\\\x00-\x1F] | "\\" ['\\bfnrt]""",
}


def _text_rule(also: str) -> str:
    """Plain text: its first character is no whitespace (Unicode's, as str.strip() sees it),
    no control character and not the start of a call list or a ```-fence (see calls.py)."""
    excluded = "".join(_class_char(c) for c in TEXT_START_EXCLUDED if ord(c) > 0x20)
    first = f"[^{also}`\\x00-\\x20{excluded}]"
    return (f'{first} [^\\x00]* | "`" ([^`\\x00] [^\\x00]*)? '
            '| "``" ([^`\\x00] [^\\x00]*)?')


def _class_char(ch: str, special: str = "[]^-\\") -> str:
    """One character inside a [...] class: the class's special characters escaped, non-ASCII as hex."""
    code = ord(ch)
    if ch in special:
        return "\\" + ch
    if 0x20 < code < 0x7F:
        return ch
    if code <= 0xFF:
        return f"\\x{code:02X}"
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


# An undeclared key's name is spelled with these escapes only (besides its
# quote and the backslash), so that every name has exactly one spelling and
# the grammar can leave out the declared ones: no \u, \x or \/ spellings of a
# declared name slip through. A name holding another control character cannot
# be an undeclared key in a grammar.
_KEY_ESCAPES = {"\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t"}


def _key_units(name: str, quote: str) -> list[str] | None:
    """``name`` as the characters and two-character escapes of its one spelling in an undeclared key."""
    units = []
    for ch in name:
        if ch in (quote, "\\"):
            units.append("\\" + ch)
        elif ch in _KEY_ESCAPES:
            units.append("\\" + _KEY_ESCAPES[ch])
        elif ord(ch) < 0x20:
            return None  # not writable as an undeclared key anyway
        else:
            units.append(ch)
    return units


class _KeySpelling:
    """How ``_key_except`` writes its expression: GBNF here, one regex in llg.py."""

    def lit(self, text: str) -> str:
        return _lit(text)

    def class_char(self, ch: str) -> str:
        return _class_char(ch)

    def group(self, alts: list[str]) -> str:
        return "(" + " | ".join(alts) + ")"

    def seq(self, *parts: str) -> str:
        return " ".join(parts)

    def any_char(self, quote: str) -> str | None:
        """A rule for any character of an undeclared key's name, if the dialect names one."""
        return "key-sq-char" if quote == "'" else "key-dq-char"

    def char(self, quote: str, raws: Iterable[str] = (), escapes: Iterable[str] = ()) -> str:
        """One character of an undeclared key's name, other than the raw characters ``raws``
        and the escapes ``\\e`` for each e in ``escapes``."""
        if not raws and not escapes and self.any_char(quote):
            return self.any_char(quote)
        excluded = "".join(self.class_char(c) for c in [quote, "\\", *sorted(set(raws))])
        raw = f"[^{excluded}{self.class_char(chr(0))}-{self.class_char(chr(0x1F))}]"
        letters = sorted(set(quote + "\\bfnrt") - set(escapes))
        if not letters:
            return raw
        return self.group([raw, self.seq(self.lit("\\"), "[" + "".join(map(self.class_char, letters)) + "]")])


def _key_except(names: Iterable[str], quote: str, spell: _KeySpelling) -> str:
    """A quoted key (in ``quote``) whose name is none of ``names``: a trie of the names, each
    node adding "any other character, then anything"."""
    end = ""  # marks the end of a name in the trie (no unit is empty)
    trie: dict = {}
    for name in names:
        units = _key_units(name, quote)
        if units is None:
            continue
        node = trie
        for unit in units:
            node = node.setdefault(unit, {})
        node[end] = {}

    def node_expr(node: dict) -> str:
        alts, raws, escapes = [], [], []
        for unit, child in node.items():
            if unit == end:
                continue
            alts.append(spell.seq(spell.lit(unit), node_expr(child)))
            (escapes if len(unit) == 2 else raws).append(unit[-1])
        alts.append(spell.seq(spell.char(quote, raws, escapes), spell.char(quote) + "*"))
        body = spell.group(alts)
        return body if end in node else body + "?"  # a name itself needs one more character

    return spell.seq(spell.lit(quote), node_expr(trie), spell.lit(quote))


_SYNTAX_RULES = {
    "python": {
        # \U escapes: any code point up to U+10FFFF except the surrogates, as the parser reads them.
        "esc": ("\"\\\\\" ([\"'\\\\nrtbf] | \"x\" hex{2} | esc-u | \"U\" (\"0000\" "
                "([0-9a-cA-Ce-fE-F] hex{3} | [dD] [0-7] hex{2}) | \"000\" [1-9a-fA-F] hex{4} "
                "| \"0010\" hex{4}))"),
        "sq-char": r"[^'\\\x00-\x1F] | esc",
        "dq-char": r'[^"\\\x00-\x1F] | esc',
        "string": "\"'\" sq-char* \"'\" | \"\\\"\" dq-char* \"\\\"\"",
        "boolean": r'"True" | "False"',
        "null": r'"None"',
        "value": r"object | array | string | number | boolean | null",
        # Plain text: not a call list, and not a ```-fence around one.
        "text": _text_rule("\\["),
    },
    "json": {
        "esc": r'"\\" (["\\/bfnrt] | esc-u)',
        "dq-char": r'[^"\\\x00-\x1F] | esc',
        "string": r'"\"" dq-char* "\""',
        "boolean": r'"true" | "false"',
        "null": r'"null"',
        "value": r"object | array | string | number | boolean | null",
        "text": _text_rule("\\[{"),
    },
}


def build_grammar(tools: Iterable[Any], syntax: str = "python", tool_choice: Any = "auto",
                  parallel: bool = True, whitespace: str = DEFAULT_WHITESPACE) -> str:
    """A GBNF grammar (root rule ``root``) for the answers allowed with these tools.

    ``tool_choice``: ``auto`` (calls or plain text), ``required`` (at least
    one call), ``none`` (plain text only), or a tool name (calls of that tool
    only). ``parallel=False`` allows exactly one call. ``whitespace``:
    ``compact`` (one space after each comma and each object member's ':',
    none elsewhere) or ``flexible`` (an optional space at every structural
    position). Compiled grammars are cached, so calling this on every
    request is cheap.
    """
    if syntax not in SYNTAXES:
        raise ValueError(f"unknown call syntax {syntax!r}; expected one of {', '.join(SYNTAXES)}.")
    check_whitespace(whitespace)
    tools = as_tools(tools)
    choice = _tool_choice(tool_choice, tools)
    # Property order matters (it is the declared argument order): no sort_keys.
    key = json.dumps([[t.name, t.parameters] for t in tools])
    return _cached_grammar(key, syntax, choice, bool(parallel), whitespace)


@lru_cache(maxsize=256)
def _cached_grammar(key: str, syntax: str, choice: str, parallel: bool, whitespace: str) -> str:
    tools = [Tool(name, "", params, {}) for name, params in json.loads(key)]
    return compile_grammar(tools, syntax, choice, parallel, whitespace=whitespace)


def compile_grammar(tools: list[Tool], syntax: str = "python", tool_choice: str = "auto",
                    parallel: bool = True, order_states: int = ORDER_STATES,
                    whitespace: str = DEFAULT_WHITESPACE) -> str:
    """build_grammar without the cache; ``order_states`` sets the argument-order lattice size."""
    return _compile(_Compiler(syntax, order_states, whitespace), tools, tool_choice, parallel)


def _compile(compiler: "_Compiler", tools: list[Tool], tool_choice: Any, parallel: bool) -> str:
    """The call grammar in ``compiler``'s dialect (GBNF here, Lark in llg.py)."""
    choice = _tool_choice(tool_choice, tools)
    if choice == "none" or (choice == "auto" and not tools):
        compiler.rules["root"] = "text"
        compiler.use("text")
        return compiler.render()
    alts = [compiler.call_rule(i, t) for i, t in enumerate(tools)
            if choice in ("auto", "required") or t.name == choice]
    compiler.rules["call"] = " | ".join(alts)
    layout = compiler.layout
    calls = f"call ({layout.comma} call)*" if parallel else "call"
    compiler.rules["calls"] = compiler.mentioned(_seq('"["', layout.pad, calls, layout.pad, '"]"'))
    compiler.rules["root"] = "calls | text" if choice == "auto" else "calls"
    if choice == "auto":
        compiler.use("text")
    return compiler.render()


def schema_grammar(schema: dict | None, syntax: str = "json", whitespace: str = DEFAULT_WHITESPACE) -> str:
    """GBNF for one JSON value matching ``schema`` (None: any JSON object).

    For OpenAI ``response_format``; the value is written as JSON by default,
    in build_grammar's ``whitespace`` layout (compact: json.dumps').
    """
    check_whitespace(whitespace)
    if schema is None:
        schema = {"type": "object"}
    from .tools import normalize_schema

    normal = normalize_schema(schema, "response schema")
    compiler = _Compiler(syntax, ORDER_STATES, whitespace)
    expr = compiler.expr(normal, _Context("response schema", normal), "")
    compiler.rules["root"] = expr
    return compiler.render()


def check_tool(tool: Tool, where: str = "") -> None:
    """Raise SchemaError if the tool's schema uses something the compiler cannot express."""
    _Compiler("json", ORDER_STATES).arguments(tool, 0, where)


TOOL_CHECKS.append(check_tool)  # load_tools refuses a tool no grammar could constrain


def _tool_choice(choice: Any, tools: list[Tool]) -> str:
    if isinstance(choice, dict):  # OpenAI {"type": "function", "function": {"name": ...}}
        choice = (choice.get("function") or {}).get("name") or choice.get("name")
    if choice is None:
        choice = "auto"
    names = [t.name for t in tools]
    if choice in TOOL_CHOICES:
        if choice == "required" and not tools:
            raise SchemaError("tool_choice 'required' needs at least one tool; none were given.")
        return choice
    if choice not in names:
        raise SchemaError(
            f"tool_choice {choice!r} is neither auto, required, none nor a known tool; "
            f"known tools: {', '.join(names) or 'none'}."
        )
    return choice


class _Context:
    """Where in which tool the compiler is, for $ref and for error messages."""

    def __init__(self, label: str, root: dict):
        self.label = label
        self.root = root
        self.refs: list[str] = []

    def fail(self, pointer: str, message: str, empty: bool = False) -> SchemaError:
        cls = _NoValue if empty else SchemaError
        return cls(f"{self.label}: {message} (at {pointer or '/'}).")


class _NoValue(SchemaError):
    """A schema that no value satisfies (an anyOf member that is one is dropped)."""


class _Compiler:
    def __init__(self, syntax: str, order_states: int, whitespace: str = DEFAULT_WHITESPACE):
        self.syntax = syntax
        self.order_states = order_states
        self.layout = LAYOUTS[whitespace]
        self.rules: dict[str, str] = {}
        self.names: dict[str, str] = {}  # body -> rule name, to share equal rules
        self.counts: dict[str, int] = {}
        self._lib = {**_COMMON_RULES, **_SYNTAX_RULES[syntax], **_container_rules(self.layout)}

    # -- rule bookkeeping -------------------------------------------------------
    def lit(self, text: str) -> str:
        """A literal matching ``text`` exactly."""
        return _lit(text)

    def words(self, body: str) -> list[str]:
        """Rule names mentioned in a rule body."""
        return _words(body)

    def render(self) -> str:
        lines = [f"root ::= {self.rules['root']}"]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items() if name != "root"]
        return "\n".join(lines) + "\n"

    def use(self, name: str) -> str:
        """Add a library rule and the library rules it mentions."""
        if name in self.rules or name not in self._lib:
            return name
        body = self._lib[name]
        self.rules[name] = body
        for word in self.words(body):
            self.use(word)
        return name

    def mentioned(self, expr: str) -> str:
        """``expr``, after adding the library rules it mentions (for a rule written directly)."""
        for word in self.words(expr):
            self.use(word)
        return expr

    def add(self, hint: str, body: str) -> str:
        """A rule for ``body``, shared with any equal rule already made."""
        if body in self.names:
            return self.names[body]
        n = self.counts.get(hint, 0)
        self.counts[hint] = n + 1
        name = f"{hint}-{n}"
        self.rules[name] = body
        self.names[body] = name
        for word in self.words(body):
            self.use(word)
        return name

    # -- calls ------------------------------------------------------------------
    def call_rule(self, index: int, tool: Tool) -> str:
        args = self.arguments(tool, index)
        layout = self.layout
        if self.syntax == "json":
            body = _seq('"{"', layout.pad, self.lit('"name"'), layout.colon, self.lit(json.dumps(tool.name)),
                        layout.comma, self.lit('"arguments"'), layout.colon, args, layout.pad, '"}"')
        else:
            body = _seq(self.lit(tool.name + "("), layout.pad, args)
        return self.add(f"call-{index}", body)

    def arguments(self, tool: Tool, index: int, where: str = "") -> str:
        """The argument list of a tool: after "(" up to ")" (python) or a JSON object."""
        ctx = _Context(f"{where}tool {tool.name!r}", tool.parameters)
        try:
            params, refs = flatten(tool.parameters, tool.parameters)
        except MergeError as exc:
            raise ctx.fail(exc.pointer, str(exc)) from None
        ctx.refs = list(refs)
        if not isinstance(params, dict) or "anyOf" in params or "oneOf" in params:
            raise ctx.fail("", "\"parameters\" must be one object schema (no anyOf/oneOf at its top)")
        # Only declared arguments, in both syntaxes, whatever additionalProperties says.
        params = {**params, "additionalProperties": False}
        if self.syntax == "python":
            for name in params.get("properties", {}):
                if not PY_ARG_NAME.fullmatch(name):
                    raise ctx.fail(f"/properties/{name}",
                                   f"argument name {name!r} cannot be written as name=value in "
                                   "the python call syntax; use syntax 'json'")
            return self.object_members(params, ctx, "", f"args-{index}", kwargs=True)
        return self.object(params, ctx, "")

    # -- schemas ----------------------------------------------------------------
    def expr(self, schema: Any, ctx: _Context, ptr: str) -> str:
        """A grammar expression (usually a rule name) for one value matching ``schema``."""
        if schema is True or schema == {}:
            return self.use("value")
        if schema is False:
            raise ctx.fail(ptr, "schema 'false' allows no value")
        if not isinstance(schema, dict):
            raise ctx.fail(ptr, f"expected a schema object, found {type(schema).__name__}")
        for kw in UNSUPPORTED:
            if kw in schema:
                raise ctx.fail(f"{ptr}/{kw}", f"unsupported JSON Schema keyword {kw!r}; "
                               "remove it or express the constraint with supported keywords")
        if isinstance(schema.get("items"), list):
            raise ctx.fail(f"{ptr}/items", "unsupported tuple form of 'items' (a list of schemas)")
        if "$ref" in schema or "allOf" in schema:
            return self.merged(schema, ctx, ptr)
        if "const" in schema:
            # a constant is a one-value enum, which must also satisfy the rest
            enum = [v for v in schema.get("enum", [schema["const"]]) if same_value(v, schema["const"])]
            schema = {**{k: v for k, v in schema.items() if k != "const"}, "enum": enum}
        for key in ("anyOf", "oneOf"):
            if key in schema:
                members = schema[key]
                if not isinstance(members, list) or not members:
                    raise ctx.fail(f"{ptr}/{key}", f"{key!r} needs a non-empty list of schemas")
                # Each member adds to the parent's keywords (required, bounds,
                # properties...), as JSON Schema reads it: parent AND member.
                base = {k: v for k, v in schema.items() if k != key and k not in ANNOTATIONS}
                alts, dropped = [], []
                for i, m in enumerate(members):
                    try:
                        alts.append(self.expr({"allOf": [base, m]} if base else m, ctx,
                                              f"{ptr}/{key}/{i}"))
                    except _NoValue as exc:
                        dropped.append(exc)  # a member no value satisfies adds nothing
                if not alts:
                    raise dropped[0]
                return self.alternatives("any-of", alts)
        if "enum" in schema:
            return self.enum(schema, ctx, ptr)
        t = schema.get("type")
        if isinstance(t, list):
            if not t:
                raise ctx.fail(f"{ptr}/type", "empty type list")
            alts, dropped = [], []
            for ti in dict.fromkeys(t):
                try:
                    alts.append(self.typed(ti, schema, ctx, ptr))
                except _NoValue as exc:
                    dropped.append(exc)  # e.g. ["string", "null"] with impossible lengths: null
            if not alts:
                raise dropped[0]
            return self.alternatives("types", alts)
        if t is None:
            t = _infer_type(schema)
            if t is None:
                return self.use("value")
        return self.typed(t, schema, ctx, ptr)

    def alternatives(self, hint: str, alts: list[str]) -> str:
        alts = list(dict.fromkeys(alts))
        if len(alts) == 1:
            return alts[0]
        return self.add(hint, " | ".join(alts))

    def merged(self, schema: dict, ctx: _Context, ptr: str) -> str:
        """``$ref`` (with its sibling keywords) and ``allOf``: one merged schema (merge.py)."""
        try:
            merged, refs = flatten(schema, ctx.root, tuple(ctx.refs), ptr)
        except MergeError as exc:
            raise ctx.fail(exc.pointer, str(exc), exc.empty) from None
        saved, ctx.refs = ctx.refs, list(refs)
        try:
            return self.expr(merged, ctx, ptr)
        finally:
            ctx.refs = saved

    def literals(self, values: list, ptr: str) -> str:
        texts: list[str] = []
        for v in values:
            if self.syntax == "python" and isinstance(v, str):
                texts += py_string_forms(v)
            elif self.syntax == "python":
                texts.append(render_value(v))
            else:
                texts.append(json.dumps(v, ensure_ascii=False))
        return self.alternatives("literal", [self.lit(t) for t in dict.fromkeys(texts)])

    def enum(self, schema: dict, ctx: _Context, ptr: str) -> str:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise ctx.fail(f"{ptr}/enum", "empty enum: no value could ever be valid")
        rest = {k: v for k, v in schema.items() if k not in ANNOTATIONS and k != "enum"}
        if rest:
            # Only the values that also satisfy the rest of the schema.
            check = jsonschema.Draft202012Validator({**rest, "$defs": ctx.root.get("$defs", {}),
                                                     "definitions": ctx.root.get("definitions", {})})
            try:
                values = [v for v in values if check.is_valid(v)]
            except jsonschema.exceptions.RefResolutionError:
                pass
            if not values:
                raise ctx.fail(f"{ptr}/enum", "no enum value satisfies the rest of its schema", True)
        return self.literals(values, ptr)

    def typed(self, t: str, schema: dict, ctx: _Context, ptr: str) -> str:
        if t == "string":
            return self.string(schema, ctx, ptr)
        if t == "integer":
            return self.integer(schema, ctx, ptr)
        if t == "number":
            low = _num(schema.get("minimum"))
            xlow = _num(schema.get("exclusiveMinimum"))
            if (low is not None and low >= 0) or (xlow is not None and xlow >= 0):
                return self.use("number-nonneg")
            return self.use("number")
        if t == "boolean":
            return self.use("boolean")
        if t == "null":
            return self.use("null")
        if t == "array":
            return self.array(schema, ctx, ptr)
        if t == "object":
            return self.object(schema, ctx, ptr)
        raise ctx.fail(f"{ptr}/type", f"unknown type {t!r}")

    def string(self, schema: dict, ctx: _Context, ptr: str) -> str:
        low = schema.get("minLength", 0) or 0
        high = schema.get("maxLength")
        if high is not None and high > MAX_REPEAT:
            high = None  # checked after generation
        if low > MAX_REPEAT:
            raise ctx.fail(f"{ptr}/minLength", f"minLength above {MAX_REPEAT} is not supported")
        if high is not None and high < low:
            raise ctx.fail(ptr, f"maxLength {high} is below minLength {low}", True)
        if low == 0 and high is None:
            return self.use("string")
        rep = f"{{{low},{'' if high is None else high}}}"
        if self.syntax == "python":
            body = f'"\'" sq-char{rep} "\'" | "\\"" dq-char{rep} "\\""'
        else:
            body = f'"\\"" dq-char{rep} "\\""'
        return self.add("string", body)

    def integer(self, schema: dict, ctx: _Context, ptr: str) -> str:
        lo, hi = _integer_bounds(schema, ctx, ptr)
        if lo is None and hi is None:
            return self.use("integer")
        return self.add("int-range", _int_range(lo, hi))

    def array(self, schema: dict, ctx: _Context, ptr: str) -> str:
        items = schema.get("items", True)
        low = schema.get("minItems", 0) or 0
        high = schema.get("maxItems")
        if high is not None and high > MAX_REPEAT:
            high = None
        if low > MAX_REPEAT:
            raise ctx.fail(f"{ptr}/minItems", f"minItems above {MAX_REPEAT} is not supported")
        if high is not None and high < low:
            raise ctx.fail(ptr, f"maxItems {high} is below minItems {low}", True)
        if items is False or high == 0:
            if low > 0:
                raise ctx.fail(ptr, "the array must have items but 'items' allows none")
            return self.add("array", _seq('"["', self.layout.pad, '"]"'))
        item = self.expr(items, ctx, f"{ptr}/items")
        if low == 0 and high is None and item == "value":
            return self.use("array")
        pad = self.layout.pad
        more = f"({self.layout.comma} {item})"
        if low == 0:
            rep = "*" if high is None else f"{{0,{high - 1}}}"
            body = _seq('"["', pad, f"({item} {more}{rep})?", pad, '"]"')
        else:
            rep = f"{{{low - 1},{'' if high is None else high - 1}}}"
            body = _seq('"["', pad, f"{item} {more}{rep}", pad, '"]"')
        return self.add("array", body)

    def object(self, schema: dict, ctx: _Context, ptr: str) -> str:
        props = schema.get("properties")
        pad = self.layout.pad
        if not props and not schema.get("required"):
            pair = self.extra_pair(schema, ctx, ptr)
            if not pair:
                return self.add("object", _seq('"{"', pad, '"}"'))
            if pair == "pair":
                return self.use("object")
            return self.add("object", _seq('"{"', pad, f"({pair} ({self.layout.comma} {pair})*)?", pad, '"}"'))
        inner = self.object_members(schema, ctx, ptr, "obj", kwargs=False)
        return self.add("object", _seq('"{"', pad, inner))

    def extra_pair(self, schema: dict, ctx: _Context, ptr: str, declared: Iterable[str] = ()) -> str:
        """The rule for one undeclared key and its value if the object allows them, else ''.

        Closed (``''``) where the schema has ``properties`` and no
        ``additionalProperties`` (merge.additional_properties). The key is
        none of the ``declared`` names, so a declared key appears at most once.
        """
        extra = additional_properties(schema)
        if extra is False:
            return ""
        value = self.expr(extra, ctx, f"{ptr}/additionalProperties")
        declared = tuple(declared)
        if value == "value" and not declared:
            return self.use("pair")
        key = self.extra_key(declared) if declared else self.use("string")
        return self.add("pair", f"{key} {self.layout.colon} {value}")

    def extra_key(self, declared: tuple[str, ...]) -> str:
        """A string key that is none of the ``declared`` names (in either quote in python)."""
        quotes = ("'", '"') if self.syntax == "python" else ('"',)
        return self.add("key", " | ".join(_key_except(declared, q, _KeySpelling()) for q in quotes))

    def object_members(self, schema: dict, ctx: _Context, ptr: str, hint: str, kwargs: bool) -> str:
        """The members of an object and its closing bracket, in a flexible order."""
        props = declared_members(schema)  # no properties: the keys it requires, any value
        required = schema.get("required") or []
        for name in required:
            if name not in props:
                raise ctx.fail(f"{ptr}/required",
                               f"'required' names {name!r}, which is not among the properties "
                               f"({', '.join(props) or 'none'})")
        members: list[tuple[str, bool]] = []
        for name, sub in props.items():
            where = f"{ptr}/properties/{_escape(name)}"
            try:
                if sub is False:
                    raise ctx.fail(where, f"property {name!r} allows no value", True)
                value = self.expr(sub, ctx, where)
            except _NoValue:
                if name in required:
                    raise
                continue  # an optional key no value fits is never written
            layout = self.layout
            if kwargs:
                body = f"{self.lit(name)} {layout.equals} {value}"
            elif self.syntax == "python":
                forms = [self.lit(f) for f in py_string_forms(name)]
                key = forms[0] if len(forms) == 1 else "(" + " | ".join(forms) + ")"
                body = f"{key} {layout.colon} {value}"
            else:
                body = f"{self.lit(json.dumps(name, ensure_ascii=False))} {layout.colon} {value}"
            members.append((self.add("member", body), name in required))
        close = _seq(self.layout.pad, '")"' if kwargs else '"}"')
        first_close = close  # closing when no member has been written yet
        if not kwargs:
            pair = self.extra_pair(schema, ctx, ptr, props)
            if pair:
                extra = self.add("extra", f"({self.layout.comma} {pair})*")
                first_close = f"({pair} {extra} {close} | {close})"
                close = f"{extra} {close}"
        if not members:
            return first_close
        return self.lattice(hint, members, close, first_close)

    def lattice(self, hint: str, members: list[tuple[str, bool]], close: str,
                first_close: str) -> str:
        n = len(members)
        required = [r for _, r in members]
        window = _window(n, tuple(required), self.order_states)
        prefix = f"{hint}-{self.counts.get(hint, 0)}"
        self.counts[hint] = self.counts.get(hint, 0) + 1
        made: set[str] = set()

        def advance(i: int, done: int) -> tuple[int, int]:
            while i < n and done >> i & 1:
                done &= ~(1 << i)
                i += 1
            return i, done

        def closable(i: int, done: int) -> bool:
            return all(not required[j] or done >> j & 1 for j in range(i, n))

        def emit(i: int, done: int) -> str:  # write one more member
            name = f"{prefix}-e{i}-{done:x}"
            if name in made:
                return name
            made.add(name)
            alts = []
            for j in range(i, min(n, i + window + 1)):
                if not done >> j & 1:
                    alts.append(f"{members[j][0]} {after(*advance(i, done | 1 << j))}")
            if not required[i]:
                nxt = advance(i + 1, done)
                if nxt[0] < n:
                    alts.append(emit(*nxt))
            self.rules[name] = " | ".join(alts)
            return name

        def after(i: int, done: int) -> str:  # after a member: another one, or close
            name = f"{prefix}-n{i}-{done:x}"
            if name in made:
                return name
            made.add(name)
            alts = []
            if i < n:
                alts.append(f"{self.layout.comma} {emit(i, done)}")
            if closable(i, done):
                alts.append(close)
            self.rules[name] = " | ".join(alts)
            return name

        self.mentioned(f"{self.layout.comma} {close}")
        start = [emit(0, 0)]
        if closable(0, 0):
            start.append(first_close)
        return self.add(f"{prefix}-start", " | ".join(start)) if len(start) > 1 else start[0]


@lru_cache(maxsize=4096)
def _window(n: int, required: tuple[bool, ...], budget: int) -> int:
    """The widest order window whose lattice has at most ``budget`` states."""
    best = 0
    for window in range(1, n):
        if _count_states(n, required, window, budget) > budget:
            break
        best = window
    return best


def _count_states(n: int, required: tuple[bool, ...], window: int, budget: int) -> int:
    def advance(i: int, done: int) -> tuple[int, int]:
        while i < n and done >> i & 1:
            done &= ~(1 << i)
            i += 1
        return i, done

    seen = {(0, 0)}
    todo = [(0, 0)]
    while todo:
        i, done = todo.pop()
        if i >= n:
            continue
        nexts = [advance(i, done | 1 << j) for j in range(i, min(n, i + window + 1))
                 if not done >> j & 1]
        if not required[i]:
            nexts.append(advance(i + 1, done))
        for s in nexts:
            if s not in seen:
                seen.add(s)
                todo.append(s)
                if len(seen) > budget:
                    return len(seen)
    return len(seen)


def _integer_bounds(schema: dict, ctx: _Context, ptr: str) -> tuple[int | None, int | None]:
    """The integer interval a schema allows (None: unbounded on that side, or beyond int64)."""
    import math

    low = _num(schema.get("minimum"))
    high = _num(schema.get("maximum"))
    xlow = _num(schema.get("exclusiveMinimum"))
    xhigh = _num(schema.get("exclusiveMaximum"))
    lo = None if low is None else math.ceil(low)
    hi = None if high is None else math.floor(high)
    if xlow is not None:
        lo = max(lo, math.floor(xlow) + 1) if lo is not None else math.floor(xlow) + 1
    if xhigh is not None:
        hi = min(hi, math.ceil(xhigh) - 1) if hi is not None else math.ceil(xhigh) - 1
    limit = 10 ** MAX_DIGITS - 1
    if lo is not None and lo < -limit:
        lo = None
    if hi is not None and hi > limit:
        hi = None
    if lo is not None and hi is not None and lo > hi:
        raise ctx.fail(ptr, f"no integer lies between minimum {low} and maximum {high}", True)
    return lo, hi


def _int_range(lo: int | None, hi: int | None) -> str:
    """GBNF for the decimal integers in [lo, hi] (None: unbounded), no leading zeros."""
    parts = []
    if lo is None or lo < 0:
        # negative values: "-" then the magnitude in [max(1, -hi), -lo]
        mag_lo = 1 if hi is None or hi >= 0 else -hi
        mag_hi = None if lo is None else -lo
        parts.append('"-" ' + _uint_range(mag_lo, mag_hi))
    if hi is None or hi >= 0:
        parts.append(_uint_range(max(lo, 0) if lo is not None else 0, hi))
    return " | ".join(parts)


def _uint_range(lo: int, hi: int | None) -> str:
    alts: list[str] = []
    top = len(str(hi)) if hi is not None else len(str(lo))
    for digits in range(len(str(lo)), top + 1):
        a = lo if digits == len(str(lo)) else 10 ** (digits - 1)
        b = hi if hi is not None and digits == len(str(hi)) else 10 ** digits - 1
        alts += _same_length(str(a), str(b))
    if hi is None and len(str(lo)) < MAX_DIGITS:
        alts.append(f"[1-9] [0-9]{{{len(str(lo))},{MAX_DIGITS - 1}}}")
    return "(" + " | ".join(alts) + ")"


def _same_length(a: str, b: str) -> list[str]:
    """Sequences matching the digit strings from a to b (same length, a <= b)."""
    if a == b:
        return [_lit(a)]
    if len(a) == 1:
        return [f"[{a}-{b}]"]
    if a[0] == b[0]:
        return [f'"{a[0]}" (' + " | ".join(_same_length(a[1:], b[1:])) + ")"]
    rest = len(a) - 1
    low_full = a[1:] == "0" * rest
    high_full = b[1:] == "9" * rest
    out = []
    first = a[0] if low_full else chr(ord(a[0]) + 1)
    last = b[0] if high_full else chr(ord(b[0]) - 1)
    if not low_full:
        out.append(f'"{a[0]}" (' + " | ".join(_same_length(a[1:], "9" * rest)) + ")")
    if first <= last:
        out.append(f"[{first}-{last}] [0-9]{{{rest}}}")
    if not high_full:
        out.append(f'"{b[0]}" (' + " | ".join(_same_length("0" * rest, b[1:])) + ")")
    return out


def _infer_type(schema: dict) -> str | None:
    if any(k in schema for k in ("properties", "required", "additionalProperties")):
        return "object"
    if any(k in schema for k in ("items", "minItems", "maxItems")):
        return "array"
    if any(k in schema for k in ("minLength", "maxLength", "pattern")):
        return "string"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return "number"
    return None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _lit(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02X}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04X}")
        else:
            out.append(f"\\U{code:08X}")
    out.append('"')
    return "".join(out)


_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|\{[^}]*\}|([A-Za-z0-9-]+)')


def _words(body: str) -> list[str]:
    """Rule names mentioned in a rule body (outside literals, classes and repetitions)."""
    return [m.group(1) for m in _TOKENS.finditer(body) if m.group(1)]
