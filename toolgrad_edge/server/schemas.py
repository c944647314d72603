"""What a chat-completions request may contain, checked before any work.

Pydantic models describe the shape (unknown fields and wrong types are
refused); ``parse_chat_request`` then checks what a shape cannot say (limits,
tool_choice against the tools, tool results against earlier calls) and
returns a ``ChatPlan``: everything the worker needs, in the runtime's terms.
Every refusal is an ``OpenAIError`` with status 400 or 413 naming the field.

The call grammar is compiled here too, by the compiler of the runtime's
grammar engine (``ToolRuntime.grammar_engine``): llguidance's has no limit
on the number of tools (the context is then the limit, checked by the
runtime), GBNF's (llama.cpp's sampler, llama-server) stops at 256.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import SchemaError
from .errors import OpenAIError
from .settings import ServerSettings

MAX_STOP_SEQUENCES = 4  # as in OpenAI's API

# Runtimes whose call grammar is GBNF (tool limit engines.base.GBNF_MAX_TOOLS), by
# ToolRuntime.grammar_engine: what the refusal calls the engine, and what to do
# instead. Any other engine name but "llguidance" is treated as GBNF.
GBNF_ENGINES = {
    "llama": ("llama.cpp's grammar sampler (the llama grammar engine)",
              "use the llguidance grammar engine (the default once installed: "
              "pip install 'toolgrad-edge[llguidance]'), which has no tool limit"),
    "llama-server": ("llama-server (--engine), which takes a GBNF grammar",
                     "serve a local model (no --engine) with the llguidance grammar engine, "
                     "which has no tool limit"),
    None: ("this runtime's GBNF grammar",
           "serve with the llguidance grammar engine, which has no tool limit"),
}

# Seeds: any 64-bit integer, signed or not (clients send -1 for "random"), taken modulo 2**64.
SEED_MIN, SEED_END = -(2**63), 2**64


def check_seed(cls, value: int | None) -> int | None:
    """A pydantic validator for a request's seed (OpenAI's and Ollama's): any 64-bit integer, signed or not."""
    if value is not None and not SEED_MIN <= value < SEED_END:
        raise ValueError("seed must be a 64-bit integer, from -2**63 to 2**64 - 1")
    return value


class _Model(BaseModel):
    # strict: "0.5" is not a number and 1 is not a bool; unknown fields are refused.
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ContentPart(_Model):
    type: Literal["text"]
    text: str


Content = Union[str, list[ContentPart]]


class FunctionCallIn(_Model):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's convention)

    @field_validator("arguments")
    @classmethod
    def _arguments_are_an_object(cls, value: str) -> str:
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
        return value


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


class FunctionDef(_Model):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Model):
    type: Literal["function"]
    function: FunctionDef


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
    seed: int | None = None
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

    _seed_is_64_bit = field_validator("seed")(check_seed)


