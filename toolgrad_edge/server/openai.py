"""OpenAI's chat-completions API: its requests become a ``RequestPlan``, the runtime's events become its objects.

Pydantic models describe the shape (unknown fields and wrong types are
refused); ``parse_chat_request`` then checks what a shape cannot say
(tool_choice against the tools, tool results against earlier calls, the
fields this server does not support), with the checks both APIs share in
``plan``. Every refusal is an ``APIError`` naming the field.

Answers: ``completion_body`` is a whole chat.completion; ``OpenAIStream``
renders the runtime's events as chat.completion.chunk objects. A call goes
out once the runtime has it complete and validated (``CallDone``): its name
first, then its arguments as JSON text cut after each argument, so a client
never reassembles a call without arguments, and a call list cut by
``max_tokens`` streams exactly the calls the non-streamed reply keeps.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, model_validator

from ..results import CallDone, Final, TextDelta
from . import plan as shared
from .errors import APIError
from .plan import RequestPlan, Seed, StrictModel, ToolDef, json_value_problem, new_call_id
from .settings import ServerSettings

MAX_STOP_SEQUENCES = 4  # as in OpenAI's API
FINISH_REASONS = ("tool_calls", "stop", "length")


_Model = StrictModel


class ContentPart(_Model):
    type: Literal["text"]
    text: str


Content = Union[str, list[ContentPart]]


def _object_from_json_text(value: Any) -> dict[str, Any]:
    """OpenAI sends a call's arguments as a JSON object in a string: read it once, here."""
    if not isinstance(value, str):
        raise ValueError(f"function.arguments must be a JSON object as a string, got {type(value).__name__}")
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"function.arguments must be a JSON object as a string; it is not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"function.arguments must be a JSON object as a string, got JSON {type(parsed).__name__}")
    problem = json_value_problem(parsed)
    if problem is not None:
        where, what = problem
        raise ValueError(f"function.arguments{where} {what}")
    return parsed


class FunctionCallIn(_Model):
    name: str
    arguments: Annotated[dict[str, Any], BeforeValidator(_object_from_json_text)]  # the runtime renders the object


class ToolCallIn(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class SystemMessage(_Model):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(_Model):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCallIn] | None = None
    name: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _says_something(self) -> "AssistantMessage":
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Model):
    role: Literal["tool"]
    content: Content
    tool_call_id: str
    name: str | None = None


Message = Annotated[
    Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage],
    Field(discriminator="role"),
]


