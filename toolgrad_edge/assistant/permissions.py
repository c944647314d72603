"""Who may run which call: read-only tools freely, the others only when the user says yes.

Order of the rules, first match wins:

1. ``deny``: a tool named by ``--deny`` never runs.
2. ``allow``: a tool named by ``--allow`` (or answered "always" earlier) runs.
3. A read-only tool (MCP ``readOnlyHint``, ``read_only=True`` on a Python tool) runs.
4. ``yes`` (``--yes``) runs everything else.
5. Otherwise the user is asked ``[y]es / [n]o / [a]lways for this tool``; with no
   one to ask (stdin is not a terminal) the call is refused.

A refused call does not stop the turn: it becomes a tool result saying the
user refused, so the model can answer without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..grammars import ToolCall
from .toolbox import ToolEntry

# confirm(entry, call) -> "y", "n" or "a"
Confirm = Callable[[ToolEntry, ToolCall], str]

REFUSED = "The user refused to run this call."
NOT_ASKED = ("Not run: this call needs the user's confirmation and there is no terminal to ask "
             "(run with --yes, or --allow {name}).")


@dataclass
class Decision:
    approved: bool
    reason: str  # why: deny, allow, always, read-only, yes, user, no-terminal


@dataclass
class Permissions:
    allow: set[str] = field(default_factory=set)
    deny: set[str] = field(default_factory=set)
    yes: bool = False
    confirm: Confirm | None = None  # None: no one to ask

    @classmethod
    def of(cls, allow: Iterable[str] = (), deny: Iterable[str] = (), yes: bool = False,
           confirm: Confirm | None = None) -> "Permissions":
        return cls(set(allow), set(deny), yes, confirm)

    def _named(self, names: set[str], entry: ToolEntry) -> bool:
        return entry.name in names or entry.original_name in names

    def decide(self, entry: ToolEntry, call: ToolCall) -> Decision:
        if self._named(self.deny, entry):
            return Decision(False, "deny")
        if self._named(self.allow, entry):
            return Decision(True, "allow")
        if entry.read_only:
            return Decision(True, "read-only")
        if self.yes:
            return Decision(True, "yes")
        if self.confirm is None:
            return Decision(False, "no-terminal")
        answer = (self.confirm(entry, call) or "n").strip().lower()[:1]
        if answer == "a":
            self.allow.add(entry.name)
            return Decision(True, "always")
        return Decision(answer == "y", "user")

    @staticmethod
    def refusal_text(decision: Decision, entry: ToolEntry) -> str:
        if decision.reason == "no-terminal":
            return NOT_ASKED.format(name=entry.name)
        if decision.reason == "deny":
            return f"The user does not allow {entry.name} (--deny); it was not run."
        return REFUSED
