"""The assistant: the model calls tools, the calls run, the results go back to the model.

One question (:meth:`Assistant.ask`) runs rounds: the model answers under the
tools' grammar; if it called tools, the calls of that round run concurrently
(each with a timeout, after the permission check), their results join the
conversation as ``tool`` messages, and the model answers again, up to
``max_rounds`` model turns. The conversation is one growing message list
rendered with the model's own text for its earlier answers, so each round
after the first starts from the runtime's KV cache and evaluates only its new
tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..errors import ToolSourceError
from ..grammars import ToolCall
from .functions import function_tool, result_text
from .mcp_servers import (LoopThread, McpServer, ServerSpec, ToolOutcome, register_owner, server_from_command,
                          servers_from_config, unique_names, unregister_owner)
from .permissions import Decision, Permissions
from .toolbox import (MAX_RESULT_CHARS, ToolEntry, compile_entries, cut_result, file_entries, function_entries,
                      mcp_entries, resolve_names)

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_ROUNDS = 4
NOT_RUN = "not run: this tool comes from a JSON tool file and has nothing to run it"
INTERRUPTED = "Abandoned: the user interrupted the call (Ctrl-C)."


@dataclass
class CallRecord:
    """One tool call of a round and what came of it."""

    name: str
    arguments: dict
    result: str | None = None   # None: not run (a JSON-file tool)
    is_error: bool = False
    approved: bool = False      # True for every call that ran
    source: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "arguments": self.arguments, "result": self.result,
                "is_error": self.is_error, "approved": self.approved}


@dataclass
class Round:
    """One model turn that called tools, and the calls' outcomes."""

    tool_calls: list[CallRecord]
    model_text: str = ""


