"""Model text -> validated tool calls, and tool calls -> canonical text.

A model answer is either a call list (it starts with ``[`` once surrounding
whitespace and an optional ```-fence are removed) or a plain-text answer.
The same rule is what the grammar's text branch allows (see gbnf.py), so a
grammar-constrained answer is always one or the other.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable

import jsonschema

from ..errors import ToolCallError
from .merge import (ANNOTATIONS, MergeError, additional_properties, declared_arguments, declared_members,
                    flatten)
from .pyliteral import Reader, render_value
from .tools import CALL_NAME, Tool, as_tools

SYNTAXES = ("python", "json")

# What str.strip() removes: every character that Python calls whitespace
# (ASCII and Unicode: U+0085, U+00A0, U+2028, U+3000 ...). An answer is a call
# list if it starts with "[" once these are stripped, so the grammars' text
# branch may not start with any of them either.
TEXT_START_EXCLUDED = "".join(c for c in map(chr, range(0x10000)) if c.isspace())

# Argument names the python call syntax can carry: identifiers, plus the
# hyphens and dots some real tool sets use. Keywords (``from``, ``in``) are
# fine: this parser is not Python's.
PY_ARG_NAME = re.compile(r"[^\W\d][\w$\-.]*")

_FENCE = re.compile(r"```[A-Za-z0-9_\-]*[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool: its name and its JSON arguments."""

    name: str
    arguments: dict = field(hash=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "arguments": self.arguments}


def check_syntax(syntax: str) -> None:
    if syntax not in SYNTAXES:
        raise ValueError(f"unknown call syntax {syntax!r}; expected one of {', '.join(SYNTAXES)}.")


def parse_calls(text: str, tools: Iterable[Any], syntax: str = "python") -> list[ToolCall]:
    """The tool calls in a model answer; [] for a plain-text answer.

    Raises ToolCallError (with the offset, line and column) for text that
    starts like a call list but is not a valid one, for an unknown tool, and
    for arguments that do not validate against the tool's schema.
    """
    check_syntax(syntax)
    by_name = {t.name: t for t in as_tools(tools)}
    body, offset = _unwrap(text)
    if not body.startswith("["):
        return []
    reader = Reader(body, syntax, offset)
    raw = _read_calls(reader)
    return [_validated(name, args, by_name, i, pos) for i, (name, args, pos) in enumerate(raw)]


def render_calls(calls: Iterable[ToolCall | dict], syntax: str = "python") -> str:
    """The canonical text of a call list; parse_calls(render_calls(c)) == c."""
    check_syntax(syntax)
    items = [c if isinstance(c, ToolCall) else ToolCall(c["name"], dict(c.get("arguments") or {}))
             for c in calls]
    if syntax == "json":
        return json.dumps([c.to_dict() for c in items], ensure_ascii=False)
    parts = []
    for call in items:
        args = ", ".join(f"{k}={render_value(v)}" for k, v in call.arguments.items())
        parts.append(f"{call.name}({args})")
    return "[" + ", ".join(parts) + "]"


def _unwrap(text: str) -> tuple[str, int]:
    """Strip surrounding whitespace and one ```-fence; return the body and its offset."""
    stripped = text.strip()
    offset = len(text) - len(text.lstrip())
    match = _FENCE.fullmatch(stripped)
    if match:
        inner = match.group(1)
        lead = len(inner) - len(inner.lstrip())
        return inner.strip(), offset + match.start(1) + lead
    return stripped, offset


# -- reading -------------------------------------------------------------------

def _read_calls(reader: Reader) -> list[tuple[str, dict, int]]:
    """[(name, arguments, offset)] from a call list; the reader is at its '['."""
    reader.expect("[")
    calls: list[tuple[str, dict, int]] = []
    while True:
        reader.skip_ws()
        if reader.peek() == "]" and not calls:
            reader.pos += 1
            break
        calls.append(_read_call(reader))
        reader.skip_ws()
        c = reader.peek()
        if c == ",":
            reader.pos += 1
            reader.skip_ws()
            if reader.peek() == "]":  # trailing comma
                reader.pos += 1
                break
        elif c == "]":
            reader.pos += 1
            break
        else:
            raise reader.error("',' or ']' after a call")
    if not reader.at_end():
        raise reader.error("the end of the answer after the call list")
    return calls


