"""A small MCP server of the tests' own, for deterministic checks.

Run as ``python tests/mcp_fixtures/recorder_server.py`` (stdio), or with
``--http PORT`` for streamable HTTP on 127.0.0.1. Tools:

* ``record``: appends its arguments as one JSON line to $RECORD_FILE (a side effect).
* ``lookup``: read-only; returns a fixed value, or an environment variable.
* ``fail``: raises, so the call comes back with isError.
* ``slow``: sleeps, to run past a caller's timeout.
* ``meet``: answers once ``parties`` calls of it run at the same time (fails after 30 s alone).
* ``huge``: returns a result of the requested size.
* ``freeze``: the process stops (SIGSTOP) in the middle of the call: a hung server.
* ``die``: the process exits in the middle of the call.

Every call is also logged (tool and arguments, as received) to $CALL_LOG when it is set.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

server = MCPServer(os.environ.get("FIXTURE_SERVER_NAME", "recorder"))


def _log(tool: str, **arguments) -> None:
    """Every call's tool name and arguments, as received, go to $CALL_LOG when it is set."""
    if os.environ.get("CALL_LOG"):
        with open(os.environ["CALL_LOG"], "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"tool": tool, "arguments": arguments}) + "\n")


@server.tool()
def record(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius", days: int = 1) -> str:
    """Record a forecast request.

    Args:
        city: The city to record.
        unit: Temperature unit.
        days: How many days.
    """
    _log("record", city=city, unit=unit, days=days)
    with open(os.environ["RECORD_FILE"], "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"city": city, "unit": unit, "days": days}) + "\n")
    return f"recorded {city}"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def lookup(key: str) -> str:
    """Look up a value; keys starting with env: read an environment variable; pid is the server's."""
    _log("lookup", key=key)
    if key == "pid":
        return str(os.getpid())
    if key.startswith("env:"):
        return os.environ.get(key[4:], "<unset>")
    return f"value of {key}"


@server.tool()
def fail(reason: str) -> str:
    """Always fails."""
    _log("fail", reason=reason)
    raise ToolError(f"failed on purpose: {reason}")


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def slow(seconds: float) -> str:
    """Sleep, then answer."""
    _log("slow", seconds=seconds)
    time.sleep(seconds)
    return "slept"


_MEETINGS: dict[int, threading.Barrier] = {}


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def meet(parties: int) -> str:
    """Wait until `parties` calls of meet run at the same time."""
    _log("meet", parties=parties)
    try:
        _MEETINGS.setdefault(parties, threading.Barrier(parties, timeout=30)).wait()
    except threading.BrokenBarrierError:
        raise ToolError(f"fewer than {parties} calls of meet ran at the same time") from None
    return "met"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def huge(size: int) -> str:
    """Return a text of `size` characters."""
    _log("huge", size=size)
    return "x" * size


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def freeze() -> str:
    """Stop the whole server process (SIGSTOP): it hangs and answers nothing, pings included."""
    _log("freeze")
    os.kill(os.getpid(), signal.SIGSTOP)
    return "thawed"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def die() -> str:
    """Exit the server process in the middle of the call."""
    _log("die")
    sys.stderr.write("recorder: dying on request\n")
    sys.stderr.flush()
    os._exit(7)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        # Streamable HTTP on 127.0.0.1:PORT/mcp, for the config file's `url` entries.
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