@dataclass
class ChatPlan:
    """A checked request, in the runtime's terms."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    tool_choice: str                  # "auto" | "none" | "required" | a tool name
    parallel: bool
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] | None
    stream: bool
    include_usage: bool
    grammar: str | None = None        # set by response_format
    json_schema: dict[str, Any] | None = None
    tool_schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: str | None = None

    def runtime_kwargs(self, syntax: str) -> dict[str, Any]:
        """Keyword arguments for ``ToolRuntime.call`` / ``stream``."""
        return {
            "tools": self.tools or None,
            "tool_choice": self.tool_choice,
            "parallel": self.parallel,
            "syntax": syntax,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "grammar": self.grammar,
        }


def parse_chat_request(body: bytes, settings: ServerSettings, grammar_engine: str | None = None) -> ChatPlan:
    """Raw request body -> ChatPlan, or an OpenAIError saying what is wrong and where.

    ``grammar_engine`` is the runtime's (``ToolRuntime.grammar_engine``):
    "llguidance" compiles the tools' Lark grammar (no tool limit); anything
    else, None included, compiles GBNF, as llama.cpp's sampler and llama-server take.
    """
    data = load_json_object(body, settings)
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    return _plan(request, settings, grammar_engine)


def load_json_object(body: bytes, settings: ServerSettings) -> dict[str, Any]:
    """A request body as a JSON object whose every value a prompt can carry, or the 400/413 saying why not."""
    if len(body) > settings.max_body_bytes:
        raise OpenAIError(
            413,
            f"Request body is {len(body)} bytes; the limit is {settings.max_body_bytes} bytes "
            "(serve --max-body-bytes raises it).",
            code="request_too_large",
        )
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise OpenAIError(400, "Request body is nested too deeply to parse", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, f"Request body must be a JSON object, got JSON {_json_kind(data)}", code="invalid_json")
    problem = json_value_problem(data)
    if problem is not None:
        where, what = problem
        param = where.lstrip(".") or "body"
        raise OpenAIError(400, f"Invalid value for {param!r}: it {what}", param=param, code="invalid_value")
    return data


def _plan(req: ChatCompletionRequest, settings: ServerSettings, grammar_engine: str | None) -> ChatPlan:
    if not req.messages:
        raise OpenAIError(400, "messages is empty; send at least one message", param="messages")
    if len(req.messages) > settings.max_messages:
        raise OpenAIError(
            400, f"{len(req.messages)} messages; the limit is {settings.max_messages}",
            param="messages", code="too_many_messages",
        )
    _check_unsupported(req)
    tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
    if len(tools) > settings.max_tools:
        raise OpenAIError(
            400, f"{len(tools)} tools; the limit is {settings.max_tools} (serve --max-tools raises it)",
            param="tools", code="too_many_tools",
        )
    tool_schemas = _load_tools(tools)
    tool_choice = _tool_choice(req, tool_schemas, settings.tool_choice)
    _check_grammar(tools, settings.syntax, tool_choice, req.parallel_tool_calls is not False, grammar_engine)
    max_tokens = _max_tokens(req, settings)
    stop = _stop(req.stop)
    grammar, json_schema = _response_format(req, tool_choice, bool(tools))
    return ChatPlan(
        messages=_runtime_messages(req.messages),
        tools=[{"type": "function", "function": t} for t in tools],
        tool_choice=tool_choice,
        parallel=True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        max_tokens=max_tokens,
        temperature=0.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        seed=None if req.seed is None else req.seed % SEED_END,
        stop=stop,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        grammar=grammar,
        json_schema=json_schema,
        tool_schemas=tool_schemas,
        model=req.model,
    )


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.n not in (None, 1):
        raise OpenAIError(400, f"n={req.n} is not supported; this server returns one choice (n=1)", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, name)
        if value not in (None, 0, 0.0):
            raise OpenAIError(400, f"{name}={value} is not supported; leave it out or send 0", param=name)
    if req.logprobs:
        raise OpenAIError(400, "logprobs are not supported; leave the field out or send false", param="logprobs")
    if req.stream_options is not None and not req.stream:
        raise OpenAIError(400, "stream_options is only allowed with stream: true", param="stream_options")


def _load_tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Compile-check every tool now, so a bad schema is a 400 and never reaches the model."""
    if not tools:
        return {}
    from ..grammars import load_tools

    try:
        load_tools([{"type": "function", "function": t} for t in tools])
    except SchemaError as exc:
        raise OpenAIError(400, f"Invalid tools: {exc}", param="tools", code="invalid_tools") from None
    return {t["name"]: t.get("parameters") or {"type": "object", "properties": {}} for t in tools}


def _check_grammar(tools: list[dict[str, Any]], syntax: str, tool_choice: str, parallel: bool,
                   grammar_engine: str | None) -> None:
    """Compile the call grammar the runtime will use, now (it is cached, so the runtime's own build
    is free): too many tools, or a schema feature the compiler cannot express, is the caller's 400,
    found before queueing."""
    if not tools or tool_choice == "none":
        return
    from ..grammars import build_grammar, build_llg_grammar
    from ..engines.base import GBNF_MAX_TOOLS as MAX_TOOLS

    lark = grammar_engine == "llguidance"
    if not lark and len(tools) > MAX_TOOLS:
        engine, instead = GBNF_ENGINES.get(grammar_engine, GBNF_ENGINES[None])
        raise OpenAIError(
            400, f"{len(tools)} tools; the limit is {MAX_TOOLS} with {engine}. Send only the tools "
            f"relevant to the request, or {instead}.",
            param="tools", code="too_many_tools",
        )
    build = build_llg_grammar if lark else build_grammar
    try:
        build([{"type": "function", "function": t} for t in tools], syntax=syntax,
              tool_choice=tool_choice, parallel=parallel)
    except SchemaError as exc:
        raise OpenAIError(400, f"Invalid tools: {exc}", param="tools", code="invalid_tools") from None


def _tool_choice(req: ChatCompletionRequest, tool_schemas: dict[str, dict[str, Any]], default: str = "auto") -> str:
    """The request's tool choice; ``default`` (serve --tool-choice) when it sends tools and names none."""
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if not tool_schemas:
            raise OpenAIError(400, f"tool_choice names {name!r} but the request has no tools", param="tool_choice")
        if name not in tool_schemas:
            known = ", ".join(sorted(tool_schemas))
            raise OpenAIError(
                400, f"tool_choice names {name!r}, which is not among the request's tools ({known})",
                param="tool_choice", code="unknown_tool",
            )
        return name
    if choice is None:
        return default if tool_schemas else "none"
    if choice != "none" and not tool_schemas:
        raise OpenAIError(
            400, f"tool_choice {choice!r} needs tools; send tools or use tool_choice 'none'", param="tool_choice"
        )
    return choice


