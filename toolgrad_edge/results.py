"""What a request returns, and how decoded text becomes it: shared by the runtime and its engines.

Engines report ``Usage`` and ``Timings`` in their final record; the runtime
reads the decoded text with an ``AnswerReader`` into events (``Decoded``,
``TextDelta``, ``CallDone``, ``Final``) and a ``CallResult``. All of it lives
here, below the engines, so that no engine reaches up into the runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import SchemaError, ToolCallError
from .grammars import CallStreamParser, Tool, ToolCall


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


# -- the answer as events ---------------------------------------------------------------------
#
# ToolRuntime.stream yields these, in order: Decoded pieces as the engine decodes them, interleaved with
# TextDelta (the answer's text, as a client shows it) and CallDone (one call, complete and validated), then
# one Final. Every renderer (the OpenAI and Ollama streams, the CLI) only renders them: the answer is
# parsed once, here, and the Final's CallResult is built from that same parse.


@dataclass
class Decoded:
    """A piece of the model's text as decoded (call syntax included): for progress displays and measurements."""

    text: str


@dataclass
class TextDelta:
    """More of a text answer: the pieces join to the final ``CallResult.content``."""

    text: str


@dataclass
class CallDone:
    """A call, complete and validated against its tool's schema: ``index`` counts from 0 in the answer."""

    index: int
    call: ToolCall


@dataclass
class Final:
    """The end of an answer: the CallResult (calls or content, finish reason, usage, timings, stats)."""

    result: CallResult

    @property
    def finish_reason(self) -> str:
        return self.result.finish_reason


Event = Decoded | TextDelta | CallDone | Final


class AnswerReader:
    """Reads one answer as it is decoded and turns it into events, then into its CallResult.

    ``calls``: the answer may be a call list (tools given, no grammar
    override); then a text answer is given out stripped (trailing spaces wait
    for more text), as the CallResult's content is. A call goes out once it
    is complete and valid, so an answer cut by max_tokens gives out exactly
    the complete calls its CallResult keeps.
    """

    def __init__(self, tools: list[Tool], syntax: str, calls: bool):
        self.text = ""
        self._parser = CallStreamParser(tools, syntax) if calls and tools else None
        self._calls: list[ToolCall] = []
        self._error: Exception | None = None  # the call list stopped parsing here
        self._shown = ""  # the answer text given out so far

    def feed(self, piece: str) -> list[Event]:
        self.text += piece
        out: list[Event] = [Decoded(piece)]
        parser = self._parser
        if parser is None:
            return out + self._text(self.text)
        if self._error is None:
            try:
                done = parser.feed(piece)
            except (ToolCallError, SchemaError) as exc:
                self._error, done = exc, []
            if parser.is_text:
                return out + self._text(self.text.strip())
            for call in done:
                out.append(CallDone(len(self._calls), call))
                self._calls.append(call)
        return out

    def finish(self, finish: str) -> tuple[list[Event], CallResult]:
        """The events still due (calls or text the whole answer shows), and the answer's CallResult."""
        result = self._result(finish)
        out: list[Event] = [CallDone(i, call) for i, call in enumerate(result.tool_calls) if i >= len(self._calls)]
        if not result.tool_calls:
            out += self._text(result.content or "")
        return out, result

    def _text(self, ready: str) -> list[Event]:
        if not ready.startswith(self._shown) or len(ready) == len(self._shown):
            return []
        piece, self._shown = ready[len(self._shown):], ready
        return [TextDelta(piece)]

    def _result(self, finish: str) -> CallResult:
        text, parser = self.text, self._parser
        if parser is None:
            return CallResult([], text, text, finish)
        error = self._error
        calls: list[ToolCall] = []
        if error is None:
            try:
                calls = self._calls + parser.close()
            except (ToolCallError, SchemaError) as exc:
                error = exc
        if error is not None:
            if finish == "cancelled" or (finish == "length" and self._error is None and self._calls):
                # Cut in the middle of a call list (max_tokens, or a stop: the client left, the server
                # shuts down): keep the calls that were complete; a call half written is no answer.
                kept = list(self._calls) if self._error is None else []
                return CallResult(kept, None, text, finish, parse_error=str(error))
            # A keyword checked only after generation failed (e.g. a number out of
            # bounds): the text comes back with the reason, as a normal finish.
            return CallResult([], text if text.strip() else None, text, finish, parse_error=str(error))
        if calls:
            return CallResult(calls, None, text, "tool_calls" if finish == "stop" else finish)
        return CallResult([], text.strip() or None, text, finish)


def result_from_text(text: str, tools: list[Tool], grammar_override: bool, constrained: bool,
                     finish: str, syntax: str) -> CallResult:
    """The CallResult for decoded text: validated calls, or the text (with parse_error when it is neither)."""
    reader = AnswerReader(tools, syntax, calls=not grammar_override)
    reader.feed(text)
    return reader.finish(finish)[1]