def _read_call(reader: Reader) -> tuple[str, dict, int]:
    reader.skip_ws()
    start = reader.offset + reader.pos
    if reader.json:
        if reader.peek() != "{":
            raise reader.error('a call object {"name": ..., "arguments": {...}}')
        obj = reader.mapping(0)
        name, args = obj.get("name"), obj.get("arguments", {})
        if not isinstance(name, str) or not isinstance(args, dict) or set(obj) - {"name", "arguments"}:
            raise ToolCallError(
                f'call at offset {start}: expected an object with "name" (a string) and '
                f'"arguments" (an object), found keys {sorted(obj)}.'
            )
        return name, args, start
    match = CALL_NAME.match(reader.text, reader.pos)
    if not match:
        raise reader.error("a tool name")
    name = match.group()
    reader.pos = match.end()
    reader.expect("(")
    args: dict = {}
    while True:
        reader.skip_ws()
        if reader.peek() == ")":
            reader.pos += 1
            return name, args, start
        if args:
            if reader.peek() != ",":
                raise reader.error(f"',' or ')' in the call of {name}")
            reader.pos += 1
            reader.skip_ws()
            if reader.peek() == ")":
                reader.pos += 1
                return name, args, start
        arg = PY_ARG_NAME.match(reader.text, reader.pos)
        if not arg:
            raise reader.error(f"a keyword argument name=value in the call of {name}")
        reader.pos = arg.end()
        reader.expect("=")
        if arg.group() in args:
            raise reader.error(f"no second value for argument {arg.group()!r} of {name}", arg.start())
        args[arg.group()] = reader.value()


# -- validation ----------------------------------------------------------------

def _validated(name: str, args: dict, by_name: dict[str, Tool], index: int, offset: int) -> ToolCall:
    tool = by_name.get(name)
    if tool is None:
        known = ", ".join(sorted(by_name)) or "none"
        raise ToolCallError(f"call {index} at offset {offset}: unknown tool {name!r}; known tools: {known}.")
    declared = _declared(_canonical(tool.parameters))
    unknown = [key for key in args if key not in declared]
    if unknown:
        raise ToolCallError(
            f"call {index} at offset {offset} ({name}): unknown argument {unknown[0]!r}; "
            f"{name} declares {', '.join(declared) or 'no arguments'}."
        )
    args = _coerce(args, tool.parameters, tool.parameters, 0)
    error = jsonschema.exceptions.best_match(_validator(_canonical(tool.parameters)).iter_errors(args))
    if error is not None:
        pointer = "/" + "/".join(str(p) for p in error.absolute_path)
        raise ToolCallError(
            f"call {index} at offset {offset} ({name}): arguments at {pointer} "
            f"do not match the schema: {error.message}"
        )
    undeclared = _undeclared_key(args, tool.parameters, _validator(_canonical(tool.parameters)), "", 0)
    if undeclared is not None:
        pointer, key, declared_keys = undeclared
        raise ToolCallError(
            f"call {index} at offset {offset} ({name}): the object at {pointer} has the undeclared "
            f"key {key!r}; it declares {', '.join(map(repr, declared_keys)) or 'no keys'} (an object "
            'with "properties" takes no other keys unless its "additionalProperties" allows them).'
        )
    return ToolCall(name, args)


def _undeclared_key(value: Any, schema: Any, validator: jsonschema.Draft202012Validator, pointer: str,
                    depth: int) -> tuple[str, str, list[str]] | None:
    """The first key of ``value`` (valid for ``schema`` as JSON Schema reads it) that a closed
    object does not declare: (its object's pointer, the key, the declared keys), or None.

    The grammars' reading (merge.additional_properties): an object with ``properties``
    and no ``additionalProperties`` takes its declared keys only, after ``$ref`` and
    ``allOf`` are merged; of anyOf/oneOf members, one the value matches must agree.
    """
    if depth > 64 or not isinstance(value, (dict, list)) or not isinstance(schema, dict):
        return None
    try:
        schema, _ = flatten(schema, validator.schema)
    except MergeError:
        return None
    if not isinstance(schema, dict) or "enum" in schema or "const" in schema:
        return None
    for keyword in ("anyOf", "oneOf"):
        members = schema.get(keyword)
        if not isinstance(members, list):
            continue
        base = {k: v for k, v in schema.items() if k != keyword and k not in ANNOTATIONS}
        first = None
        for member in members:
            member = {"allOf": [base, member]} if base else member
            if not validator.evolve(schema=member).is_valid(value):
                continue
            found = _undeclared_key(value, member, validator, pointer, depth + 1)
            if found is None:
                return None
            first = first or found
        return first
    if isinstance(value, list):
        items = schema.get("items")
        for i, item in enumerate(value):
            found = _undeclared_key(item, items, validator, f"{pointer}/{i}", depth + 1)
            if found:
                return found
        return None
    props = declared_members(schema)
    extra = additional_properties(schema)
    for key, item in value.items():
        if key not in props and extra is False:
            return pointer or "/", key, list(props)
        found = _undeclared_key(item, props.get(key, extra), validator,
                                f"{pointer}/{key.replace('~', '~0').replace('/', '~1')}", depth + 1)
        if found:
            return found
    return None