def _max_tokens(req: ChatCompletionRequest, settings: ServerSettings) -> int:
    # max_completion_tokens is OpenAI's newer name; it wins when both are sent.
    name, value = ("max_completion_tokens", req.max_completion_tokens)
    if value is None:
        name, value = ("max_tokens", req.max_tokens)
    if value is None:
        return settings.default_max_tokens
    if value > settings.max_tokens_limit:
        raise OpenAIError(
            400, f"{name}={value} is above this server's limit of {settings.max_tokens_limit} "
            "(serve --max-tokens-limit raises it)",
            param=name, code="max_tokens_too_large",
        )
    return value


def _stop(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise OpenAIError(400, f"stop has {len(stops)} sequences; at most {MAX_STOP_SEQUENCES} are allowed", param="stop")
    if any(not s for s in stops):
        raise OpenAIError(400, "stop sequences must be non-empty strings", param="stop")
    return stops or None


def _response_format(req: ChatCompletionRequest, tool_choice: str, has_tools: bool) -> tuple[str | None, dict | None]:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None, None
    if has_tools and tool_choice != "none":
        # One grammar constrains one answer: JSON text, or tool calls, not both.
        raise OpenAIError(
            400, f"response_format {fmt.type!r} cannot be combined with tool calls; "
            "send tool_choice 'none' or leave response_format out",
            param="response_format",
        )
    from ..grammars import schema_grammar

    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else {"type": "object"}
    try:
        return schema_grammar(schema), (schema if fmt.type == "json_schema" else None)
    except SchemaError as exc:
        raise OpenAIError(400, f"Invalid response_format schema: {exc}", param="response_format",
                          code="invalid_schema") from None


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
                raise OpenAIError(
                    400, f"messages[{i}] is a tool result for tool_call_id {m.tool_call_id!r}, "
                    "but no earlier assistant message has a tool call with that id",
                    param=f"messages[{i}].tool_call_id",
                )
            item["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                item["name"] = m.name
        out.append(item)
    check_turn_order(out)
    return out


def check_turn_order(messages: list[dict[str, Any]]) -> None:
    """Gemma turns alternate user/model and the model answers the last user-side turn."""
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns or turns[0] != "user":
        raise OpenAIError(400, "messages: the conversation must start with a user message "
                          "(after any system messages)", param="messages")
    if turns[-1] not in ("user", "tool"):
        raise OpenAIError(400, f"messages: the last message is from the {turns[-1]}; it must be a user message "
                          "or a tool result, for the model to answer", param="messages")


def json_value_problem(value: Any) -> tuple[str, str] | None:
    """(path, what) for the first value a prompt cannot carry, else None.

    Python's JSON reader accepts ``NaN``, ``Infinity``, ``1e999`` (read as
    infinity) and lone UTF-16 surrogates (``"\\ud800"``); none can be rendered
    into a prompt or back into JSON. Walked without recursion: a body may nest deeply.
    """
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path, f"holds the number {item}; JSON numbers must be finite (no NaN, Infinity or 1e999)"
        if isinstance(item, str) and _has_surrogate(item):
            return path, "holds a lone UTF-16 surrogate (such as \\ud800); text must be valid Unicode"
        if isinstance(item, dict):
            bad_key = next((k for k in item if _has_surrogate(k)), None)
            if bad_key is not None:
                return path, f"has a key with a lone UTF-16 surrogate ({bad_key!r}); text must be valid Unicode"
            stack.extend(reversed([(f"{path}.{key}", sub) for key, sub in item.items()]))  # document order
        elif isinstance(item, list):
            stack.extend(reversed([(f"{path}[{i}]", sub) for i, sub in enumerate(item)]))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _text(content: Content) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _validation_error(exc: ValidationError) -> OpenAIError:
    """The first pydantic error, as one sentence naming the field (``messages[0].content``)."""
    errors = exc.errors(include_url=False)
    # Of a union's failed branches, the one that got furthest says the most.
    err = max(errors, key=lambda e: len(e["loc"]))
    loc = [p for p in err["loc"] if not _is_union_tag(p)]
    param = _param_path(loc)
    if "content" in loc and loc[-1] == "type" and err["type"] == "literal_error":
        return OpenAIError(400, f"Only text content parts are supported, got a part of type "
                           f"{_short(err.get('input'))} at {param!r}", param=param, code="invalid_value")
    if err["type"] == "extra_forbidden":
        message = f"Unknown field {param!r} in the request; remove it (fields are checked strictly)"
        return OpenAIError(400, message, param=param, code="unknown_field")
    if err["type"] == "missing":
        return OpenAIError(400, f"Missing required field {param!r}", param=param, code="missing_field")
    found = _short(err.get("input"))
    message = f"Invalid value for {param!r}: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] not in ("value_error", "assertion_error"):
        message += f" (got {found})"
    return OpenAIError(400, message, param=param, code="invalid_value")


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the chosen union member in the location ("user", "str", "list[ContentPart]", ...).
    return isinstance(part, str) and (
        part in ("system", "developer", "user", "assistant", "tool", "str", "int", "float", "bool")
        or "[" in part or part.startswith("literal") or part[:1].isupper()
    )


def _param_path(loc: list[Any]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