class FunctionName(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Model):
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object with name and schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema is only allowed with type 'json_schema', not {self.type!r}")
        return self


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    model: str | None = None
    messages: list[Message]
    tools: list[ToolDef] | None = None
    tool_choice: Union[Literal["auto", "none", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: Seed = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # Sent by some clients with their neutral values; anything else is refused.
    n: int | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None


def parse_chat_request(body: bytes, settings: ServerSettings) -> RequestPlan:
    """Raw request body -> RequestPlan, or an APIError saying what is wrong and where.

    The call grammar is compiled after this, by the runtime's engine (``plan.compile_tools``).
    """
    req = shared.validated(ChatCompletionRequest, body, settings)
    if not req.messages:
        raise APIError(400, "messages is empty; send at least one message", param="messages")
    tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
    shared.check_message_count(len(req.messages), settings)
    _check_unsupported(req)
    shared.check_tool_count(len(tools), settings)
    schemas = shared.tool_schemas(tools)
    messages = _runtime_messages(req.messages)
    tool_choice = _tool_choice(req, schemas, shared.default_tool_choice(settings, messages, bool(schemas)))
    name, value = ("max_completion_tokens", req.max_completion_tokens)  # OpenAI's newer name wins
    if value is None:
        name, value = ("max_tokens", req.max_tokens)
    budget = shared.max_tokens(value, name, settings)
    stops = shared.stop_strings([req.stop] if isinstance(req.stop, str) else req.stop, MAX_STOP_SEQUENCES, "stop")
    grammar, json_schema = _response_format(req, tool_choice, bool(tools))
    return RequestPlan(
        messages=messages,
        tools=[{"type": "function", "function": t} for t in tools],
        tool_choice=tool_choice,
        parallel=True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        max_tokens=budget,
        temperature=0.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        seed=shared.seed(req.seed),
        stop=stops,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        grammar=grammar,
        json_schema=json_schema,
        tool_schemas=schemas,
        model=req.model,
    )


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.n not in (None, 1):
        raise APIError(400, f"n={req.n} is not supported; this server returns one choice (n=1)", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, name)
        if value not in (None, 0, 0.0):
            raise APIError(400, f"{name}={value} is not supported; leave it out or send 0", param=name)
    if req.logprobs:
        raise APIError(400, "logprobs are not supported; leave the field out or send false", param="logprobs")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")


def _tool_choice(req: ChatCompletionRequest, tool_schemas: dict[str, dict[str, Any]], default: str) -> str:
    """The request's tool choice; ``default`` (from serve --tool-choice) when it names none."""
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if not tool_schemas:
            raise APIError(400, f"tool_choice names {name!r} but the request has no tools", param="tool_choice")
        if name not in tool_schemas:
            known = ", ".join(sorted(tool_schemas))
            raise APIError(
                400, f"tool_choice names {name!r}, which is not among the request's tools ({known})",
                param="tool_choice", code="unknown_tool",
            )
        return name
    if choice is None:
        return default
    if choice != "none" and not tool_schemas:
        raise APIError(
            400, f"tool_choice {choice!r} needs tools; send tools or use tool_choice 'none'", param="tool_choice"
        )
    return choice


def _response_format(req: ChatCompletionRequest, tool_choice: str, has_tools: bool) -> tuple[str | None, dict | None]:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None, None
    if has_tools and tool_choice != "none":
        # One grammar constrains one answer: JSON text, or tool calls, not both.
        raise APIError(
            400, f"response_format {fmt.type!r} cannot be combined with tool calls; "
            "send tool_choice 'none' or leave response_format out",
            param="response_format",
        )
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else {"type": "object"}
    return shared.json_format(schema, "response_format"), (schema if fmt.type == "json_schema" else None)


def _runtime_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Pydantic messages -> the plain OpenAI dicts the runtime renders; tool results must answer a call."""
    out: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        item: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        if m.content is not None:
            item["content"] = _text(m.content)
        if isinstance(m, AssistantMessage) and m.tool_calls:
            item["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            call_ids.update(c.id for c in m.tool_calls)
        if isinstance(m, ToolMessage):
            if m.tool_call_id not in call_ids:
                raise APIError(
                    400, f"messages[{i}] is a tool result for tool_call_id {m.tool_call_id!r}, "
                    "but no earlier assistant message has a tool call with that id",
                    param=f"messages[{i}].tool_call_id",
                )
            item["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                item["name"] = m.name
        out.append(item)
    shared.check_turn_order(out)
    return out


def _text(content: Content) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)




# -- answers ---------------------------------------------------------------------------------


def new_completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


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


class OpenAIStream:
    """Renders the runtime's events as chat.completion.chunk objects, sent as server-sent events."""

    media_type = "text/event-stream"

    def __init__(self, *, completion_id: str, model: str, include_usage: bool = False) -> None:
        self.completion_id = completion_id
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

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

    def render(self, event: Any) -> list[dict[str, Any]]:
        """The chunks for one event (none for the model's raw text: its calls and text come as their own events)."""
        if isinstance(event, TextDelta):
            return [self._chunk({"content": event.text})]
        if isinstance(event, CallDone):
            head = {"index": event.index, "id": new_call_id(), "type": "function",
                    "function": {"name": event.call.name, "arguments": ""}}
            return [self._chunk({"tool_calls": [head]})] + [
                self._chunk({"tool_calls": [{"index": event.index, "function": {"arguments": piece}}]})
                for piece in arguments_fragments(event.call.arguments)]
        if isinstance(event, Final):
            last = self._chunk({}, finish_reason(event.result))
            last["choices"][0].update(choice_extras(event.result))
            if not self.include_usage:
                return [last]
            usage_chunk = self._chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = usage_body(event.result)
            return [last, usage_chunk]
        return []

    def error(self, err: APIError) -> dict[str, Any]:
        # Headers are gone already: the error travels as an event, as OpenAI does.
        return err.openai_body()

    @staticmethod
    def line(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def end(self) -> list[str]:
        return [SSE_DONE]


SSE_DONE = "data: [DONE]\n\n"
