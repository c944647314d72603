"""Ollama's native API: its requests become a ``RequestPlan``, the runtime's events become its objects.

Ollama's apps (Home Assistant, Open WebUI, the official ``ollama`` clients)
call ``/api/chat`` and ``/api/generate`` with NDJSON streaming, tool-call
arguments as JSON objects and sampling in ``options``. This module is plain
data in, plain data out (no FastAPI), so every translation is tested without
a model; ``app`` wires it to the server. The checks both APIs make (tools
compiled before queueing, limits, turn order, seed, stop, max tokens,
format) are ``plan``'s, so a call returned here is schema-valid exactly as
one returned on ``/v1``.

Where Ollama is lenient this module is too, as an app pointed at Ollama
expects: unknown fields and unknown options are ignored (Ollama logs them),
and options this runtime has no use for are accepted and listed back in the
``X-Toolgrad-Ignored-Options`` header. A wrong type, or a request this server
cannot honour (images, fill-in-the-middle, more tokens than the limit), is a
400 in Ollama's error shape, ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..results import CallDone, Final, TextDelta
from . import plan as shared
from .errors import APIError
from .plan import RequestPlan, Seed, ToolDef, new_call_id
from .settings import ServerSettings

# The Ollama release whose API docs (docs/api.md, api/types.go) this follows; /api/version reports it,
# since apps gate features on Ollama's version, not on toolgrad-edge's.
OLLAMA_API_VERSION = "0.33.0"
MAX_STOP_SEQUENCES = 16
THINK_LEVELS = ("low", "medium", "high", "max")

# Options Ollama knows that this runtime does not use: accepted (apps send their defaults), not applied,
# and named back in the X-Toolgrad-Ignored-Options header. One line per option: why.
IGNORED_OPTIONS = {
    "num_keep": "the prompt is never shifted out of the context",
    "min_p": "the runtime samples with temperature, top_p and top_k",
    "typical_p": "the runtime samples with temperature, top_p and top_k",
    "tfs_z": "the runtime samples with temperature, top_p and top_k",
    "repeat_last_n": "no repetition penalty: it would bend the tool grammar's choices",
    "repeat_penalty": "no repetition penalty: it would bend the tool grammar's choices",
    "presence_penalty": "no repetition penalty: it would bend the tool grammar's choices",
    "frequency_penalty": "no repetition penalty: it would bend the tool grammar's choices",
    "penalize_newline": "no repetition penalty: it would bend the tool grammar's choices",
    "mirostat": "the runtime samples with temperature, top_p and top_k",
    "mirostat_tau": "the runtime samples with temperature, top_p and top_k",
    "mirostat_eta": "the runtime samples with temperature, top_p and top_k",
    "numa": "set when the model loads (serve's options), not per request",
    "num_batch": "set when the model loads, not per request",
    "num_gpu": "set when the model loads (serve --n-gpu-layers)",
    "main_gpu": "set when the model loads",
    "low_vram": "set when the model loads",
    "f16_kv": "set when the model loads",
    "logits_all": "set when the model loads",
    "vocab_only": "set when the model loads",
    "use_mmap": "set when the model loads",
    "use_mlock": "set when the model loads",
    "embedding_only": "set when the model loads",
    "num_thread": "set when the model loads (serve --threads)",
    "draft_num_predict": "the runtime picks its own draft lengths",
}


class _In(BaseModel):
    # Types are checked strictly, as Ollama's Go decoder does; unknown fields are ignored, as it does.
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class FunctionCallIn(_In):
    index: int | None = None
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCallIn(_In):
    id: str | None = None
    type: str | None = None
    function: FunctionCallIn


class MessageIn(_In):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    thinking: str | None = None
    images: list[Any] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _role_in_lower_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value  # as Ollama reads roles


class OptionsIn(_In):
    # applied
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: Seed = None
    num_predict: int | None = Field(default=None, ge=-2)
    stop: list[str] | None = None
    num_ctx: int | None = Field(default=None, ge=1)
    # accepted, not applied (IGNORED_OPTIONS says why)
    num_keep: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    repeat_last_n: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    penalize_newline: bool | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    numa: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    num_thread: int | None = None
    draft_num_predict: int | None = None


Format = Union[Literal["", "json"], dict[str, Any], None]
KeepAlive = Union[int, float, str, None]
Think = Union[bool, Literal["low", "medium", "high", "max"], None]

# Go's time.ParseDuration, as Ollama reads keep_alive: "5m", "1h30m", "-1s", "0".
_DURATION = re.compile(r"[-+]?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+)")


class _Common(_In):
    model: str
    format: Format = None
    options: OptionsIn | None = None
    stream: bool = True
    keep_alive: KeepAlive = None
    think: Think = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive_is_a_duration(cls, value: KeepAlive) -> KeepAlive:
        if isinstance(value, str) and not _DURATION.fullmatch(value.strip()):
            raise ValueError(f"keep_alive must be a number of seconds or a duration such as '5m', got {value!r}")
        return value


class ChatRequestIn(_Common):
    messages: list[MessageIn] = Field(default_factory=list)
    tools: list[ToolDef] | None = None
    truncate: bool | None = None
    shift: bool | None = None


class GenerateRequestIn(_Common):
    prompt: str = ""
    suffix: str = ""
    system: str = ""
    template: str = ""
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None


class ShowRequestIn(_In):
    model: str | None = None
    name: str | None = None  # the older field, still sent by some clients
    verbose: bool | None = None


# -- model names ---------------------------------------------------------------------


def ollama_name(name: str) -> str:
    """An Ollama-style model name (``gemma-3-270m``): lower case, runs of other characters as one '-'."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.strip().lower()).strip("-.")
    return slug or "model"


