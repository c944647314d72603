"""An MCP server that does not stop when asked: it ignores SIGTERM and, once its stdin closes,
writes its pid to $STUBBORN_MARKER and waits for ever. Only SIGKILL ends it.

For the test of a second signal: the first one's clean-up waits on this server, the second one
must end the client (and this server) at once.
"""

from __future__ import annotations

import os
import signal
import time

from mcp.server.mcpserver import MCPServer

server = MCPServer("stubborn")


@server.tool()
def ping() -> str:
    """Answers pong."""
    return "pong"


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server.run("stdio")
    with open(os.environ["STUBBORN_MARKER"], "w", encoding="ascii") as fh:
        fh.write(str(os.getpid()))
    while True:
        time.sleep(60)
