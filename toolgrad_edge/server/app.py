"""One server behind two APIs: OpenAI's chat completions (``/v1``) and Ollama's (``/api``), over one ToolRuntime.

``Server`` owns what both APIs share: the queue (a worker thread owns the
runtime and runs requests in arrival order), the API key, the wait for a
model still loading, the call grammar compiled once per request, the start
of a job up to its first event, and the pump that streams a job's events
through an API's renderer. ``create_app`` puts the routes of both APIs on
it; each route reads its wire format into a ``RequestPlan``
(``openai.py`` / ``ollama.py``) and renders the answer back. Every failure
leaves as an ``APIError`` in the shape of the API asked, and the server
keeps serving.

A request's path: route -> ``parse_*`` (plan.py's checks) -> ``compile`` (the
engine's call grammar) -> ``start`` (queued; the worker runs
``ToolRuntime.stream``) -> events -> ``OpenAIStream`` / ``OllamaStream``.
``shutdown()`` (serve calls it on SIGTERM or SIGINT) stops taking requests,
ends running jobs at their next token with a proper end of stream, and
answers waiting ones 503.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from . import ollama, openai
from .errors import AUTHENTICATION, NOT_FOUND, RATE_LIMIT, SERVER, APIError, translate
from .plan import RequestPlan, compile_tools, make_work
from .queue import DONE, ERROR, ITEM, Job, QueueFull, QueueStopped, RequestQueue
from .settings import ServerSettings

log = logging.getLogger("toolgrad_edge.server")

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
SHUTTING_DOWN = APIError(503, "The server is shutting down; the request was not run.", type=SERVER,
                         code="shutting_down")


class ClientGone(Exception):
    """The client disconnected before its answer was ready: nobody reads a reply."""


class Server:
    """The queue, auth, limits and streaming that both APIs share, over one runtime."""

    def __init__(self, runtime: Any, settings: ServerSettings) -> None:
        self.settings = settings
        self.queue = RequestQueue(runtime, settings.max_queue)
        self.started_at = int(time.time())

    # -- the model ----------------------------------------------------------------

    def describe(self):
        """The engine's description (model, context, limits), or None while the model loads or if it failed."""
        runtime = self.queue.runtime
        return runtime.describe() if runtime is not None else None

    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        described = self.describe()
        if described is None:
            return "toolgrad-edge"
        return str(described.model_name or Path(described.model_path).stem)

    def ollama_names(self) -> ollama.ModelNames:
        described = self.describe()
        quantization = getattr(described.gguf, "file_type", None) if described is not None else None
        return ollama.ModelNames.of(self.model_name(), described.model_path if described else None, quantization)

    # -- a request's life ---------------------------------------------------------

    def check_api_key(self, request: Request) -> None:
        key_wanted = self.settings.api_key
        if key_wanted is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>' "
                           "(this server was started with --api-key)", type=AUTHENTICATION, code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), key_wanted.encode()):
            raise APIError(401, "Incorrect API key; it must match the server's --api-key",
                           type=AUTHENTICATION, code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it passes the limit."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = APIError(413, f"Request body is over the limit of {limit} bytes (serve --max-body-bytes "
                             "raises it).", code="request_too_large")
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

    async def loaded(self, request: Request) -> float:
        """Wait for a model still loading; return how long that took. A model that failed to load is the
        request's error (503)."""
        start = time.monotonic()
        queue = self.queue
        while queue.runtime is None and not queue.ready.is_set():
            if await request.is_disconnected():
                raise ClientGone()
            await asyncio.sleep(DISCONNECT_POLL_S)
        if queue.load_error is not None:
            raise translate(queue.load_error)
        return time.monotonic() - start

    async def compile(self, plan: RequestPlan) -> None:
        # Off the event loop: a thousand tools take a few tenths of a second to check and compile,
        # while the loop streams other requests' answers.
        await asyncio.to_thread(compile_tools, self.queue.runtime, plan, self.settings.syntax)

    async def start(self, plan: RequestPlan, request: Request) -> tuple[Job, tuple[str, Any]]:
        """Queue the plan's job and wait for its first event (an item or the result); refusals and
        failures raise."""
        job = Job(make_work(plan, self.settings.syntax), asyncio.get_running_loop())
        try:
            self.queue.submit(job)
        except QueueStopped:
            raise SHUTTING_DOWN from None
        except QueueFull as full:
            raise APIError(
                429, f"The server is busy: {full.waiting} requests are waiting (limit {self.queue.max_queue}). "
                f"Retry after {full.retry_after} s.",
                type=RATE_LIMIT, code="queue_full", headers={"Retry-After": str(full.retry_after)},
            ) from None
        try:
            first = await self._next_event(job, request)
        except ClientGone:  # _next_event cancelled the job
            raise
        except BaseException:
            self.queue.cancel(job)
            raise
        if first[0] == ERROR:
            raise translate(first[1])
        if first[0] == DONE:
            raise SHUTTING_DOWN
        return job, first

    async def _next_event(self, job: Job, request: Request) -> tuple[str, Any]:
        """The job's next event; drops the job if the client leaves while it waits."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.queue.cancel(job)
                    raise ClientGone() from None

    def stream(self, job: Job, first: tuple[str, Any], renderer: Any,
               headers: dict[str, str] | None = None) -> StreamingResponse:
        """The job's events, rendered by an API's stream renderer (``openai.OpenAIStream``, ``ollama.OllamaStream``)."""
        return StreamingResponse(self._pump(job, first, renderer), media_type=renderer.media_type,
                                 headers={**(headers or {}), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _pump(self, job: Job, first: tuple[str, Any], renderer: Any) -> AsyncIterator[str]:
        # Starlette cancels this generator when the client disconnects; the
        # finally block then stops the generation at its next token.
        try:
            for obj in renderer.start():
                yield renderer.line(obj)
            event = first
            while event[0] == ITEM:
                for obj in renderer.render(event[1]):
                    yield renderer.line(obj)
                event = await job.events.get()
            if event[0] == ERROR:
                yield renderer.line(renderer.error(translate(event[1])))
        except Exception as exc:  # a failure while rendering: still an orderly end
            yield renderer.line(renderer.error(translate(exc)))
        finally:
            self.queue.cancel(job)
        for line in renderer.end():
            yield line

    def shutdown(self) -> None:
        """Stop taking requests: running jobs end at their next token (their streams end properly), waiting
        ones are answered 503. Does not wait; the app's shutdown step joins the worker."""
        log.info("shutting down: running requests end at their next token, waiting ones get 503")
        self.queue.close()


def create_app(runtime: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The server app over ``runtime``: a ToolRuntime-like object, or a factory returning one.

    A runtime passed in stays the caller's to close; one made by a factory
    (called on the worker thread at start-up) is closed at shutdown.
    """
    server = Server(runtime, settings or ServerSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.queue.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.queue.stop)

    app = FastAPI(title="toolgrad-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.state.queue = server.queue
    app.state.settings = server.settings
    _add_error_handlers(app)
    _add_openai_routes(app, server)
    _add_ollama_routes(app, server)
    return app


def _is_ollama(request: Request) -> bool:
    return request.url.path == "/api" or request.url.path.startswith("/api/")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an APIError: in Ollama's shape on /api/*, in OpenAI's elsewhere."""

    def error_response(err: APIError, request: Request) -> JSONResponse:
        body = err.ollama_body() if _is_ollama(request) else err.openai_body()
        return JSONResponse(body, status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        return JSONResponse({}, status_code=499)  # nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = NOT_FOUND if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(APIError(exc.status_code, message, type=kind, headers=getattr(exc, "headers", None)),
                              request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(APIError(400, f"Invalid request: {exc.errors()[0].get('msg')}"), request)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(translate(exc), request)


def _add_openai_routes(app: FastAPI, server: Server) -> None:
    def model_card() -> dict[str, Any]:
        return {"id": server.model_name(), "object": "model", "created": server.started_at,
                "owned_by": "toolgrad-edge"}

    @app.get("/health")
    async def health() -> JSONResponse:
        queue = server.queue
        if queue.load_error is not None:
            return JSONResponse({"status": "error", "error": str(queue.load_error)}, status_code=503)
        if queue.runtime is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": server.model_name(), "queue": queue.stats()})

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        server.check_api_key(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        server.check_api_key(request)
        name = server.model_name()
        if model_id != name:
            raise APIError(404, f"Model {model_id!r} is not served here; this server serves {name!r}",
                           type=NOT_FOUND, param="model", code="model_not_found")
        return JSONResponse(model_card())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.check_api_key(request)
        body = await server.read_body(request)
        await server.loaded(request)
        plan = await asyncio.to_thread(openai.parse_chat_request, body, server.settings)
        await server.compile(plan)
        job, first = await server.start(plan, request)
        completion_id, model = openai.new_completion_id(), server.model_name()
        if not plan.stream:
            return JSONResponse(openai.completion_body(first[1], completion_id=completion_id,
                                                       created=int(time.time()), model=model))
        return server.stream(job, first, openai.OpenAIStream(completion_id=completion_id, model=model,
                                                             include_usage=plan.include_usage))


def _add_ollama_routes(app: FastAPI, server: Server) -> None:
    settings = server.settings

    @app.get("/")
    @app.head("/")
    async def root() -> PlainTextResponse:
        # Ollama answers "Ollama is running" here; apps probe it to check the URL.
        return PlainTextResponse("toolgrad-edge is running (Ollama API at /api, OpenAI API at /v1)")

    @app.get("/api/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": ollama.OLLAMA_API_VERSION, "toolgrad_edge": __version__})

    @app.get("/api/tags")
    async def tags(request: Request) -> JSONResponse:
        server.check_api_key(request)
        await server.loaded(request)
        return JSONResponse({"models": [ollama.model_entry(server.ollama_names(), server.describe())]})

    @app.get("/api/ps")
    async def ps(request: Request) -> JSONResponse:
        server.check_api_key(request)
        await server.loaded(request)
        return JSONResponse({"models": [ollama.running_entry(server.ollama_names(), server.describe())]})

    @app.post("/api/show")
    async def show(request: Request) -> JSONResponse:
        server.check_api_key(request)
        body = await server.read_body(request)
        await server.loaded(request)
        req = ollama.validated_request(ollama.ShowRequestIn, body, settings)
        names = server.ollama_names()
        names.check(req.model or req.name or "")
        return JSONResponse(ollama.show_body(names, server.describe(), settings))

    @app.post("/api/chat")
    async def chat(request: Request):
        return await answer(request, ollama.parse_chat)

    @app.post("/api/generate")
    async def generate(request: Request):
        return await answer(request, ollama.parse_generate)

    async def answer(request: Request, parse) -> Response:
        arrived = time.monotonic()
        server.check_api_key(request)
        body = await server.read_body(request)
        load_s = await server.loaded(request)
        plan = await asyncio.to_thread(parse, body, settings, server.ollama_names())
        if plan.chat is None:
            return JSONResponse(ollama.load_body(plan))
        await server.compile(plan.chat)
        headers = {"X-Toolgrad-Ignored-Options": ", ".join(plan.ignored_options)} if plan.ignored_options else {}
        job, first = await server.start(plan.chat, request)
        if not plan.stream:
            body = ollama.final_body(plan, first[1], time.monotonic() - arrived, load_s, streamed=False)
            return JSONResponse(body, headers=headers)
        return server.stream(job, first, ollama.OllamaStream(plan, arrived, load_s), headers)

    for path, (methods, _) in ollama.REFUSED.items():
        app.add_api_route(path, _refused(path, server), methods=list(methods))


def _refused(path: str, server: Server):
    async def refused(request: Request) -> Response:
        server.check_api_key(request)
        raise ollama.refusal(path)

    refused.__name__ = "refused_" + path.strip("/").replace("/", "_").replace("{", "").replace("}", "")
    return refused
