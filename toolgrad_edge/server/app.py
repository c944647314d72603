"""The FastAPI application: OpenAI's chat-completions API, and Ollama's API, over one ToolRuntime.

``create_app(runtime, settings)`` builds it; ``toolgrad-edge serve`` runs it
with uvicorn. Request handlers only check, queue and translate: a single
worker thread (``queue.RequestQueue``) owns the runtime and runs requests in
arrival order, each to completion. Every failure leaves as an OpenAI-shaped
error (``errors.translate``), or in Ollama's shape on ``/api/*``
(``ollama_routes``), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import AUTHENTICATION, NOT_FOUND, RATE_LIMIT, SERVER, OpenAIError, translate
from .ollama_routes import ServerParts, add_ollama_routes
from .queue import DONE, ERROR, ITEM, Job, QueueFull, RequestQueue
from .schemas import ChatPlan, parse_chat_request
from .settings import ServerSettings
from .streaming import SSE_DONE, ChunkStream, completion_body, new_completion_id, sse

log = logging.getLogger("toolgrad_edge.server")

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(runtime: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The server app over ``runtime``: a ToolRuntime-like object, or a factory returning one.

    A runtime passed in stays the caller's to close; one made by a factory
    (called on the worker thread at start-up) is closed at shutdown.
    """
    settings = settings or ServerSettings()
    queue = RequestQueue(runtime, settings.max_queue)
    started_at = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue.start()
        try:
            yield
        finally:
            await asyncio.to_thread(queue.stop)

    app = FastAPI(title="toolgrad-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queue = queue
    app.state.settings = settings

    def model_name() -> str:
        if settings.model_name:
            return settings.model_name
        rt = queue.runtime
        name = getattr(rt, "model_name", None)
        if name:
            return str(name)
        path = getattr(rt, "model_path", None)
        return Path(path).stem if path else "toolgrad-edge"

    # -- errors: every one leaves in OpenAI's shape, or Ollama's on /api/* ------

    def error_response(err: OpenAIError, request: Request | None = None) -> JSONResponse:
        if request is not None and (request.url.path == "/api" or request.url.path.startswith("/api/")):
            return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = NOT_FOUND if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(OpenAIError(exc.status_code, message, type=kind, headers=getattr(exc, "headers", None)),
                              request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(OpenAIError(400, f"Invalid request: {exc.errors()[0].get('msg')}"), request)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(translate(exc), request)

    # -- auth -----------------------------------------------------------------

    def check_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise OpenAIError(401, "Missing API key: send the header 'Authorization: Bearer <key>' "
                              "(this server was started with --api-key)", type=AUTHENTICATION, code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise OpenAIError(401, "Incorrect API key; it must match the server's --api-key",
                              type=AUTHENTICATION, code="invalid_api_key")

    # -- endpoints --------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        if queue.load_error is not None:
            body = {"status": "error", "error": str(queue.load_error)}
            return JSONResponse(body, status_code=503)
        if queue.runtime is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": model_name(), "queue": queue.stats()})

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        check_api_key(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        check_api_key(request)
        if model_id != model_name():
            raise OpenAIError(404, f"Model {model_id!r} is not served here; this server serves {model_name()!r}",
                              type=NOT_FOUND, param="model", code="model_not_found")
        return JSONResponse(model_card())

    def model_card() -> dict[str, Any]:
        return {"id": model_name(), "object": "model", "created": started_at, "owned_by": "toolgrad-edge"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request)
        body = await read_body(request, settings.max_body_bytes)
        try:
            engine = await grammar_engine(request)
        except _ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it
        # Off the event loop: a thousand tools take a few tenths of a second to
        # check and compile, while the loop streams other requests' answers.
        plan = await asyncio.to_thread(parse_chat_request, body, settings, engine)
        job = Job(make_work(plan, settings.syntax), asyncio.get_running_loop())
        try:
            first = await start(job, request)
        except _ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it
        if not plan.stream:
            result = first[1]
            return JSONResponse(completion_body(result, completion_id=new_completion_id(),
                                                created=int(time.time()), model=model_name()))
        stream = ChunkStream(
            completion_id=new_completion_id(), model=model_name(), tools=plan.tools, syntax=settings.syntax,
            text_only=plan.grammar is not None or plan.tool_choice == "none",
            # The runtime strips a text answer when it parsed for calls (tools given, no grammar override).
            strip_text=bool(plan.tools) and plan.grammar is None,
            include_usage=plan.include_usage,
        )
        return StreamingResponse(
            sse_events(job, first, stream), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def grammar_engine(request: Request) -> str | None:
        """The runtime's grammar engine, which decides the tool grammar (and so how many tools a
        request may carry); waits for a runtime still loading. None when it failed to load: the
        queue then answers with the load error, as for any request."""
        while queue.runtime is None and not queue.ready.is_set():
            if await request.is_disconnected():
                raise _ClientGone()
            await asyncio.sleep(DISCONNECT_POLL_S)
        return getattr(queue.runtime, "grammar_engine", None)

    async def start(job: Job, request: Request) -> tuple[str, Any]:
        """Queue the job and wait for its first event (an item or the result); refusals and failures raise."""
        try:
            queue.submit(job)
        except QueueFull as full:
            raise OpenAIError(
                429, f"The server is busy: {full.waiting} requests are waiting (limit {queue.max_queue}). "
                f"Retry after {full.retry_after} s.",
                type=RATE_LIMIT, code="queue_full", headers={"Retry-After": str(full.retry_after)},
            ) from None
        try:
            first = await next_event(job, request)
        except _ClientGone:  # next_event cancelled the job
            raise
        except BaseException:
            queue.cancel(job)
            raise
        if first[0] == ERROR:
            raise translate(first[1])
        if first[0] == DONE:
            raise OpenAIError(503, "The server is shutting down; the request was not run.", type=SERVER,
                              code="shutting_down")
        return first

    async def next_event(job: Job, request: Request) -> tuple[str, Any]:
        """The job's next event; drops the job if the client leaves while it waits."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    queue.cancel(job)
                    raise _ClientGone() from None

    async def sse_events(job: Job, first: tuple[str, Any], stream: ChunkStream) -> AsyncIterator[str]:
        # Starlette cancels this generator when the client disconnects; the
        # finally block then stops the generation at its next token.
        try:
            for chunk in stream.start():
                yield sse(chunk)
            event = first
            while event[0] == ITEM:
                item = event[1]
                chunks = stream.feed(item) if isinstance(item, str) else stream.finish(item)
                for chunk in chunks:
                    yield sse(chunk)
                event = await job.events.get()
            if event[0] == ERROR:
                # Headers are gone already: the error travels as an event, as OpenAI does.
                yield sse(translate(event[1]).body())
            yield SSE_DONE
        except Exception as exc:  # a failure while shaping chunks: still an orderly end
            yield sse(translate(exc).body())
            yield SSE_DONE
        finally:
            queue.cancel(job)

    add_ollama_routes(app, ServerParts(
        queue=queue, settings=settings, model_name=model_name, check_api_key=check_api_key,
        grammar_engine=grammar_engine, start=start, next_event=next_event, read_body=read_body,
        client_gone=_ClientGone,
    ))
    return app


def make_work(plan: ChatPlan, syntax: str) -> Callable[[Any, Callable[[], bool]], Any]:
    """What the worker thread runs for this request."""
    kwargs = plan.runtime_kwargs(syntax)

    def work(runtime: Any, should_stop: Callable[[], bool]):
        if plan.stream:
            yield from runtime.stream(plan.messages, should_stop=should_stop, **kwargs)
        else:
            yield runtime.call(plan.messages, should_stop=should_stop, **kwargs)

    return work


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    too_large = OpenAIError(
        413, f"Request body is over the limit of {limit} bytes (serve --max-body-bytes raises it).",
        code="request_too_large",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
