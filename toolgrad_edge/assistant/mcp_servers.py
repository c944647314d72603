"""MCP servers as tool sources, through the official ``mcp`` SDK (the ``mcp`` extra).

A server is given as a command line (split as a shell would) or as an entry of
a ``{"mcpServers": {...}}`` config file, the form desktop MCP clients use:
``command`` + ``args`` + ``env`` for a stdio server, ``url`` for a streamable
HTTP one. The SDK is async; :class:`LoopThread` runs one asyncio loop in a
background thread so the assistant's sync API can drive it, and each
:class:`McpServer` keeps its transport and session inside one task on that
loop (anyio's cancel scopes must be entered and left by the same task).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import json
import os
import shlex
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Coroutine

from ..errors import ToolSourceError

MISSING_EXTRA = "MCP servers need the MCP SDK: pip install 'toolgrad-edge[mcp]'"

START_TIMEOUT_S = 30.0
# After a call times out, a server that does not answer a ping within this long is hung: it is ended.
PING_TIMEOUT_S = 5.0
STDERR_TAIL_LINES = 5
# Interpreters and launchers whose first argument names the server better than they do.
LAUNCHERS = {"python", "python3", "node", "deno", "bun", "uv", "uvx", "npx", "pipx", "bash", "sh"}


def _imports():
    try:
        import mcp
        from mcp.client.stdio import StdioServerParameters, stdio_client
    except ImportError:
        raise ToolSourceError(MISSING_EXTRA) from None
    return mcp, StdioServerParameters, stdio_client


@dataclass(frozen=True)
class ServerSpec:
    """How to reach one MCP server: a stdio command, or a streamable HTTP URL."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict, hash=False)
    url: str | None = None

    @property
    def command_line(self) -> str:
        return self.url if self.url else shlex.join((self.command or "", *self.args))


def _program_name(argv: list[str]) -> str:
    """The server's name from its command line: `python -m mcp_server_time` -> mcp_server_time."""
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    first = Path(argv[0]).name
    if first.split(".")[0].rstrip("0123456789.") in LAUNCHERS or first in LAUNCHERS:
        for arg in argv[1:]:
            if not arg.startswith("-"):
                return Path(arg).stem
    return Path(first).stem or first


def server_from_command(command_line: str, name: str | None = None) -> ServerSpec:
    """A stdio server from a command line, split as a POSIX shell would."""
    try:
        argv = shlex.split(command_line)
    except ValueError as exc:
        raise ToolSourceError(f"--mcp {command_line!r}: cannot split the command line ({exc}).") from None
    if not argv:
        raise ToolSourceError("--mcp: the command line is empty.")
    return ServerSpec(name=name or _program_name(argv), command=argv[0], args=tuple(argv[1:]))