@dataclass
class TurnUsage:
    """Tokens and seconds of one model turn."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    model_s: float
    tools_s: float = 0.0

    @property
    def evaluated_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class Transcript:
    """What one question gave: the rounds of calls, the answer, and the cost."""

    answer: str | None = None
    rounds: list[Round] = field(default_factory=list)
    turns: list[TurnUsage] = field(default_factory=list)
    stopped: str = ""  # why there is no answer: no-followup, not-run, max-rounds, interrupted, length

    @property
    def usage(self) -> dict:
        return {
            "model_turns": len(self.turns),
            "prompt_tokens": sum(t.prompt_tokens for t in self.turns),
            "cached_tokens": sum(t.cached_tokens for t in self.turns),
            "evaluated_tokens": sum(t.evaluated_tokens for t in self.turns),
            "completion_tokens": sum(t.completion_tokens for t in self.turns),
            "model_seconds": round(sum(t.model_s for t in self.turns), 3),
            "tool_seconds": round(sum(t.tools_s for t in self.turns), 3),
        }

    def to_dict(self) -> dict:
        return {"answer": self.answer, "rounds": [{"tool_calls": [c.to_dict() for c in r.tool_calls]}
                                                  for r in self.rounds], "usage": self.usage}


class Assistant:
    """A model with tools that run: Python functions, MCP servers and JSON tool files, mixed.

    ``runtime`` is a ToolRuntime (or anything with its ``call()``). ``tools``
    holds Python callables (plain or marked with :func:`tool`); ``mcp`` holds
    server command lines or :class:`ServerSpec`; ``mcp_config`` a
    ``{"mcpServers": ...}`` file; ``tool_files`` JSON tool files, whose calls
    are shown but not run. With ``strict=True`` a server that fails to start
    raises ToolSourceError; otherwise it is left out and named in ``warnings``.

    Use as a context manager (sync or async), or call :meth:`close`: the MCP
    sessions end and their processes are reaped.
    """

    def __init__(self, runtime: Any, tools: Iterable[Any] = (), mcp: Iterable[str | ServerSpec] = (),
                 mcp_config: str | None = None, tool_files: Iterable[str] = (), *,
                 permissions: Permissions | None = None, tool_choice: str = "auto",
                 max_rounds: int = DEFAULT_MAX_ROUNDS, followup: bool = True,
                 timeout: float = DEFAULT_TIMEOUT_S, max_result_chars: int = MAX_RESULT_CHARS,
                 strict: bool = True, on_event: Callable[[str, Any], None] | None = None,
                 **generation: Any):
        if max_rounds < 1:
            raise ToolSourceError(f"max_rounds must be at least 1, got {max_rounds}.")
        self.runtime = runtime
        self.permissions = permissions or Permissions()
        self.tool_choice = tool_choice
        self.max_rounds = max_rounds
        self.followup = followup
        self.timeout = timeout
        self.max_result_chars = max_result_chars
        self.generation = generation
        self.on_event = on_event or (lambda kind, payload: None)
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.history: list[dict] = []
        self.servers: list[McpServer] = []
        self._loop: LoopThread | None = None
        self._closed = False
        register_owner(self)
        try:
            entries = self._collect(list(tools), list(mcp), mcp_config, list(tool_files), strict)
        except BaseException:
            self.close()
            raise
        entries, self.notes = resolve_names(entries)
        self.entries, skipped = compile_entries(entries)
        self.warnings += skipped
        self._by_name = {e.name: e for e in self.entries}
        self.tools = [e.tool for e in self.entries]

    # -- sources --------------------------------------------------------------------
    def _collect(self, functions, mcp, mcp_config, tool_files, strict) -> list[ToolEntry]:
        entries = function_entries([function_tool(f) for f in functions])
        specs = [s if isinstance(s, ServerSpec) else server_from_command(s) for s in mcp]
        if mcp_config:
            specs += servers_from_config(mcp_config)
        for spec in unique_names(specs):
            server = McpServer(spec, self.loop)
            try:
                server.start()
            except ToolSourceError as exc:
                server.close_stderr()
                if strict:
                    raise
                self.warnings.append(f"{exc} Going on without it.")
                continue
            self.servers.append(server)
            entries += mcp_entries(server)
        for path in tool_files:
            entries += file_entries(path)
        return entries

    @property
    def loop(self) -> LoopThread:
        if self._loop is None:
            self._loop = LoopThread()
        return self._loop

    # -- the conversation ---------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (the tools and servers stay)."""
        self.history = []

    def ask(self, text: str) -> Transcript:
        """Answer one user message, running the tools it takes; the conversation keeps it."""
        start = len(self.history)
        self.history.append({"role": "user", "content": text})
        try:
            return self._rounds()
        except BaseException:
            # A failed turn leaves no half-answered question behind.
            del self.history[start:]
            raise

    def _rounds(self) -> Transcript:
        transcript = Transcript()
        for turn in range(self.max_rounds):
            if turn == 0:
                choice = self.tool_choice
            else:
                # After the first turn the model may call again, and must answer in text on the last one.
                choice = "none" if turn == self.max_rounds - 1 else "auto"
            t0 = time.perf_counter()
            result = self.runtime.call(self.history, self.tools, tool_choice=choice, **self.generation)
            usage = TurnUsage(result.usage.prompt_tokens, result.usage.cached_tokens,
                              result.usage.completion_tokens, time.perf_counter() - t0)
            transcript.turns.append(usage)
            self.on_event("model", result)
            if not result.tool_calls:
                if result.finish_reason == "length" and getattr(result, "parse_error", None):
                    # A call list cut at max_tokens before any call was complete: no answer, no call.
                    self.history.append({"role": "assistant", "content": result.raw_text,
                                         "raw_text": result.raw_text})
                    transcript.stopped = "length"
                    return transcript
                transcript.answer = result.content
                self.history.append({"role": "assistant", "content": result.content or "",
                                     "raw_text": result.raw_text,
                                     "raw_tokens": list(getattr(result, "token_ids", None) or [])})
                if result.finish_reason == "length":
                    transcript.stopped = "length"
                return transcript
            # The model's own text (and its tokens, when the runtime gives them) renders the next
            # prompt so that its tokens match the KV cache through the end of this answer.
            self.history.append({
                "role": "assistant", "content": None, "raw_text": result.raw_text,
                "raw_tokens": list(getattr(result, "token_ids", None) or []),
                "tool_calls": [{"id": f"call_{len(self.history)}_{i}", "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments}}
                               for i, c in enumerate(result.tool_calls)],
            })
            t1 = time.perf_counter()
            records, interrupted = self.run_calls(result.tool_calls)
            usage.tools_s = time.perf_counter() - t1
            transcript.rounds.append(Round(records, result.raw_text))
            ids = [c["id"] for c in self.history[-1]["tool_calls"]]
            for call_id, record in zip(ids, records):
                content = record.result if record.result is not None else f"({NOT_RUN})"
                self.history.append({"role": "tool", "tool_call_id": call_id, "name": record.name,
                                     "content": content})
            if interrupted:
                transcript.stopped = "interrupted"
                return transcript
            if all(r.result is None for r in records):
                # Only JSON-file tools were called: there are no results for the model to read.
                transcript.stopped = "not-run"
                return transcript
            if not self.followup:
                transcript.stopped = "no-followup"
                return transcript
        transcript.stopped = "max-rounds"
        return transcript

    # -- running calls ------------------------------------------------------------------
    def run_calls(self, calls: list[ToolCall]) -> tuple[list[CallRecord], bool]:
        """Check permission for each call, run the approved ones concurrently; (records, interrupted)."""
        self.on_event("calls", calls)
        records: list[CallRecord] = []
        jobs: list[tuple[CallRecord, ToolEntry, ToolCall]] = []
        for call in calls:
            entry = self._by_name.get(call.name)
            record = CallRecord(call.name, dict(call.arguments), source=entry.source if entry else "")
            records.append(record)
            if entry is None:
                record.result, record.is_error = f"unknown tool {call.name!r}; it was not run.", True
            elif not entry.runnable:
                record.result = None
            else:
                decision: Decision = self.permissions.decide(entry, call)
                self.on_event("decision", (record, decision))
                if decision.approved:
                    record.approved = True
                    jobs.append((record, entry, call))
                else:
                    record.result = Permissions.refusal_text(decision, entry)
        if not jobs:
            for record in records:
                self.on_event("result", record)
            return records, False
        futures: list[concurrent.futures.Future] = []
        interrupted = False
        try:
            # Submitted inside the try: a tool may already be running (and Ctrl-C pressed)
            # before the last one is submitted.
            for _, entry, call in jobs:
                futures.append(self.loop.submit(self._execute(entry, call)))
            concurrent.futures.wait(futures)
        except KeyboardInterrupt:
            # Cancel what still runs on the loop; a sync function's thread is abandoned (a daemon).
            interrupted = True
            for future in futures:
                future.cancel()
        for i, (record, _, _) in enumerate(jobs):
            future = futures[i] if i < len(futures) else None
            if future is not None and future.done() and not future.cancelled():
                outcome, record.seconds = future.result()
            else:
                outcome = ToolOutcome(INTERRUPTED, True)
            record.result = cut_result(outcome.text, self.max_result_chars)
            record.is_error = outcome.is_error
        for record in records:
            self.on_event("result", record)
        return records, interrupted

    async def _execute(self, entry: ToolEntry, call: ToolCall) -> tuple[ToolOutcome, float]:
        t0 = time.perf_counter()
        if entry.kind == "mcp":
            outcome = await entry.server.call(entry.original_name, call.arguments, self.timeout)
        else:
            outcome = await self._call_function(entry, call)
        return outcome, time.perf_counter() - t0

    async def _call_function(self, entry: ToolEntry, call: ToolCall) -> ToolOutcome:
        function = entry.function
        try:
            kwargs = function.validate(call.arguments)
        except ValueError as exc:
            return ToolOutcome(str(exc), True)
        try:
            if function.is_async:
                value = await asyncio.wait_for(function.fn(**kwargs), self.timeout)
            else:
                value = await asyncio.wait_for(_in_daemon_thread(function.fn, kwargs), self.timeout)
        except asyncio.TimeoutError:
            return ToolOutcome(f"{entry.name} timed out after {self.timeout:g} s.", True)
        except Exception as exc:  # noqa: BLE001 - the tool's own failure is the call's result
            return ToolOutcome(f"{entry.name} raised {type(exc).__name__}: {exc}", True)
        return ToolOutcome(result_text(value))

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """End every MCP session and reap the server processes. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        unregister_owner(self)
        if self._loop is not None:
            for server in self.servers:
                try:
                    self._loop.run(server.aclose(), timeout=15)
                except BaseException:  # noqa: BLE001 - keep closing the others
                    pass
                server.close_stderr()
            self._loop.close()

    async def aclose(self) -> None:
        """close() from async code, without blocking the caller's event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> "Assistant":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "Assistant":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def _in_daemon_thread(fn: Callable, kwargs: dict) -> "asyncio.Future":
    """Run a sync function in a daemon thread: a call abandoned on timeout or Ctrl-C never blocks exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(exc: BaseException | None, value: Any) -> None:
        if not future.done():
            future.set_exception(exc) if exc is not None else future.set_result(value)

    def run() -> None:
        try:
            value, exc = fn(**kwargs), None
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
            value, exc = None, error
        try:
            loop.call_soon_threadsafe(settle, exc, value)
        except RuntimeError:
            pass  # the loop closed while the abandoned call ran

    threading.Thread(target=run, name=f"tool-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return future
