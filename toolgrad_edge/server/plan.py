"""One request plan under both APIs, and the checks both make, written once.

``openai.py`` and ``ollama.py`` each read their wire format into a
``RequestPlan``: everything the worker needs, in the runtime's terms. What
both APIs check (body size and JSON values, limits on messages and tools,
the tool schemas and their call grammar, turn order, seed, stop strings, max
tokens, a JSON format) is here, so a request refused on one API is refused
on the other for the same reason, in that API's shape (``errors.APIError``).

The call grammar is compiled once per request, by the runtime's engine
(``ToolRuntime.compile_tools``), before the request is queued: the check and
the grammar the runtime decodes with are the same object.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from ..errors import ContextLengthError, GenerationError, SchemaError, TooManyToolsError
from .errors import APIError
from .settings import ServerSettings

# Seeds: any 64-bit integer, signed or not (clients send -1 for "random"), taken modulo 2**64.
SEED_MIN, SEED_END = -(2**63), 2**64


@dataclass
class RequestPlan:
    """A checked request, in the runtime's terms (either API)."""

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
    include_usage: bool = False       # OpenAI's stream_options.include_usage
    grammar: str | None = None        # set by response_format / format: the answer is that JSON
    json_schema: dict[str, Any] | None = None
    tool_schemas: dict[str, dict[str, Any]] | None = None
    model: str | None = None
    top_k: int = 0
    num_ctx: int | None = None        # Ollama's options.num_ctx: a tighter context for this request
    fill_context: bool = False        # Ollama's num_predict -1 / -2: up to the context (and the server's limit)
    compiled: Any = None              # the runtime's CompiledTools, set by compile_tools

    def runtime_kwargs(self, syntax: str) -> dict[str, Any]:
        """Keyword arguments for ``ToolRuntime.call`` / ``stream``."""
        return {
            "tools": self.compiled if self.compiled is not None else (self.tools or None),
            "tool_choice": self.tool_choice,
            "parallel": self.parallel,
            "syntax": syntax,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop,
            "grammar": self.grammar,
        }


# -- what both APIs' bodies hold -------------------------------------------------------------------


class StrictModel(BaseModel):
    # strict: "0.5" is not a number and 1 is not a bool; unknown fields are refused.
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class FunctionDef(StrictModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(StrictModel):
    """A tool as both APIs send it: ``{"type": "function", "function": {...}}``."""

    type: Literal["function"]
    function: FunctionDef


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# -- the body ------------------------------------------------------------------------------


def _is_64_bit(value: int | None) -> int | None:
    if value is not None and not SEED_MIN <= value < SEED_END:
        raise ValueError("seed must be a 64-bit integer, from -2**63 to 2**64 - 1")
    return value


# A request's seed (OpenAI's and Ollama's): any 64-bit integer, signed or not.
Seed = Annotated[int | None, AfterValidator(_is_64_bit)]


def seed(value: int | None) -> int | None:
    return None if value is None else value % SEED_END


def load_json_object(body: bytes, settings: ServerSettings) -> dict[str, Any]:
    """A request body as a JSON object whose every value a prompt can carry, or the 400/413 saying why not."""
    if len(body) > settings.max_body_bytes:
        raise APIError(
            413,
            f"Request body is {len(body)} bytes; the limit is {settings.max_body_bytes} bytes "
            "(serve --max-body-bytes raises it).",
            code="request_too_large",
        )
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "Request body is nested too deeply to parse", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"Request body must be a JSON object, got JSON {_json_kind(data)}", code="invalid_json")
    problem = json_value_problem(data)
    if problem is not None:
        where, what = problem
        param = where.lstrip(".") or "body"
        raise APIError(400, f"Invalid value for {param!r}: it {what}", param=param, code="invalid_value")
    return data


def validated(model: Any, body: bytes, settings: ServerSettings):
    """A raw body as one of the APIs' pydantic request models, or the 400 naming the field at fault."""
    data = load_json_object(body, settings)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


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


def validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error, as one sentence naming the field (``messages[0].content``)."""
    errors = exc.errors(include_url=False)
    # Of a union's failed branches, the one that got furthest says the most.
    err = max(errors, key=lambda e: len(e["loc"]))
    loc = [p for p in err["loc"] if not _is_union_tag(p)]
    param = _param_path(loc)
    if "content" in loc and loc[-1] == "type" and err["type"] == "literal_error":
        return APIError(400, f"Only text content parts are supported, got a part of type "
                        f"{_short(err.get('input'))} at {param!r}", param=param, code="invalid_value")
    if err["type"] == "extra_forbidden":
        message = f"Unknown field {param!r} in the request; remove it (fields are checked strictly)"
        return APIError(400, message, param=param, code="unknown_field")
    if err["type"] == "missing":
        return APIError(400, f"Missing required field {param!r}", param=param, code="missing_field")
    found = _short(err.get("input"))
    message = f"Invalid value for {param!r}: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] not in ("value_error", "assertion_error"):
        message += f" (got {found})"
    return APIError(400, message, param=param, code="invalid_value")


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


# -- limits, tools, turns ----------------------------------------------------------------------


def check_message_count(n_messages: int, settings: ServerSettings) -> None:
    if n_messages > settings.max_messages:
        raise APIError(400, f"{n_messages} messages; the limit is {settings.max_messages}",
                       param="messages", code="too_many_messages")


def check_tool_count(n_tools: int, settings: ServerSettings) -> None:
    if n_tools > settings.max_tools:
        raise APIError(400, f"{n_tools} tools; the limit is {settings.max_tools} (serve --max-tools raises it)",
                       param="tools", code="too_many_tools")


def tool_schemas(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The parameter schema of each tool, by name (functions as sent, without OpenAI's wrapper)."""
    return {t["name"]: t.get("parameters") or {"type": "object", "properties": {}} for t in tools}