def _canonical(schema: dict) -> str:
    return json.dumps(schema, sort_keys=True)


@lru_cache(maxsize=1024)
def _declared(schema_json: str) -> tuple[str, ...]:
    try:
        return tuple(declared_arguments(json.loads(schema_json)))
    except MergeError:
        return ()  # not compilable either: load_tools refuses such a tool


@lru_cache(maxsize=1024)
def _validator(schema_json: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(schema_json))


def _coerce(value: Any, schema: Any, root: dict, depth: int) -> Any:
    """Lossless coercions the schema allows: an int where only a number is expected -> float."""
    if not isinstance(schema, dict) or depth > 32:
        return value
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target = _resolve(root, ref)
        if target is not None:
            return _coerce(value, target, root, depth + 1)
    t = schema.get("type")
    types = t if isinstance(t, list) else [t]
    if (isinstance(value, int) and not isinstance(value, bool)
            and "number" in types and "integer" not in types):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        return {k: _coerce(v, props.get(k, extra), root, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_coerce(v, schema.get("items"), root, depth + 1) for v in value]
    return value


def _resolve(root: dict, ref: str) -> Any:
    node: Any = root
    for part in ref[1:].split("/")[1:] if ref.startswith("#/") else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


# -- streaming -----------------------------------------------------------------

class CallStreamParser:
    """Turns streamed model text into calls as soon as each one is complete.

    ``feed(delta)`` returns the calls that became complete with this delta
    (validated); ``close()`` checks the whole answer and returns the rest.
    ``pending_name`` is the name of the call being written, once known.
    """

    def __init__(self, tools: Iterable[Any], syntax: str = "python"):
        check_syntax(syntax)
        self.tools = as_tools(tools)
        self.syntax = syntax
        self._by_name = {t.name: t for t in self.tools}
        self._buf = ""
        self._mode: str | None = None  # None: undecided, "calls", "text"
        self._start = 0                # where the call list body starts in _buf
        self._scan = 0                 # next character to scan
        self._depth = 0
        self._quote = ""
        self._escape = False
        self._call_start: int | None = None
        self._emitted: list[ToolCall] = []

    @property
    def is_text(self) -> bool:
        return self._mode == "text"

    @property
    def pending_name(self) -> str | None:
        if self._call_start is None:
            return None
        part = self._buf[self._call_start:]
        if self.syntax == "json":
            m = re.match(r'\{\s*"name"\s*:\s*"([^"\\]*)"', part)
        else:
            m = re.match(r"\s*(" + CALL_NAME.pattern + r")\s*\(", part)
        return m.group(1) if m else None

    def feed(self, delta: str) -> list[ToolCall]:
        self._buf += delta
        if self._mode is None:
            self._decide()
        if self._mode != "calls":
            return []
        return self._advance()

    def close(self) -> list[ToolCall]:
        calls = parse_calls(self._buf, self.tools, self.syntax)
        return calls[len(self._emitted):]

    def _decide(self) -> None:
        head = self._buf.lstrip()
        if not head:
            return
        if head.startswith("`"):
            if len(head) < 3 or (head.startswith("```") and "\n" not in head):
                return  # wait for the fence line
            if head.startswith("```"):
                after = head[head.index("\n") + 1:].lstrip()
                if not after:
                    return
                self._mode = "calls" if after.startswith("[") else "text"
                self._start = len(self._buf) - len(after)
                self._scan = self._start
                return
        self._mode = "calls" if head.startswith("[") else "text"
        self._start = len(self._buf) - len(head)
        self._scan = self._start

    def _advance(self) -> list[ToolCall]:
        out: list[ToolCall] = []
        buf = self._buf
        opens, closes = ("[{", "]}") if self.syntax == "json" else ("[({", "])}")
        quotes = '"' if self.syntax == "json" else "'\""
        i = self._scan
        while i < len(buf):
            c = buf[i]
            if self._quote:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == self._quote:
                    self._quote = ""
            elif c in quotes:
                self._quote = c
            elif c in opens:
                self._depth += 1
                if self._depth == 2 and self.syntax == "json":
                    self._call_start = i
            elif c in closes:
                self._depth -= 1
                if self._depth == 1 and self._call_start is not None:
                    out.append(self._complete(self._call_start, i + 1))
                    self._call_start = None
            elif self._depth == 1 and self._call_start is None and c not in " \t\n\r,":
                self._call_start = i  # python: a call starts with its name
            i += 1
        self._scan = i
        return out

    def _complete(self, start: int, end: int) -> ToolCall:
        reader = Reader(self._buf[start:end], self.syntax, start)
        name, args, pos = _read_call(reader)
        if not reader.at_end():
            raise reader.error("the end of the call")
        call = _validated(name, args, self._by_name, len(self._emitted), pos)
        self._emitted.append(call)
        return call
