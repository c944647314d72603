"""Ollama's API routes (``/api/*``) on the server app: same port, runtime, queue, limits and ``--api-key``.

``add_ollama_routes`` is called by ``app.create_app`` with the app's own
pieces (the queue, the key check, the wait for a loading runtime), so an
Ollama request is queued, limited and cancelled exactly as an OpenAI one.
Errors leave in Ollama's shape (``{"error": "..."}``), which ``app``
chooses for every path under ``/api/``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .. import __version__
from ..errors import ContextLengthError, GenerationError
from .errors import translate
from .ollama import (
    OLLAMA_API_VERSION,
    REFUSED,
    ModelNames,
    OllamaPlan,
    OllamaStream,
    final_body,
    load_body,
    model_entry,
    ndjson,
    parse_chat,
    parse_generate,
    refusal,
    running_entry,
    show_body,
    ShowRequestIn,
    validated_request,
)
from .queue import ERROR, ITEM, Job

log = logging.getLogger("toolgrad_edge.server")


class _Gone(Exception):
    """The client left while its request waited for the model to load."""


@dataclass
class ServerParts:
    """What the Ollama routes share with the OpenAI ones (built by ``app.create_app``)."""

    queue: Any
    settings: Any
    model_name: Callable[[], str]
    check_api_key: Callable[[Request], None]
    grammar_engine: Callable[[Request], Any]   # async: waits for a loading runtime
    start: Callable[[Job, Request], Any]  # async: queue a job, wait for its first event (429/503/errors raise)
    next_event: Callable[[Job, Request], Any]  # async
    read_body: Callable[[Request, int], Any]   # async
    client_gone: type[Exception]


def add_ollama_routes(app: FastAPI, parts: ServerParts) -> None:
    queue, settings = parts.queue, parts.settings

    def names() -> ModelNames:
        runtime = queue.runtime
        info = getattr(runtime, "info", None)
        return ModelNames.of(parts.model_name(), getattr(runtime, "model_path", None),
                             getattr(info, "file_type", None))

    async def loaded(request: Request) -> tuple[str | None, float]:
        """The runtime's grammar engine once it is loaded, and how long this request waited for that."""
        start = time.monotonic()
        try:
            engine = await parts.grammar_engine(request)
        except parts.client_gone:
            raise _Gone() from None
        if queue.load_error is not None:
            raise translate(queue.load_error)
        return engine, time.monotonic() - start

    @app.get("/")
    @app.head("/")
    async def root() -> PlainTextResponse:
        # Ollama answers "Ollama is running" here; apps probe it to check the URL.
        return PlainTextResponse("toolgrad-edge is running (Ollama API at /api, OpenAI API at /v1)")

    @app.get("/api/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": OLLAMA_API_VERSION, "toolgrad_edge": __version__})

    @app.get("/api/tags")
    async def tags(request: Request) -> JSONResponse:
        parts.check_api_key(request)
        await loaded(request)
        return JSONResponse({"models": [model_entry(names(), queue.runtime)]})

    @app.get("/api/ps")
    async def ps(request: Request) -> JSONResponse:
        parts.check_api_key(request)
        await loaded(request)
        return JSONResponse({"models": [running_entry(names(), queue.runtime)]})

    @app.post("/api/show")
    async def show(request: Request) -> JSONResponse:
        parts.check_api_key(request)
        body = await parts.read_body(request, settings.max_body_bytes)
        await loaded(request)
        req = validated_request(ShowRequestIn, body, settings)
        served = names()
        requested = req.model or req.name or ""
        served.check(requested)
        return JSONResponse(show_body(served, queue.runtime, settings))

    @app.post("/api/chat")
    async def chat(request: Request):
        arrived = time.monotonic()
        parts.check_api_key(request)
        body = await parts.read_body(request, settings.max_body_bytes)
        engine, load_s = await loaded(request)
        plan = await asyncio.to_thread(parse_chat, body, settings, names(), engine)
        return await answer(plan, request, arrived, load_s)

    @app.post("/api/generate")
    async def generate(request: Request):
        arrived = time.monotonic()
        parts.check_api_key(request)
        body = await parts.read_body(request, settings.max_body_bytes)
        _, load_s = await loaded(request)
        plan = await asyncio.to_thread(parse_generate, body, settings, names())
        return await answer(plan, request, arrived, load_s)

    @app.exception_handler(_Gone)
    async def _gone(request: Request, exc: _Gone) -> JSONResponse:
        return JSONResponse({}, status_code=499)  # the client left while the model loaded: nobody reads it

    for path, (methods, _) in REFUSED.items():
        app.add_api_route(path, _refused(path, parts), methods=list(methods))

    async def answer(plan: OllamaPlan, request: Request, arrived: float, load_s: float):
        if plan.chat is None:
            return JSONResponse(load_body(plan))
        headers = {"X-Toolgrad-Ignored-Options": ", ".join(plan.ignored_options)} if plan.ignored_options else {}
        job = Job(make_work(plan, settings), asyncio.get_running_loop())
        try:
            first = await parts.start(job, request)
        except parts.client_gone:
            return JSONResponse({}, status_code=499)  # nobody reads it
        if not plan.stream:
            body = final_body(plan, first[1], time.monotonic() - arrived, load_s, streamed=False)
            return JSONResponse(body, headers=headers)
        stream = OllamaStream(plan, settings.syntax)
        return StreamingResponse(ndjson_events(job, first, stream, arrived, load_s),
                                 media_type="application/x-ndjson", headers={**headers, "Cache-Control": "no-cache"})

    async def ndjson_events(job: Job, first: tuple[str, Any], stream: OllamaStream, arrived: float,
                            load_s: float) -> AsyncIterator[str]:
        # As sse_events: Starlette cancels this generator when the client leaves; finally stops the job.
        try:
            event = first
            while event[0] == ITEM:
                item = event[1]
                objects = (stream.feed(item) if isinstance(item, str)
                           else stream.finish(item, time.monotonic() - arrived, load_s))
                for obj in objects:
                    yield ndjson(obj)
                event = await job.events.get()
            if event[0] == ERROR:
                # Headers are gone already: the error travels as a line, as Ollama does.
                yield ndjson({"error": translate(event[1]).message})
        except Exception as exc:  # a failure while shaping objects: still an orderly end
            yield ndjson({"error": translate(exc).message})
        finally:
            queue.cancel(job)