@dataclass(frozen=True)
class ModelNames:
    """The name the server answers to, and the rule for the names a request may send.

    The served name is ``<name>:latest``, where ``<name>`` is the served model's name (serve's model
    name, else the GGUF's ``general.name``) written as an Ollama name. A request's ``model`` matches
    when, written the same way, its name part is that name or the GGUF file's stem, and its tag is
    absent, ``latest`` or the file's quantization level (``gemma-3-270m:q4_k_m``). Any other name
    is Ollama's 404 ``model '...' not found``, naming what to send instead.
    """

    base: str
    aliases: frozenset[str]
    tags: frozenset[str]

    @classmethod
    def of(cls, display_name: str, model_path: str | Path | None = None, quantization: str | None = None) -> "ModelNames":
        base = ollama_name(display_name)
        aliases = {base}
        if model_path:
            aliases.add(ollama_name(Path(model_path).stem))
        tags = {"", "latest"} | ({quantization.lower()} if quantization else set())
        return cls(base, frozenset(aliases), frozenset(tags))

    @property
    def served(self) -> str:
        return f"{self.base}:latest"

    def accepts(self, requested: str) -> bool:
        name, _, tag = requested.strip().partition(":")
        return ollama_name(name) in self.aliases and tag.strip().lower() in self.tags

    def check(self, requested: str) -> None:
        if not requested.strip():
            raise APIError(400, f"model is required; this server serves {self.served!r}", param="model")
        if not self.accepts(requested):
            raise APIError(404, f"model '{requested}' not found; this server serves one model, "
                              f"{self.served!r} (GET /api/tags lists it)", param="model", code="model_not_found")


# -- requests -------------------------------------------------------------------------------


@dataclass
class OllamaPlan:
    """A checked Ollama request: the RequestPlan the worker runs, and what only Ollama's API has."""

    kind: Literal["chat", "generate"]
    model: str                       # as the client sent it: Ollama echoes it in every answer
    chat: RequestPlan | None         # None: an empty request, which only asks that the model be loaded
    stream: bool
    ignored_options: list[str] = field(default_factory=list)

    def runtime_kwargs(self, syntax: str) -> dict[str, Any]:
        assert self.chat is not None
        return self.chat.runtime_kwargs(syntax)


def parse_chat(body: bytes, settings: ServerSettings, names: ModelNames) -> OllamaPlan:
    """A raw ``/api/chat`` body -> OllamaPlan, or an APIError (rendered in Ollama's shape)."""
    req = validated_request(ChatRequestIn, body, settings)
    names.check(req.model)
    _check_common(req)
    if not req.messages:
        return OllamaPlan("chat", req.model, None, req.stream)
    shared.check_message_count(len(req.messages), settings)
    messages = chat_messages(req.messages)
    tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
    shared.check_tool_count(len(tools), settings)
    # Ollama has no tool-choice field: serve --tool-choice decides.
    tool_choice = shared.default_tool_choice(settings, messages, bool(tools))
    return _plan("chat", req, messages, tools, tool_choice, settings)


