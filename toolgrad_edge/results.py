"""What a request returns, and how decoded text becomes it: shared by the runtime and its engines.

Engines report ``Usage`` and ``Timings`` in their final record; the runtime
turns the decoded text into a ``CallResult`` with ``result_from_text``. Both
live here, below the engines, so that no engine reaches up into the runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import SchemaError, ToolCallError
from .grammars import CallStreamParser, Tool, ToolCall, parse_calls


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Timings:
    ttft_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0


@dataclass
class CallResult:
    tool_calls: list[ToolCall]
    content: str | None
    raw_text: str
    finish_reason: str  # tool_calls | stop | length | cancelled
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    parse_error: str | None = None
    # forward_passes, forced_tokens, drafted_tokens, accepted_tokens, full_masks,
    # tokens_per_forward, draft_acceptance, grammar_engine, speculative
    stats: dict = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list, repr=False)  # the generated tokens

    def to_dict(self) -> dict:
        out = {
            "tool_calls": [c.to_dict() for c in self.tool_calls],
            "content": self.content,
            "finish_reason": self.finish_reason,
            "usage": asdict(self.usage),
            "timings": asdict(self.timings),
            "stats": dict(self.stats),
        }
        if self.parse_error:
            out["parse_error"] = self.parse_error
        return out


def result_from_text(text: str, tools: list[Tool], grammar_override: bool, constrained: bool,
                     finish: str, syntax: str) -> CallResult:
    """The CallResult for decoded text: validated calls, or the text (with parse_error when it is neither)."""
    if grammar_override or not tools:
        return CallResult([], text, text, finish)
    try:
        calls = parse_calls(text, tools, syntax=syntax)
    except (ToolCallError, SchemaError) as exc:
        if finish == "length":
            # Cut at max_tokens in the middle of a call list: keep the calls that were complete.
            try:
                complete = CallStreamParser(tools, syntax).feed(text)
            except (ToolCallError, SchemaError):
                complete = []
            if complete:
                return CallResult(complete, None, text, finish, parse_error=str(exc))
        # A keyword checked only after generation failed (e.g. a number out of
        # bounds): the text comes back with the reason, as a normal finish.
        return CallResult([], text if text.strip() else None, text, finish, parse_error=str(exc))
    if calls:
        return CallResult(calls, None, text, "tool_calls" if finish == "stop" else finish)
    return CallResult([], text.strip() or None, text, finish)
