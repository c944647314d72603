"""A small GBNF reader for tests: does a grammar accept a text, and random texts it accepts.

It reads the subset of GBNF that grammars/gbnf.py writes (one rule per line;
literals, character classes, rule names, groups, ``? * + {m} {m,} {m,n}``)
and works on Unicode characters, as llama.cpp's grammar engine does. Tests
cross-check it against llama.cpp where llama-cpp-python is installed.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

# Characters tried for negated classes ([^...]): ASCII, quotes and escapes,
# Unicode whitespace, accents, CJK, an emoji, a non-character-ish control.
POOL = ([chr(c) for c in range(0x20, 0x7F)]
        + list("\t\n\r\x0b\x0c\x1c\x7f\x85\xa0\u1680\u2003\u2028\u2029\u3000")
        + list("éßø中文\u00e9\U0001F600\uFFFD\u200b"))


class Grammar:
    def __init__(self, text: str):
        self.rules: dict[str, tuple] = {}
        for line in text.splitlines():
            if not line.strip():
                continue
            name, body = line.split(" ::= ", 1)
            self.rules[name.strip()] = _Parser(body).parse()
        self._shortest: dict[str, int] = {}
        self._compute_shortest()

    # -- recognising ----------------------------------------------------------
    def accepts(self, text: str, rule: str = "root") -> bool:
        memo: dict[tuple[str, int], frozenset[int]] = {}
        return len(text) in self._ends(("ref", rule), text, 0, memo)

    def _ends(self, node: tuple, text: str, pos: int, memo: dict) -> frozenset[int]:
        kind = node[0]
        if kind == "lit":
            return frozenset([pos + len(node[1])]) if text.startswith(node[1], pos) else frozenset()
        if kind == "cls":
            return frozenset([pos + 1]) if pos < len(text) and _in_class(node, text[pos]) else frozenset()
        if kind == "ref":
            key = (node[1], pos)
            if key not in memo:
                memo[key] = frozenset()  # no left recursion in these grammars
                memo[key] = self._ends(self.rules[node[1]], text, pos, memo)
            return memo[key]
        if kind == "alt":
            out: set[int] = set()
            for alt in node[1]:
                out |= self._ends(alt, text, pos, memo)
            return frozenset(out)
        if kind == "seq":
            current = {pos}
            for item in node[1]:
                nxt: set[int] = set()
                for p in current:
                    nxt |= self._ends(item, text, p, memo)
                current = nxt
                if not current:
                    break
            return frozenset(current)
        _, inner, lo, hi = node
        current = {pos}
        for _ in range(lo):
            nxt = set()
            for p in current:
                nxt |= self._ends(inner, text, p, memo)
            current = nxt
        out = set(current)
        frontier = set(current)
        count = lo
        while frontier and (hi is None or count < hi):
            nxt = set()
            for p in frontier:
                nxt |= self._ends(inner, text, p, memo)
            count += 1
            frontier = nxt - out if hi is None else nxt
            out |= nxt
        return frozenset(out)

    # -- sampling -------------------------------------------------------------
    def sample(self, rng: random.Random, rule: str = "root", budget: int = 400) -> str:
        """A random text the grammar accepts; it keeps to short choices once ``budget`` is spent."""
        out: list[str] = []
        self._sample(("ref", rule), rng, out, [budget])
        return "".join(out)

    def _sample(self, node: tuple, rng: random.Random, out: list[str], budget: list[int]) -> None:
        kind = node[0]
        if kind == "lit":
            out.append(node[1])
            budget[0] -= len(node[1])
        elif kind == "cls":
            out.append(_pick_char(node, rng))
            budget[0] -= 1
        elif kind == "ref":
            self._sample(self.rules[node[1]], rng, out, budget)
        elif kind == "alt":
            alts = node[1]
            if budget[0] <= 0:
                best = min(self._min_len(a) for a in alts)
                alts = [a for a in alts if self._min_len(a) == best]
            self._sample(rng.choice(alts), rng, out, budget)
        elif kind == "seq":
            for item in node[1]:
                self._sample(item, rng, out, budget)
        else:
            _, inner, lo, hi = node
            if budget[0] <= 0:
                n = lo
            else:
                top = lo + 4 if hi is None else min(hi, lo + 4)
                n = rng.choice([lo, lo, rng.randint(lo, top), top] if hi is None or hi > lo else [lo])
            for _ in range(n):
                self._sample(inner, rng, out, budget)

    def _compute_shortest(self) -> None:
        for name in self.rules:
            self._shortest[name] = 10 ** 9
        changed = True
        while changed:
            changed = False
            for name, body in self.rules.items():
                n = self._min_len(body)
                if n < self._shortest[name]:
                    self._shortest[name] = n
                    changed = True

    def _min_len(self, node: tuple) -> int:
        kind = node[0]
        if kind == "lit":
            return len(node[1])
        if kind == "cls":
            return 1
        if kind == "ref":
            return self._shortest.get(node[1], 10 ** 9)
        if kind == "alt":
            return min(self._min_len(a) for a in node[1])
        if kind == "seq":
            return min(10 ** 9, sum(self._min_len(i) for i in node[1]))
        return min(10 ** 9, node[2] * self._min_len(node[1]))


def _in_class(node: tuple, ch: str) -> bool:
    _, negated, ranges = node
    code = ord(ch)
    inside = any(lo <= code <= hi for lo, hi in ranges)
    return inside != negated


def _pick_char(node: tuple, rng: random.Random) -> str:
    _, negated, ranges = node
    if not negated:
        lo, hi = rng.choice(ranges)
        return chr(rng.randint(lo, hi))
    choices = [c for c in POOL if _in_class(node, c)]
    return rng.choice(choices)


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]",
            "^": "^", "-": "-", "/": "/"}


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def parse(self) -> tuple:
        node = self.alternatives()
        self.ws()
        if self.pos != len(self.text):
            raise ValueError(f"unparsed GBNF at {self.pos}: {self.text[self.pos:self.pos + 30]!r}")
        return node

    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def alternatives(self) -> tuple:
        alts = [self.sequence()]
        while True:
            self.ws()
            if self.text.startswith("|", self.pos):
                self.pos += 1
                alts.append(self.sequence())
            else:
                break
        return alts[0] if len(alts) == 1 else ("alt", alts)

    def sequence(self) -> tuple:
        items = []
        while True:
            self.ws()
            if self.pos >= len(self.text) or self.text[self.pos] in "|)":
                break
            items.append(self.postfix(self.atom()))
        return items[0] if len(items) == 1 else ("seq", items)

    def atom(self) -> tuple:
        c = self.text[self.pos]
        if c == '"':
            self.pos += 1
            chars = []
            while self.text[self.pos] != '"':
                chars.append(self.char())
            self.pos += 1
            return ("lit", "".join(chars))
        if c == "[":
            self.pos += 1
            negated = self.text.startswith("^", self.pos)
            if negated:
                self.pos += 1
            ranges = []
            while self.text[self.pos] != "]":
                lo = ord(self.char())
                hi = lo
                if self.text[self.pos] == "-" and self.text[self.pos + 1] != "]":
                    self.pos += 1
                    hi = ord(self.char())
                ranges.append((lo, hi))
            self.pos += 1
            return ("cls", negated, tuple(ranges))
        if c == "(":
            self.pos += 1
            node = self.alternatives()
            self.ws()
            assert self.text[self.pos] == ")", self.text[self.pos:]
            self.pos += 1
            return node
        m = re.compile(r"[A-Za-z0-9-]+").match(self.text, self.pos)
        if not m:
            raise ValueError(f"unexpected GBNF at {self.pos}: {self.text[self.pos:self.pos + 30]!r}")
        self.pos = m.end()
        return ("ref", m.group())

    def char(self) -> str:
        c = self.text[self.pos]
        if c != "\\":
            self.pos += 1
            return c
        e = self.text[self.pos + 1]
        if e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            code = int(self.text[self.pos + 2:self.pos + 2 + n], 16)
            self.pos += 2 + n
            return chr(code)
        self.pos += 2
        return _ESCAPES[e]

    def postfix(self, node: tuple) -> tuple:
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "?":
                node, self.pos = ("rep", node, 0, 1), self.pos + 1
            elif c == "*":
                node, self.pos = ("rep", node, 0, None), self.pos + 1
            elif c == "+":
                node, self.pos = ("rep", node, 1, None), self.pos + 1
            elif c == "{":
                end = self.text.index("}", self.pos)
                spec = self.text[self.pos + 1:end]
                self.pos = end + 1
                if "," in spec:
                    lo, hi = spec.split(",")
                    node = ("rep", node, int(lo), int(hi) if hi else None)
                else:
                    node = ("rep", node, int(spec), int(spec))
            else:
                break
        return node


@lru_cache(maxsize=64)
def load(text: str) -> Grammar:
    return Grammar(text)