def parse_generate(body: bytes, settings: ServerSettings, names: ModelNames) -> OllamaPlan:
    """A raw ``/api/generate`` body -> OllamaPlan: ``system`` and ``prompt`` as one user turn, or a raw prompt."""
    req = validated_request(GenerateRequestIn, body, settings)
    names.check(req.model)
    _check_common(req)
    if req.images:
        raise APIError(400, "images: this server's model reads text only; send the prompt without images",
                       param="images")
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported: the served model completes chat "
                       "turns only; leave suffix out", param="suffix")
    if req.raw and (req.system or req.template or req.context):
        raise APIError(400, "raw mode does not support template, system, or context", param="raw")
    if req.template:
        raise APIError(400, "template is not supported: this server renders Gemma 3's turns itself; leave "
                       "template out, or send raw: true with a prompt already in Gemma 3's turn format",
                       param="template")
    if req.context:
        raise APIError(400, "context (deprecated in Ollama) is not supported; keep a conversation as "
                       "messages in /api/chat", param="context")
    if not req.prompt:
        return OllamaPlan("generate", req.model, None, req.stream)
    if req.raw:
        messages = raw_prompt_messages(req.prompt)
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt}]
    return _plan("generate", req, messages, [], "none", settings)


def validated_request(model: type[_In], body: bytes, settings: ServerSettings):
    """A raw body as one of this module's request models, or the 400 naming the field at fault."""
    if not body.strip():
        raise APIError(400, "missing request body", code="invalid_json")
    return shared.validated(model, body, settings)


def _check_common(req: _Common) -> None:
    if req.logprobs:
        raise APIError(400, "logprobs are not supported; leave the field out or send false", param="logprobs")
    if isinstance(req.format, dict) and not req.format:
        raise APIError(400, "format is an empty object; send \"json\" or a JSON Schema", param="format")


def _plan(kind: str, req: _Common, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
          tool_choice: str, settings: ServerSettings) -> OllamaPlan:
    opts = req.options or OptionsIn()
    max_tokens, fill = _max_tokens(opts.num_predict, settings)
    grammar, json_schema = _format(req.format, bool(tools) and tool_choice != "none")
    plan = RequestPlan(
        messages=messages,
        tools=[{"type": "function", "function": t} for t in tools],
        tool_choice=tool_choice,
        parallel=True,
        max_tokens=max_tokens,
        temperature=0.0 if opts.temperature is None else float(opts.temperature),
        top_p=1.0 if opts.top_p is None else float(opts.top_p),
        top_k=opts.top_k or 0,
        seed=shared.seed(opts.seed),
        stop=shared.stop_strings(opts.stop, MAX_STOP_SEQUENCES, "options.stop"),
        stream=req.stream,
        grammar=grammar,
        json_schema=json_schema,
        tool_schemas=shared.tool_schemas(tools),
        model=req.model,
        num_ctx=opts.num_ctx,
        fill_context=fill,
    )
    ignored = sorted(name for name in IGNORED_OPTIONS if getattr(opts, name) is not None)
    return OllamaPlan(kind, req.model, plan, req.stream, ignored_options=ignored)


def _max_tokens(num_predict: int | None, settings: ServerSettings) -> tuple[int, bool]:
    """(max_tokens, fill): unset or 0 is serve's default; -1 and -2 (Ollama's 'until the context is full')
    run up to the context, within serve --max-tokens-limit."""
    if num_predict is None or num_predict == 0:
        return settings.default_max_tokens, False
    if num_predict < 0:
        return settings.max_tokens_limit, True
    return shared.max_tokens(num_predict, "options.num_predict", settings), False


def _format(fmt: Format, calls: bool) -> tuple[str | None, dict[str, Any] | None]:
    """Ollama's ``format`` ("json" or a JSON Schema) as the grammar that enforces it."""
    if fmt is None or fmt == "":
        return None, None
    if calls:
        # One grammar constrains one answer: JSON text, or tool calls, not both.
        raise APIError(400, "format cannot be combined with tools: the grammar enforces either the tool calls "
                          "or the JSON format; send one of them (or serve --tool-choice none)", param="format")
    schema = {"type": "object"} if fmt == "json" else fmt
    return shared.json_format(schema, "format"), (fmt if isinstance(fmt, dict) else None)