def _refused(path: str, parts: ServerParts):
    async def refused(request: Request) -> Response:
        parts.check_api_key(request)
        raise refusal(path)

    refused.__name__ = "refused_" + path.strip("/").replace("/", "_").replace("{", "").replace("}", "")
    return refused


def make_work(plan: OllamaPlan, settings: Any) -> Callable[[Any, Callable[[], bool]], Any]:
    """What the worker thread runs for an Ollama request.

    ``options.num_ctx`` below the loaded context holds this request to it; above, the request runs in
    the loaded context (serve --n-ctx sets it; a model is not reloaded per request). num_predict -1/-2
    run to the end of that context, within serve --max-tokens-limit.
    """
    chat = plan.chat
    assert chat is not None
    kwargs = plan.runtime_kwargs(settings.syntax)

    def work(runtime: Any, should_stop: Callable[[], bool]):
        call_kwargs = dict(kwargs)
        if plan.num_ctx or plan.fill_context:
            fit_context(runtime, plan, call_kwargs, settings.syntax)
        if plan.stream:
            yield from runtime.stream(chat.messages, should_stop=should_stop, **call_kwargs)
        else:
            yield runtime.call(chat.messages, should_stop=should_stop, **call_kwargs)

    return work


def fit_context(runtime: Any, plan: OllamaPlan, kwargs: dict[str, Any], syntax: str) -> None:
    """Apply options.num_ctx and num_predict -1/-2 to this request's max_tokens (on the worker thread)."""
    loaded_ctx = int(getattr(runtime, "n_ctx", 0) or 0)
    if getattr(runtime, "info", None) is None or not loaded_ctx:
        return  # a runtime over llama-server: its own context decides
    tighter = plan.num_ctx is not None and plan.num_ctx < loaded_ctx
    if not tighter and not plan.fill_context:
        return  # num_ctx at or above the loaded context (Home Assistant sends 8192): nothing to count
    try:
        prompt = runtime.count_prompt_tokens(plan.chat.messages, kwargs.get("tools"), syntax)
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