def servers_from_config(path: str | os.PathLike) -> list[ServerSpec]:
    """The servers of a ``{"mcpServers": {NAME: {...}}}`` config file."""
    where = os.fspath(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ToolSourceError(f"{where}: cannot read the MCP config file ({exc.strerror or exc}).") from None
    except json.JSONDecodeError as exc:
        raise ToolSourceError(f"{where}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}.") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ToolSourceError(f'{where}: expected an object '
                              '{"mcpServers": {NAME: {"command": ..., "args": [...]}}}, '
                              f"found {type(data).__name__} without an mcpServers object.")
    specs = []
    for name, entry in servers.items():
        label = f"{where}: mcpServers.{name}"
        if not isinstance(entry, dict):
            raise ToolSourceError(f"{label}: expected an object, found {type(entry).__name__}.")
        env = entry.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise ToolSourceError(f"{label}.env: expected an object of strings.")
        if entry.get("url") is not None:
            if not isinstance(entry["url"], str) or not entry["url"].startswith(("http://", "https://")):
                raise ToolSourceError(f"{label}.url: expected an http(s) URL, found {entry['url']!r}.")
            specs.append(ServerSpec(name=name, url=entry["url"], env=dict(env)))
            continue
        command, args = entry.get("command"), entry.get("args") or []
        if not isinstance(command, str) or not command:
            raise ToolSourceError(f'{label}: expected "command" (a string) or "url".')
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ToolSourceError(f"{label}.args: expected a list of strings.")
        specs.append(ServerSpec(name=name, command=command, args=tuple(args), env=dict(env)))
    return specs


def unique_names(specs: list[ServerSpec]) -> list[ServerSpec]:
    """Give servers that share a name (two `python -m x` commands) the suffixes -2, -3, ..."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        n = seen.get(spec.name, 0) + 1
        seen[spec.name] = n
        out.append(spec if n == 1 else ServerSpec(f"{spec.name}-{n}", spec.command, spec.args, spec.env, spec.url))
    return out


class LoopThread:
    """One asyncio loop in a daemon thread: sync code submits coroutines to it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="toolgrad-assistant-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class ToolOutcome:
    """What one call gave back: the text the model reads, and whether it is an error."""

    text: str
    is_error: bool = False


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    exc = _leaf(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def outcome_from_result(result: Any) -> ToolOutcome:
    """An MCP CallToolResult as text: text blocks joined, else the structured content as JSON."""
    texts = []
    for block in result.content or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            texts.append(block.text)
        elif kind == "resource" and getattr(block.resource, "text", None) is not None:
            texts.append(block.resource.text)
        else:
            mime = getattr(block, "mime_type", None) or getattr(block, "mimeType", None) or ""
            texts.append(f"[{kind} content{' ' + mime if mime else ''} not shown]")
    if not texts and result.structured_content is not None:
        texts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return ToolOutcome("\n".join(texts), bool(result.is_error))


class McpServer:
    """One connected MCP server: its tools, and calls to them.

    ``state`` is starting, running, gone (the connection dropped: every later
    call says so) or closed.
    """

    def __init__(self, spec: ServerSpec, loop: LoopThread, start_timeout: float = START_TIMEOUT_S):
        self.spec = spec
        self.name = spec.name
        self.tools: list[Any] = []
        self.state = "starting"
        self.gone_reason = ""
        self._loop = loop
        self._start_timeout = start_timeout
        self._session = None
        self._task: asyncio.Task | None = None
        self._closing: asyncio.Event | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") if not spec.url else None

    # -- start ------------------------------------------------------------------
    def start(self) -> None:
        """Spawn or connect, initialize, list the tools; ToolSourceError quoting the command line if that fails."""
        _imports()
        starting = self._loop.submit(self._start())
        try:
            starting.result()
        except ToolSourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to start is reported the same way
            self.state = "gone"
            raise ToolSourceError(self._start_failure(_describe(exc))) from None
        except BaseException:
            # Ctrl-C or SIGTERM (the CLI raises it) while it starts: cancelling the start ends the
            # process it spawned; the interruption goes on.
            starting.cancel()
            concurrent.futures.wait([starting], timeout=START_TIMEOUT_S)
            self.state = "gone"
            raise

    def _start_failure(self, reason: str) -> str:
        message = f"MCP server {self.name!r} failed to start: {self.spec.command_line} ({reason})."
        tail = self.stderr_tail()
        return f"{message} Last lines of its stderr: {tail}" if tail else message

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> str:
        if self._stderr is None or self._stderr.closed:
            return ""
        try:
            self._stderr.flush()
            self._stderr.seek(0)
            text = self._stderr.read()
        except (OSError, ValueError):
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())

    async def _start(self) -> None:
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self._closing = asyncio.Event()
        self._task = asyncio.create_task(self._serve(ready))
        try:
            self.tools = await asyncio.wait_for(asyncio.shield(ready), self._start_timeout)
        except asyncio.TimeoutError:
            await self._stop_task()
            self.state = "gone"
            reason = f"no answer to initialize within {self._start_timeout:g} s"
            raise ToolSourceError(self._start_failure(reason)) from None
        except BaseException:
            await self._stop_task()
            raise
        self.state = "running"

    async def _serve(self, ready: asyncio.Future) -> None:
        from contextlib import AsyncExitStack

        mcp, StdioServerParameters, stdio_client = _imports()
        try:
            async with AsyncExitStack() as stack:
                if self.spec.url:
                    from mcp.client.streamable_http import streamable_http_client

                    streams = await stack.enter_async_context(streamable_http_client(self.spec.url))
                else:
                    # The SDK passes only a few variables by default: give the caller's whole environment.
                    params = StdioServerParameters(command=self.spec.command, args=list(self.spec.args),
                                                   env={**os.environ, **self.spec.env})
                    streams = await stack.enter_async_context(stdio_client(params, errlog=self._stderr))
                session = await stack.enter_async_context(mcp.ClientSession(streams[0], streams[1]))
                await session.initialize()
                tools, cursor = [], None
                while True:
                    params = mcp.types.PaginatedRequestParams(cursor=cursor) if cursor else None
                    page = await session.list_tools(params=params)
                    tools += page.tools
                    cursor = page.next_cursor
                    if not cursor:
                        break
                self._session = session
                ready.set_result(tools)
                await self._closing.wait()
        except asyncio.CancelledError:
            if not ready.done():
                ready.set_exception(ToolSourceError(self._start_failure("cancelled")))
            raise
        except BaseException as exc:  # noqa: BLE001 - reported through `ready` or the server's state
            if not ready.done():
                ready.set_exception(exc)
            elif self.state == "running":
                self._mark_gone(f"its connection failed ({_describe(exc)})")
        finally:
            self._session = None

    async def _stop_task(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        if self._closing is not None:
            self._closing.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 10)
        except BaseException:  # noqa: BLE001 - shutting down: cancel what is left
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001
                pass

    def _mark_gone(self, reason: str) -> None:
        if self.state in ("running", "starting"):
            self.state = "gone"
            tail = self.stderr_tail(2)
            self.gone_reason = f"{reason}{'; stderr: ' + tail if tail else ''}"

    # -- calls --------------------------------------------------------------------
    async def call(self, name: str, arguments: dict, timeout: float) -> ToolOutcome:
        """Call one tool (on the loop thread). Failures come back as error outcomes, never raised."""
        if self.state != "running" or self._session is None:
            reason = self.gone_reason or self.state
            return ToolOutcome(f"MCP server {self.name!r} is gone ({reason}); its tools cannot run.", True)
        import mcp

        session = self._session
        try:
            result = await asyncio.wait_for(
                session.call_tool(name, arguments, read_timeout_seconds=timeout), timeout + 2)
        except asyncio.TimeoutError:
            return await self._timed_out(session, name, timeout)
        except mcp.MCPError as exc:
            if "timed out" in exc.message:
                return await self._timed_out(session, name, timeout)
            if exc.code == -32000:  # CONNECTION_CLOSED: the server exited or closed its pipes
                self._mark_gone("it exited during a call")
                return ToolOutcome(f"MCP server {self.name!r} died during the call to {name} "
                                   f"({self.gone_reason}).", True)
            return ToolOutcome(f"{name} failed: {exc.message}", True)
        except Exception as exc:  # noqa: BLE001 - a transport failure becomes the call's result
            self._mark_gone(f"its connection failed ({_describe(exc)})")
            return ToolOutcome(f"MCP server {self.name!r} failed during the call to {name} ({_describe(exc)}).", True)
        return outcome_from_result(result)

    async def _timed_out(self, session, name: str, timeout: float) -> ToolOutcome:
        """A call ran past its timeout: the server stays if it still answers a ping, else it is ended."""
        message = f"{name} timed out after {timeout:g} s (MCP server {self.name!r})"
        try:
            await asyncio.wait_for(session.send_ping(), PING_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except BaseException:  # noqa: BLE001 - no answer, or an answer that is not one: the server is hung
            if self.state == "running":
                self._mark_gone(f"it stopped answering (no reply to a ping after {name} timed out)")
                await self._stop_task()  # ends the process; later calls say the server is gone
            return ToolOutcome(f"{message}; the server stopped answering and was ended.", True)
        return ToolOutcome(f"{message}.", True)

    # -- close --------------------------------------------------------------------
    async def aclose(self) -> None:
        """End the session and the server process (on the loop thread)."""
        await self._stop_task()
        if self.state != "gone":
            self.state = "closed"

    def close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()


_LIVE: "set[Any]" = set()


def _close_all_at_exit() -> None:
    for owner in list(_LIVE):
        try:
            owner.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


atexit.register(_close_all_at_exit)


def register_owner(owner: Any) -> None:
    """Make sure `owner.close()` runs at exit, so no server process outlives the program."""
    _LIVE.add(owner)


def unregister_owner(owner: Any) -> None:
    _LIVE.discard(owner)