def chat_messages(messages: list[MessageIn]) -> list[dict[str, Any]]:
    """Ollama messages -> the OpenAI-style dicts the runtime renders.

    Tool results name their tool with ``tool_name``; one without it takes the name of the call its
    ``tool_call_id`` answers, or of the previous message's only call.
    """
    out: list[dict[str, Any]] = []
    names_by_id: dict[str, str] = {}
    last_calls: list[str] = []
    for i, m in enumerate(messages):
        if m.images:
            raise APIError(400, f"messages[{i}].images: this server's model reads text only; send the message "
                              "without images", param=f"messages[{i}].images")
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"messages[{i}]: only assistant messages carry tool_calls, not {m.role} messages",
                              param=f"messages[{i}].tool_calls")
        item: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.role == "assistant":
            last_calls = []
            if m.tool_calls:
                item["tool_calls"] = []
                for j, call in enumerate(m.tool_calls):
                    call_id = call.id or f"call_{i}_{j}"
                    names_by_id[call_id] = call.function.name
                    last_calls.append(call.function.name)
                    item["tool_calls"].append({"id": call_id, "type": "function", "function": {
                        "name": call.function.name, "arguments": call.function.arguments}})
        elif m.role == "tool":
            name = m.tool_name or names_by_id.get(m.tool_call_id or "") or (
                last_calls[0] if len(set(last_calls)) == 1 else None)
            if name:
                item["name"] = name
            if m.tool_call_id:
                item["tool_call_id"] = m.tool_call_id
        out.append(item)
    shared.check_turn_order(out)
    return out


_TURN = re.compile(r"<start_of_turn>(user|model)\n(.*?)<end_of_turn>\n", re.S)
_ANSWER = "<start_of_turn>model\n"


def raw_prompt_messages(prompt: str) -> list[dict[str, Any]]:
    """A raw prompt in Gemma 3's turn format -> messages that render back to exactly that prompt.

    The runtime always renders turns itself (its control tokens never come from text), so a raw
    prompt is served when it is what the runtime would render: Gemma's turns, ending in the model's
    open turn. Anything else is a 400 that says so, never a silently re-templated prompt.
    """
    from ..prompt import render_prompt

    text = prompt.removeprefix("<bos>")
    messages, pos = [], 0
    while (turn := _TURN.match(text, pos)) is not None:
        messages.append({"role": "user" if turn[1] == "user" else "assistant", "content": turn[2]})
        pos = turn.end()
    wrong = APIError(400, "raw prompts must be Gemma 3 turns as this server renders them: "
                        "'<start_of_turn>user\\n...<end_of_turn>\\n' (alternating with model turns) and then "
                        "'<start_of_turn>model\\n'; other raw text cannot be served. Send raw: false to have "
                        "the prompt rendered as a user turn.", param="prompt")
    if text[pos:] != _ANSWER or not messages:
        raise wrong
    try:
        parts = render_prompt(messages, [])
    except Exception:
        raise wrong from None
    rendered = "".join(seg.text for seg in (*parts.prefix, *parts.rest))
    if rendered != "<bos>" + text:
        raise wrong
    return messages


# -- answers ----------------------------------------------------------------------------


def created_at() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, int(round(seconds * 1e9)))


def done_reason(result: Any) -> str:
    """Ollama's done_reason: "length" when num_predict cut the answer, else "stop" (calls included, as Ollama)."""
    return "length" if getattr(result, "finish_reason", None) == "length" else "stop"


def metrics(result: Any, total_s: float, load_s: float) -> dict[str, Any]:
    """The final object's counts and durations (nanoseconds)."""
    usage, timings = getattr(result, "usage", None), getattr(result, "timings", None)
    ttft = float(getattr(timings, "ttft_s", 0.0) or 0.0)
    decode = float(getattr(timings, "decode_s", 0.0) or 0.0)
    return {
        "total_duration": _ns(max(total_s, ttft + decode)),
        "load_duration": _ns(load_s),
        "prompt_eval_count": int(getattr(usage, "prompt_tokens", 0) or 0),
        "prompt_eval_duration": _ns(ttft),
        "eval_count": int(getattr(usage, "completion_tokens", 0) or 0),
        "eval_duration": _ns(decode),
    }


