"""A stop that stops: `toolgrad-edge chat` with MCP servers, sent SIGTERM or SIGINT as a service manager
or a terminal would. The servers' processes end with it (none outlives it), the exit code says which
signal (143, 130), and a second signal during the clean-up ends everything at once.

Each run waits for events (the chat's ready line, a file a server writes), never for a time.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from mcp_fixtures.scripted import FIXTURES  # noqa: E402
from test_leftovers import CLI, GENEROUS_S  # noqa: E402

READY = "Ctrl-D to quit."


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            pids += [int(p) for p in fh.read().split()]
    return pids


class Chat:
    """`toolgrad-edge chat` in a process of its own, its stderr read line by line in a thread."""

    def __init__(self, model: Path, *mcp: str):
        args = [*CLI, "chat", "-m", str(model), "--max-tokens", "8"]
        for command in mcp:
            args += ["--mcp", command]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str) -> None:
        while True:
            try:
                line = self.lines.get(timeout=GENEROUS_S)
            except queue.Empty:
                self.proc.kill()
                pytest.fail(f"no {text!r} on stderr within {GENEROUS_S:g} s: {''.join(self.stderr)}")
            if line is None:
                pytest.fail(f"chat exited ({self.proc.wait()}) before {text!r}: {''.join(self.stderr)}")
            self.stderr.append(line)
            if text in line:
                return

    def finish(self) -> tuple[int, str]:
        code = self.proc.wait(timeout=GENEROUS_S)
        while (line := self.lines.get(timeout=GENEROUS_S)) is not None:
            self.stderr.append(line)
        return code, "".join(self.stderr)

    def servers(self, name: str) -> list[int]:
        pids = []
        for pid in _children(self.proc.pid):
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if name.encode() in fh.read():
                    pids.append(pid)
        return pids


@pytest.mark.slow
# SIGTERM exits as the shell reports it (128 + 15). Ctrl-C at chat's prompt quits as Ctrl-D does (exit 0);
# the ready line is printed a moment before the prompt is read, and Ctrl-C then is an interruption (130).
@pytest.mark.parametrize("signum, codes, last_line", [(signal.SIGTERM, {143}, "Terminated."),
                                                       (signal.SIGINT, {0, 130}, "")])
def test_a_signal_ends_chat_and_its_mcp_servers(gemma_270m_gguf, signum, codes, last_line):
    pytest.importorskip("mcp_server_time")
    time_server = f"{sys.executable} -m mcp_server_time --local-timezone UTC"
    chat = Chat(gemma_270m_gguf, time_server, time_server)
    chat.wait_for(READY)
    servers = chat.servers("mcp_server_time")
    assert len(servers) == 2 and all(map(_alive, servers))
    chat.proc.send_signal(signum)
    returncode, stderr = chat.finish()
    assert returncode in codes, stderr
    assert "Traceback" not in stderr
    assert stderr.rstrip().endswith(last_line)
    assert not [pid for pid in servers if _alive(pid)], "an MCP server outlived the chat"


@pytest.mark.slow
def test_a_second_signal_during_the_clean_up_ends_everything_at_once(gemma_270m_gguf, tmp_path, monkeypatch):
    marker = tmp_path / "stubborn.pid"
    monkeypatch.setenv("STUBBORN_MARKER", str(marker))
    chat = Chat(gemma_270m_gguf, f"{sys.executable} {FIXTURES / 'stubborn_server.py'}")
    chat.wait_for(READY)
    (server,) = chat.servers("stubborn_server")
    chat.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GENEROUS_S
    while not marker.exists():  # the clean-up closed the server's stdin; the server ignores it
        assert chat.proc.poll() is None and time.monotonic() < deadline, chat.finish()
        time.sleep(0.01)
    chat.proc.send_signal(signal.SIGTERM)
    returncode, stderr = chat.finish()
    assert returncode == 143, stderr
    assert stderr.rstrip().endswith("Stopped.") and "Terminated." not in stderr, stderr
    assert int(marker.read_text()) == server
    assert not os.path.exists(f"/proc/{server}"), "the server that ignores SIGTERM outlived the chat (or was not reaped)"