def default_tool_choice(settings: ServerSettings, messages: list[dict[str, Any]], has_tools: bool) -> str:
    """The tool choice of a request that sends tools and names none: serve --tool-choice.

    ``required-first`` forces a call only where one is due, when the last
    message is the user's; after tool results the model may answer in text
    (``auto``), so a client's tool loop ends.
    """
    if not has_tools:
        return "none"
    if settings.tool_choice == "required-first":
        last = next((m["role"] for m in reversed(messages) if m["role"] != "system"), "user")
        return "required" if last == "user" else "auto"
    return settings.tool_choice


def check_turn_order(messages: list[dict[str, Any]]) -> None:
    """Gemma turns alternate user/model and the model answers the last user-side turn."""
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns or turns[0] != "user":
        raise APIError(400, "messages: the conversation must start with a user message "
                       "(after any system messages)", param="messages")
    if turns[-1] not in ("user", "tool"):
        raise APIError(400, f"messages: the last message is from the {turns[-1]}; it must be a user message "
                       "or a tool result, for the model to answer", param="messages")


def compile_tools(runtime: Any, plan: RequestPlan, syntax: str) -> None:
    """Compile the request's call grammar with the runtime's engine, now, and keep it on the plan: a bad
    schema, or more tools than the engine takes, is the caller's 400, found before queueing, and the
    runtime decodes with this very grammar."""
    if not plan.tools or plan.grammar is not None:
        return
    try:
        plan.compiled = runtime.compile_tools(plan.tools, plan.tool_choice, plan.parallel, syntax)
    except TooManyToolsError as exc:
        raise APIError(400, str(exc), param="tools", code="too_many_tools") from None
    except SchemaError as exc:
        raise APIError(400, f"Invalid tools: {exc}", param="tools", code="invalid_tools") from None


# -- sampling and the answer's shape -------------------------------------------------------------


def max_tokens(value: int | None, name: str, settings: ServerSettings) -> int:
    """A request's token budget: ``value`` as sent under ``name`` (None: serve's default), within serve's limit."""
    if value is None:
        return settings.default_max_tokens
    if value > settings.max_tokens_limit:
        raise APIError(
            400, f"{name}={value} is above this server's limit of {settings.max_tokens_limit} "
            "(serve --max-tokens-limit raises it)",
            param=name, code="max_tokens_too_large",
        )
    return value


def stop_strings(stops: list[str] | None, limit: int, name: str) -> list[str] | None:
    if not stops:
        return None
    if len(stops) > limit:
        raise APIError(400, f"{name} has {len(stops)} sequences; at most {limit} are allowed", param=name)
    if any(not s for s in stops):
        raise APIError(400, f"{name} sequences must be non-empty strings", param=name)
    return list(stops)


def json_format(schema: dict[str, Any], name: str) -> str:
    """The grammar that makes the answer JSON following ``schema`` (the API's field ``name``, for errors)."""
    from ..grammars import schema_grammar

    try:
        return schema_grammar(schema)
    except SchemaError as exc:
        raise APIError(400, f"Invalid {name} schema: {exc}", param=name, code="invalid_schema") from None


# -- the worker's side ------------------------------------------------------------------------


def make_work(plan: RequestPlan, syntax: str) -> Callable[[Any, Callable[[], bool]], Any]:
    """What the worker thread runs for this request: the runtime's events, or its one CallResult.

    Ollama's ``options.num_ctx`` below the loaded context holds the request
    to it; above, the request runs in the loaded context (serve --n-ctx sets
    it; a model is not reloaded per request). num_predict -1/-2 run to the
    end of that context, within serve --max-tokens-limit.
    """
    kwargs = plan.runtime_kwargs(syntax)

    def work(runtime: Any, should_stop: Callable[[], bool]):
        call_kwargs = dict(kwargs)
        if plan.num_ctx or plan.fill_context:
            fit_context(runtime, plan, call_kwargs, syntax)
        if plan.stream:
            yield from runtime.stream(plan.messages, should_stop=should_stop, **call_kwargs)
        else:
            yield runtime.call(plan.messages, should_stop=should_stop, **call_kwargs)

    return work


def fit_context(runtime: Any, plan: RequestPlan, kwargs: dict[str, Any], syntax: str) -> None:
    """Apply options.num_ctx and num_predict -1/-2 to this request's max_tokens (on the worker thread)."""
    described = runtime.describe()
    loaded_ctx = int(described.n_ctx or 0)
    if described.gguf is None or not loaded_ctx:
        return  # a runtime over llama-server: its own context decides
    tighter = plan.num_ctx is not None and plan.num_ctx < loaded_ctx
    if not tighter and not plan.fill_context:
        return  # num_ctx at or above the loaded context (Home Assistant sends 8192): nothing to count
    try:
        prompt = runtime.count_prompt_tokens(plan.messages, kwargs.get("tools"), syntax)
    except GenerationError:
        return  # the call itself will report what is wrong with the messages
    ctx = min(loaded_ctx, plan.num_ctx) if plan.num_ctx else loaded_ctx
    if plan.fill_context:
        kwargs["max_tokens"] = max(1, min(kwargs["max_tokens"], ctx - prompt))
    if tighter and prompt + kwargs["max_tokens"] > plan.num_ctx:
        raise ContextLengthError(
            f"the prompt is {prompt} tokens and num_predict is {kwargs['max_tokens']}, which exceeds "
            f"options.num_ctx of {plan.num_ctx} tokens; shorten the request, lower num_predict, or raise num_ctx "
            f"(up to the loaded context of {loaded_ctx})."
        )
