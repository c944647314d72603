"""``toolgrad-edge serve``: the OpenAI-compatible local server."""

from __future__ import annotations

import os

import click

from ..errors import ToolgradEdgeError
from .options import (engine_option, kv_type_option, model_option, n_ctx_option, swa_full_option, syntax_option,
                      threads_help)


def _default(name: str):
    from ..server.settings import ServerSettings

    return getattr(ServerSettings(), name)


@click.command("serve")
@model_option
@engine_option
@click.option("--host", default=_default("host"), show_default=True,
              help="Address to bind. The default is loopback: only this machine can connect.")
@click.option("--port", default=_default("port"), show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="TOOLGRAD_EDGE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 and /api routes (or set $TOOLGRAD_EDGE_API_KEY; Ollama clients: $OLLAMA_API_KEY).")
@click.option("--max-queue", default=_default("max_queue"), show_default=True, type=click.IntRange(1),
              help="Requests that may wait behind the running one; more get 429 with Retry-After.")
@click.option("--max-body-bytes", default=_default("max_body_bytes"), show_default=True, type=click.IntRange(1024),
              help="Largest request body accepted (413 above).")
@click.option("--max-tools", default=_default("max_tools"), show_default=True, type=click.IntRange(1),
              help="Most tools one request may carry (400 above).")
@click.option("--max-tokens-limit", default=_default("max_tokens_limit"), show_default=True,
              type=click.IntRange(1), help="Largest max_tokens a request may ask for (400 above).")
@click.option("--default-max-tokens", default=_default("default_max_tokens"), show_default=True,
              type=click.IntRange(1), help="max_tokens for requests that name none.")
@click.option("--tool-choice", "tool_choice", type=click.Choice(["auto", "required", "required-first", "none"]),
              default=_default("tool_choice"), show_default=True,
              help="The tool choice of a request that sends tools but names none, on both APIs (Ollama's has "
                   "no such field): 'required' forces a call, as clients that never send tool_choice need; "
                   "'required-first' forces one only when the last message is the user's and allows text after "
                   "tool results, so agent loops end.")
@syntax_option
@n_ctx_option
@kv_type_option
@swa_full_option
@click.option("--threads", "n_threads", type=click.IntRange(1), default=None, help=threads_help)
@click.option("--n-gpu-layers", default="auto", show_default=True,
              help="Layers to offload when llama.cpp has a GPU back-end: 'auto' (all) or a number.")
@click.option("--parallel", "parallel", default="auto", show_default=True, metavar="auto|N",
              help="Requests decoded at once in one context (continuous batching; each keeps its own grammar). "
                   "'auto' chooses from the threads and the RAM for N sequences' KV cache (doctor says why); "
                   "1 decodes one request at a time, as before. A llama-server engine uses its own slots.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True)
def serve(model, host, port, api_key, max_queue, max_body_bytes, max_tools, max_tokens_limit,
          default_max_tokens, tool_choice, syntax, n_ctx, kv_type, swa_full, n_threads, n_gpu_layers,
          parallel, log_level, engine=None) -> None:
    """Serve OpenAI's chat-completions API and Ollama's API for the model, on this machine.

    POST /v1/chat/completions (tools, tool_choice, streaming, response_format),
    GET /v1/models and GET /health; Ollama's /api/chat, /api/generate,
    /api/tags, /api/show, /api/ps and /api/version on the same port
    (docs/ollama.md). Up to --parallel requests decode at once in one
    context, the others wait in arrival order; the tool prefix is shared by
    all of them.

    \b
    Examples:
      toolgrad-edge serve
      toolgrad-edge serve --model toolgrad-4b-Q4_K_M.gguf --port 8000
      toolgrad-edge serve --api-key secret --max-queue 4
      toolgrad-edge serve --parallel 8          # 8 clients at once
      toolgrad-edge serve --tool-choice required --port 11434   # for Ollama apps
      OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=secret python my_agent.py
    """
    try:
        import uvicorn  # noqa: F401  (checked before the model loads)
        import fastapi  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "the server needs FastAPI and uvicorn: pip install 'toolgrad-edge[server]'"
        ) from None
    from ..runtime import ToolRuntime
    from ..server import ServerSettings, create_app

    settings = ServerSettings(
        host=host, port=port, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes,
        max_tools=max_tools, max_tokens_limit=max_tokens_limit, default_max_tokens=default_max_tokens,
        syntax=syntax, tool_choice=tool_choice,
    )
    gpu_layers = n_gpu_layers if n_gpu_layers == "auto" else _int_option("--n-gpu-layers", n_gpu_layers)
    parallel = parallel if parallel == "auto" else _parallel_option(parallel)
    with ToolRuntime(model=model, n_gpu_layers=gpu_layers, n_threads=n_threads, n_ctx=n_ctx, kv_type=kv_type,
                     swa_full=swa_full, engine=engine, parallel=parallel) as runtime:
        app = create_app(runtime, settings)
        shown_host = f"[{host}]" if ":" in host else host
        click.echo(f"toolgrad-edge: serving {runtime.model_path} at http://{shown_host}:{port}/v1 "
                   f"(OpenAI) and http://{shown_host}:{port}/api (Ollama)")
        reason = getattr(runtime, "parallel_reason", None)
        if reason is not None:
            click.echo(f"Decoding up to {runtime.concurrency} requests at once: {reason}.")
        if settings.is_loopback:
            click.echo(f"Bound to {host} (loopback): only this machine can connect. "
                       "Use --host 0.0.0.0 to accept other machines.")
        else:
            click.echo(f"WARNING: bound to {host}: other machines on the network can connect.", err=True)
            if api_key is None:
                click.echo("WARNING: no --api-key set: anyone who can reach this port can use the model.", err=True)
        _run_uvicorn(app, host, port, log_level)


GRACEFUL_SHUTDOWN_S = 5  # after SIGTERM: how long open connections may take to end before they are closed


def _run_uvicorn(app, host: str, port: int, log_level: str) -> None:
    """Run the app until SIGTERM or SIGINT.

    The first signal stops the queue before uvicorn waits for open connections
    (running streams end at their next token with a proper last chunk, waiting
    requests get 503), and uvicorn closes connections still open after
    GRACEFUL_SHUTDOWN_S; the process then exits 0. A second signal exits at once.
    """
    import signal

    import uvicorn

    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            if self.should_exit:
                click.echo("toolgrad-edge: second signal, exiting now.", err=True)
                os._exit(128 + sig)
            app.state.server.shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    # uvicorn raises a signal it handled again once it has shut down; by then the server stopped as asked,
    # so that signal ends nothing more and the command returns (exit 0).
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        StoppingServer(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _int_option(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ToolgradEdgeError(f"{name} must be 'auto' or a whole number, got {value!r}") from None


def _parallel_option(value: str) -> int:
    n = _int_option("--parallel", value)
    if n < 1:
        raise ToolgradEdgeError(f"--parallel must be 'auto' or at least 1, got {value!r}")
    return n