def tool_call_body(index: int, name: str, arguments: dict[str, Any], call_id: str | None = None) -> dict[str, Any]:
    """One call in Ollama's form: arguments as an object; ``id`` and ``function.index`` as current Ollama sends."""
    return {"id": call_id or new_call_id(), "function": {"index": index, "name": name, "arguments": arguments}}


def final_body(plan: OllamaPlan, result: Any, total_s: float, load_s: float, *, streamed: bool) -> dict[str, Any]:
    """The last (or only) object of an answer; a streamed answer's text went out before it."""
    body: dict[str, Any] = {"model": plan.model, "created_at": created_at()}
    calls = list(getattr(result, "tool_calls", None) or [])
    text = "" if streamed or calls else (getattr(result, "content", None) or "")
    if plan.kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls and not streamed:
            message["tool_calls"] = [tool_call_body(i, c.name, c.arguments) for i, c in enumerate(calls)]
        body["message"] = message
    else:
        body["response"] = text
    body.update({"done": True, "done_reason": done_reason(result), **metrics(result, total_s, load_s)})
    error = getattr(result, "parse_error", None)
    if error:
        body["parse_error"] = str(error)  # text that is not a valid call list; as on /v1's choice
    return body


def load_body(plan: OllamaPlan) -> dict[str, Any]:
    """The answer to an empty request: the model is loaded (and stays loaded while the server runs)."""
    body: dict[str, Any] = {"model": plan.model, "created_at": created_at()}
    if plan.kind == "chat":
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    body.update({"done": True, "done_reason": "load"})
    return body


class OllamaStream:
    """Renders the runtime's events as Ollama's NDJSON objects: text as it comes, each call whole in one
    object (as Ollama sends them), then the final object with the counts and durations."""

    media_type = "application/x-ndjson"

    def __init__(self, plan: OllamaPlan, arrived: float, load_s: float) -> None:
        self.plan = plan
        self.arrived = arrived  # time.monotonic() when the request came in
        self.load_s = load_s

    def start(self) -> list[dict[str, Any]]:
        return []

    def render(self, event: Any) -> list[dict[str, Any]]:
        """The objects for one event (none for the model's raw text: its calls and text come as their own events)."""
        if isinstance(event, TextDelta):
            return [self._object(event.text)]
        if isinstance(event, CallDone):
            return [self._object("", [tool_call_body(event.index, event.call.name, event.call.arguments)])]
        if isinstance(event, Final):
            total_s = time.monotonic() - self.arrived
            return [final_body(self.plan, event.result, total_s, self.load_s, streamed=True)]
        return []

    def error(self, err: APIError) -> dict[str, Any]:
        # Headers are gone already: the error travels as a line, as Ollama does.
        return err.ollama_body()

    @staticmethod
    def line(obj: dict[str, Any]) -> str:
        return ndjson(obj)

    def end(self) -> list[str]:
        return []

    def _object(self, text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.plan.model, "created_at": created_at()}
        if self.plan.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls
            body["message"] = message
        else:
            body["response"] = text
        body["done"] = False
        return body


def ndjson(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


# -- the model, described from its GGUF ------------------------------------------------------------


def parameter_size(n_params: int) -> str:
    """Ollama's HumanNumber: 268.10M, 3.9B, 8B."""
    for unit, scale, digits in (("B", 1e9, 1), ("M", 1e6, 2)):
        if n_params >= scale:
            number = n_params / scale
            return f"{number:.0f}{unit}" if number == int(number) else f"{number:.{digits}f}{unit}"
    return f"{n_params / 1e3:.0f}K" if n_params >= 1000 else str(n_params)


def model_details(info: Any) -> dict[str, Any]:
    """Ollama's ``details`` from a GGUFInfo (None: a runtime without a local file, over llama-server)."""
    family = getattr(info, "architecture", "") or "gemma3"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": parameter_size(info.n_params) if info is not None else "",
        "quantization_level": info.file_type if info is not None else "",
    }


def model_file_facts(path: Any) -> tuple[int, str, str]:
    """(size in bytes, modified_at, digest) of the model file; the digest is a cheap identity of the file
    (size, mtime and both ends, as the prefix cache keys it), not a sha256 of every byte."""
    from ..prefix_cache import model_identity

    try:
        file = Path(path)
        stat = file.stat()
        digest = model_identity(file)
    except (OSError, TypeError):
        return 0, created_at(), ""
    modified = datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    return stat.st_size, modified, digest[:64]


