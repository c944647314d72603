"""Text the grammar leaves no choice about, so the runtime can feed it without sampling.

In the python call syntax a tool name is the one place where long forced runs
occur: once the model has written enough of a name to single out one tool
(or there is only one tool to choose), the rest of the name and the opening
parenthesis are fixed. Feeding them in one batch skips a decode step per token.
"""

from __future__ import annotations

from typing import Iterable

from .gbnf import DEFAULT_WHITESPACE

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _name_prefix(text: str) -> str | None:
    """The part of a tool name being written at the end of `text`, or None when not in a name.

    A name starts right after the list's ``[`` or after a top-level ``,`` and
    an optional space. Strings are skipped so brackets inside values do not count.
    """
    depth = 0
    quote = ""
    escaped = False
    start = None  # where the current name began, if we are in one
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
            start = None
        elif ch in "[({":
            depth += 1
            start = i + 1 if (ch == "[" and depth == 1) else None
        elif ch in "])}":
            depth -= 1
            start = None
        elif ch == "," and depth == 1:
            start = i + 1
        elif start is not None and ch == " " and i == start:
            start = i + 1  # the one space allowed after a comma
        elif start is not None and ch not in _NAME_CHARS:
            start = None
    if quote or depth != 1 or start is None:
        return None
    return text[start:]


def forced_name_suffix(text: str, names: Iterable[str], syntax: str = "python",
                       whitespace: str = DEFAULT_WHITESPACE) -> str:
    """The text that must follow `text` when only one tool name still fits ('' when none is forced).

    Returns the rest of that name plus ``(``; right after a comma, in the
    compact layout (the grammars' default, gbnf.LAYOUTS), also the space
    before the name. Only the python syntax is handled; the json syntax returns ''.
    """
    if syntax != "python":
        return ""
    prefix = _name_prefix(text)
    if prefix is None:
        return ""
    space = ""
    if prefix == "" and text.endswith(","):
        if whitespace != "compact":
            return ""  # the space is optional: let the model choose it first
        space = " "
    fits = [n for n in names if n.startswith(prefix)]
    if len(fits) != 1:
        return ""
    return space + fits[0][len(prefix):] + "("
