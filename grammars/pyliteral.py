"""Literal values in the two call syntaxes: a reader with positions, and writers.

The reader never evaluates anything: it recognises Python literals (strings
in either quote with escapes, ints, floats, True/False/None, lists, tuples,
dicts) or JSON values, and builds plain JSON-compatible Python values.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..errors import ToolCallError

_NUMBER = re.compile(r"[-+]?(?:\d[\d_]*)?(?:\.\d[\d_]*|\.)?(?:[eE][-+]?\d+)?")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_PY_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t",
               "b": "\b", "f": "\f", "v": "\v", "a": "\a", "\n": ""}
_JSON_ESCAPES = {"\\": "\\", '"': '"', "/": "/", "n": "\n", "r": "\r", "t": "\t",
                 "b": "\b", "f": "\f"}
_PY_WORDS = {"True": True, "False": False, "None": None,
             # JSON spellings, for unconstrained models that mix the two
             "true": True, "false": False, "null": None}
_JSON_WORDS = {"true": True, "false": False, "null": None}


class Reader:
    """A cursor over model text that reads literals and reports positions."""

    def __init__(self, text: str, syntax: str = "python", offset: int = 0):
        self.text = text
        self.pos = 0
        self.json = syntax == "json"
        self.offset = offset  # where ``text`` starts in the caller's text, for messages

    # -- positions and errors -------------------------------------------------
    def error(self, expected: str, pos: int | None = None) -> ToolCallError:
        pos = self.pos if pos is None else pos
        found = self.text[pos:pos + 20]
        found = repr(found) if found else "the end of the text"
        absolute = self.offset + pos
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return ToolCallError(
            f"expected {expected} at offset {absolute} (line {line}, column {col}), found {found}."
        )

    def skip_ws(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos] in " \t\n\r":
            pos += 1
        self.pos = pos

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        self.skip_ws()
        if self.peek() != char:
            raise self.error(repr(char))
        self.pos += 1

    def at_end(self) -> bool:
        self.skip_ws()
        return self.pos >= len(self.text)

    # -- values ---------------------------------------------------------------
    def value(self, depth: int = 0) -> Any:
        if depth > 64:
            raise self.error("a value nested at most 64 levels deep")
        self.skip_ws()
        c = self.peek()
        if c == '"' or (c == "'" and not self.json):
            return self.string()
        if c == "[":
            return self.sequence("[", "]", depth)
        if c == "(" and not self.json:
            return self.sequence("(", ")", depth)
        if c == "{":
            return self.mapping(depth)
        if c and (c.isdigit() or c in "-+."):
            return self.number()
        match = _WORD.match(self.text, self.pos)
        words = _JSON_WORDS if self.json else _PY_WORDS
        if match and match.group() in words:
            self.pos = match.end()
            return words[match.group()]
        raise self.error("a value (string, number, list, dict, "
                         + ("true, false or null)" if self.json else "True, False or None)"))

    def string(self) -> str:
        text = self.text
        quote = text[self.pos]
        start = self.pos
        self.pos += 1
        out: list[str] = []
        escapes = _JSON_ESCAPES if self.json else _PY_ESCAPES
        while True:
            end = self.pos
            while end < len(text) and text[end] not in (quote, "\\", "\n"):
                end += 1
            out.append(text[self.pos:end])
            self.pos = end
            if end >= len(text) or text[end] == "\n":
                raise self.error(f"a closing {quote} for the string opened at offset "
                                 f"{self.offset + start}")
            if text[end] == quote:
                self.pos = end + 1
                break
            # a backslash escape
            esc = text[end + 1:end + 2]
            self.pos = end + 2
            if esc in escapes:
                out.append(escapes[esc])
            elif esc == "u":
                code = self._hex(4)
                if 0xD800 <= code < 0xDC00 and text.startswith("\\u", self.pos):
                    save = self.pos
                    self.pos += 2
                    low = self._hex(4)
                    if 0xDC00 <= low < 0xE000:
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    else:
                        self.pos = save
                if 0xD800 <= code < 0xE000:
                    raise self.error("a \\u escape that is not a lone surrogate", end)
                out.append(chr(code))
            elif esc in ("x", "U") and not self.json:
                code = self._hex(2 if esc == "x" else 8)
                if code > 0x10FFFF or 0xD800 <= code < 0xE000:
                    raise self.error("a valid code point", end)
                out.append(chr(code))
            elif self.json or not esc:
                raise self.error("a valid escape sequence", end)
            else:
                out.append("\\" + esc)  # Python keeps unknown escapes as written
        return "".join(out)

    def _hex(self, n: int) -> int:
        digits = self.text[self.pos:self.pos + n]
        if len(digits) != n or any(c not in "0123456789abcdefABCDEF" for c in digits):
            raise self.error(f"{n} hex digits")
        self.pos += n
        return int(digits, 16)

    def number(self) -> int | float:
        pattern = _JSON_NUMBER if self.json else _NUMBER
        match = pattern.match(self.text, self.pos)
        token = match.group() if match else ""
        if not any(c.isdigit() for c in token):
            raise self.error("a number")
        # a word character right after the number (1abc, 0x10) is not a number
        if match.end() < len(self.text) and (self.text[match.end()].isalnum()
                                             or self.text[match.end()] == "_"):
            raise self.error("a number", match.end())
        self.pos = match.end()
        if any(c in token for c in ".eE"):
            value = float(token.replace("_", ""))
            if not math.isfinite(value):
                raise self.error("a finite number", match.start())
            return value
        return int(token.replace("_", ""))

    def sequence(self, open_: str, close: str, depth: int) -> list:
        start = self.pos
        self.pos += 1
        items: list = []
        while True:
            self.skip_ws()
            if self.peek() == close:
                self.pos += 1
                return items
            if items:
                if self.peek() != ",":
                    raise self.error(f"',' or {close!r} in the list opened at offset "
                                     f"{self.offset + start}")
                self.pos += 1
                self.skip_ws()
                if self.peek() == close and not self.json:  # trailing comma
                    self.pos += 1
                    return items
            items.append(self.value(depth + 1))

    def mapping(self, depth: int) -> dict:
        start = self.pos
        self.pos += 1
        out: dict = {}
        first = True
        while True:
            self.skip_ws()
            if self.peek() == "}":
                self.pos += 1
                return out
            if not first:
                if self.peek() != ",":
                    raise self.error(f"',' or '}}' in the dict opened at offset {self.offset + start}")
                self.pos += 1
                self.skip_ws()
                if self.peek() == "}" and not self.json:
                    self.pos += 1
                    return out
            first = False
            if self.peek() not in ("'", '"') or (self.json and self.peek() != '"'):
                raise self.error("a string key")
            key_at = self.pos
            key = self.string()
            if key in out:
                # A grammar cannot stop an undeclared key from coming back (docs/grammars.md):
                # refused here, never returned with one of the values dropped.
                raise self.error(f"no second value for the key {key!r} in the dict opened at offset "
                                 f"{self.offset + start}", key_at)
            self.expect(":")
            out[key] = self.value(depth + 1)


# -- writers -------------------------------------------------------------------

def py_quote(s: str, quote: str = "'") -> str:
    """``s`` as a Python string literal in the given quote, escaped as repr() does."""
    out = [quote]
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == quote:
            out.append("\\" + quote)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    out.append(quote)
    return "".join(out)


def py_string_forms(s: str) -> list[str]:
    """The spellings of ``s`` a model is expected to write: repr() first, then the other quote."""
    first = repr(s)
    other = py_quote(s, '"' if first.startswith("'") else "'")
    return [first] if other == first else [first, other]


def render_value(value: Any, syntax: str = "python") -> str:
    """The canonical text of a JSON value: Python literal (repr style) or JSON."""
    if syntax == "json":
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return "None"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolCallError(f"cannot write the non-finite number {value!r} as a literal.")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{repr(str(k))}: {render_value(v)}" for k, v in value.items()) + "}"
    raise ToolCallError(f"cannot write a value of type {type(value).__name__} as a literal.")
