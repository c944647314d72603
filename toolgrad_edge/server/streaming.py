"""Runtime results in OpenAI's chat-completion shapes, whole or as SSE chunks.

Streaming tool calls: the model writes a call list (``[get_weather(city='Paris')]``
in ToolGrad's python syntax, or the JSON syntax), while OpenAI clients expect
``delta.tool_calls`` with a call's name first and then fragments of its
arguments as JSON text. ``grammars.CallStreamParser`` follows the call list
as it is decoded. A call is sent once it is complete (its closing bracket
written and its arguments validated): its name first, then its arguments as
JSON text cut after each argument. A call is never announced before its
arguments are known, so a call list cut by ``max_tokens`` streams exactly the
complete calls that the non-streamed reply keeps, and a client never
reassembles a call without arguments. The parser validates exactly as
``parse_calls`` does, so the streamed calls reassemble to the non-streamed
ones. The runtime's final ``CallResult`` stays the truth: at the end,
whatever was not streamed yet is sent from it.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any, Iterable

log = logging.getLogger("toolgrad_edge.server")

FINISH_REASONS = ("tool_calls", "stop", "length")


def new_completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def arguments_json(arguments: dict[str, Any]) -> str:
    """A call's arguments as OpenAI's ``function.arguments`` string."""
    return json.dumps(arguments, ensure_ascii=False)


def arguments_fragments(arguments: dict[str, Any]) -> list[str]:
    """``arguments_json`` cut after each top-level argument; the pieces join back to it exactly."""
    if not arguments:
        return ["{}"]
    pieces = []
    for i, (key, value) in enumerate(arguments.items()):
        lead = "{" if i == 0 else ", "
        pieces.append(f"{lead}{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}")
    pieces[-1] += "}"
    return pieces


def finish_reason(result: Any) -> str:
    reason = getattr(result, "finish_reason", None) or "stop"
    if reason == "tool_calls" or getattr(result, "tool_calls", None):
        # OpenAI says tool_calls whenever calls are returned, even when the runtime
        # stopped on the grammar's end rather than an end-of-turn token.
        return "tool_calls" if reason != "length" else "length"
    return reason if reason in FINISH_REASONS else "stop"


def choice_extras(result: Any) -> dict[str, Any]:
    """Fields beside ``finish_reason`` in a choice: ``parse_error`` when the model's text is not a valid call list.

    The runtime returns such a result (text as content) when a call failed a
    check made after generation (a keyword the grammar does not enforce), or
    when ``max_tokens`` cut a call list (then with the complete calls). It sits
    on the choice, not the message, so a client that appends the message to
    its history sends back nothing this server refuses.
    """
    error = getattr(result, "parse_error", None)
    return {"parse_error": str(error)} if error else {}


def usage_body(result: Any) -> dict[str, Any]:
    usage = getattr(result, "usage", None)
    prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion = int(getattr(usage, "completion_tokens", 0) or 0)
    cached = int(getattr(usage, "cached_tokens", 0) or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def completion_body(result: Any, *, completion_id: str, created: int, model: str) -> dict[str, Any]:
    """A whole (non-streamed) chat.completion object."""
    calls = [
        {"id": new_call_id(), "type": "function",
         "function": {"name": call.name, "arguments": arguments_json(call.arguments)}}
        for call in result.tool_calls
    ]
    message: dict[str, Any] = {"role": "assistant", "content": None if calls else (result.content or "")}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(result),
                     **choice_extras(result)}],
        "usage": usage_body(result),
    }


class ChunkStream:
    """Turns the runtime's text deltas and final result into chat.completion.chunk objects."""

    def __init__(
        self,
        *,
        completion_id: str,
        model: str,
        tools: list[dict[str, Any]],
        syntax: str,
        text_only: bool,
        strip_text: bool,
        include_usage: bool = False,
    ) -> None:
        """``text_only``: the answer is text (tool_choice none, response_format).
        ``strip_text``: the runtime strips a text answer (it does when tools were given)."""
        self.completion_id = completion_id
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.strip_text = strip_text
        self._parser = None if text_only or not tools else _call_parser(tools, syntax)
        self._text = ""        # everything decoded so far
        self._sent_text = ""   # the part of the text answer already sent
        self._calls: list[dict[str, Any]] = []  # per index: id, name, arguments (as sent)

    # -- chunks -------------------------------------------------------------

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self._text += delta
        parser = self._parser
        if parser is None:
            return self._text_chunks()
        out: list[dict[str, Any]] = []
        try:
            completed = parser.feed(delta)
        except Exception as exc:  # the final result will say what the answer was
            log.debug("streamed call list did not parse (%s); waiting for the final result", exc)
            self._parser = None
            return out
        if parser.is_text:
            self._parser = None
            return self._text_chunks()
        for call in completed:
            index = len(self._calls)
            out.append(self._name_chunk(index, call.name))
            out.extend(self._argument_chunks(index, call.arguments))
        return out

    def finish(self, result: Any) -> list[dict[str, Any]]:
        """The remaining deltas, reconciled with the final result, then the finishing chunk(s)."""
        out: list[dict[str, Any]] = []
        calls = list(getattr(result, "tool_calls", None) or [])
        for index, call in enumerate(calls):
            if index >= len(self._calls):
                out.append(self._name_chunk(index, call.name))
            elif self._calls[index]["name"] != call.name:
                log.warning("streamed call %d as %r but the final result says %r",
                            index, self._calls[index]["name"], call.name)
            sent = self._calls[index]["arguments"]
            if sent is None:
                out.extend(self._argument_chunks(index, call.arguments))
            elif sent != arguments_json(call.arguments):
                log.warning("streamed arguments of call %d differ from the final result", index)
        if not calls:
            content = getattr(result, "content", None) or ""
            if content.startswith(self._sent_text):
                if len(content) > len(self._sent_text):
                    out.append(self._chunk({"content": content[len(self._sent_text):]}))
                self._sent_text = content
            else:
                log.warning("streamed text differs from the final answer; sending the answer's remainder only")
        last = self._chunk({}, finish_reason(result))
        last["choices"][0].update(choice_extras(result))
        out.append(last)
        if self.include_usage:
            usage_chunk = self._chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = usage_body(result)
            out.append(usage_chunk)
        return out

    # -- pieces -------------------------------------------------------------

    def _text_chunks(self) -> list[dict[str, Any]]:
        # A stripped answer loses its outer spaces: hold trailing ones back until more text comes.
        ready = self._text.strip() if self.strip_text else self._text
        if not ready.startswith(self._sent_text) or len(ready) == len(self._sent_text):
            return []
        piece = ready[len(self._sent_text):]
        self._sent_text = ready
        return [self._chunk({"content": piece})]

    def _name_chunk(self, index: int, name: str) -> dict[str, Any]:
        self._calls.append({"id": new_call_id(), "name": name, "arguments": None})
        call = {"index": index, "id": self._calls[index]["id"], "type": "function",
                "function": {"name": name, "arguments": ""}}
        return self._chunk({"tool_calls": [call]})

    def _argument_chunks(self, index: int, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        self._calls[index]["arguments"] = arguments_json(arguments)
        return [
            self._chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            for piece in arguments_fragments(arguments)
        ]


def _call_parser(tools: list[dict[str, Any]], syntax: str):
    from ..grammars import CallStreamParser

    return CallStreamParser(tools, syntax)


def sse(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_lines(chunks: Iterable[dict[str, Any]]) -> str:
    return "".join(sse(c) for c in chunks)