CAPABILITIES = ["completion", "tools"]


def model_info_fields(info: Any) -> dict[str, Any]:
    """``model_info``: the GGUF's scalar metadata (arrays such as the vocabulary are left out, as Ollama
    leaves them out unless verbose), plus ``general.parameter_count``."""
    if info is None:
        return {}
    fields = {k: v for k, v in info.metadata.items()
              if isinstance(v, (str, int, float, bool)) and k != "tokenizer.chat_template"}
    fields["general.parameter_count"] = info.n_params
    return dict(sorted(fields.items()))


def parameters_text(settings: ServerSettings, n_ctx: int | None) -> str:
    """``parameters``: this server's defaults, in Modelfile PARAMETER lines."""
    lines = [("temperature", "0"), ("top_p", "1"), ("num_predict", str(settings.default_max_tokens))]
    if n_ctx:
        lines.append(("num_ctx", str(n_ctx)))
    lines.append(("stop", '"<end_of_turn>"'))
    return "\n".join(f"{k:<30} {v}" for k, v in lines)


def model_entry(names: ModelNames, described: Any) -> dict[str, Any]:
    """The served model as one entry of /api/tags (``described``: the engine's ``describe()``)."""
    info = described.gguf
    size, modified, digest = model_file_facts(described.model_path if info is not None else None)
    return {"name": names.served, "model": names.served, "modified_at": modified, "size": size,
            "digest": digest, "details": model_details(info)}


def running_entry(names: ModelNames, described: Any) -> dict[str, Any]:
    """The served model as one entry of /api/ps: loaded until the server stops."""
    entry = model_entry(names, described)
    del entry["modified_at"]
    gpu = int(described.n_gpu_layers or 0) > 0
    entry.update({"expires_at": "9999-12-31T23:59:59Z", "size_vram": entry["size"] if gpu else 0,
                  "context_length": int(described.n_ctx or 0)})
    return entry


def show_body(names: ModelNames, described: Any, settings: ServerSettings) -> dict[str, Any]:
    """/api/show: details, model_info and capabilities of the loaded GGUF."""
    info, path = described.gguf, described.model_path
    size, modified, _ = model_file_facts(path if info is not None else None)
    n_ctx = int(described.n_ctx or 0) or None
    template = info.metadata.get("tokenizer.chat_template", "") if info is not None else ""
    return {
        "modelfile": f"# Served by toolgrad-edge from one local file; there is no Modelfile.\nFROM {path}\n",
        "parameters": parameters_text(settings, n_ctx),
        "template": template if isinstance(template, str) else "",
        "license": str(info.metadata.get("general.license", "")) if info is not None else "",
        "details": model_details(info),
        "model_info": model_info_fields(info),
        "capabilities": list(CAPABILITIES),
        "modified_at": modified,
    }


# -- refused endpoints ---------------------------------------------------------------------------

REFUSED = {
    # path: (methods, why)
    "/api/pull": (("POST",), "downloads nothing: it serves the one local GGUF file it was started with "
                  "(toolgrad-edge serve --model FILE)"),
    "/api/push": (("POST",), "uploads nothing: it serves one local GGUF file"),
    "/api/create": (("POST",), "has no model store: it serves the one local GGUF file it was started with"),
    "/api/copy": (("POST",), "has no model store: it serves one local GGUF file under one name"),
    "/api/delete": (("DELETE",), "has no model store and deletes nothing: it serves one local GGUF file"),
    "/api/blobs/{digest}": (("HEAD", "POST"), "has no model store: it serves one local GGUF file"),
    "/api/embed": (("POST",), "computes no embeddings: the served model generates text and tool calls"),
    "/api/embeddings": (("POST",), "computes no embeddings: the served model generates text and tool calls"),
}
REFUSED_STATUS = 501  # Not Implemented: the request is well formed, this server does not do it


def refusal(path: str) -> APIError:
    _, why = REFUSED[path]
    shown = path.replace("/{digest}", "")
    return APIError(REFUSED_STATUS, f"{shown} is not supported: toolgrad-edge {why}", code="not_supported")
