"""SIGTERM and SIGINT for the CLI's commands: the first one unwinds, a second one exits at once.

A service manager (systemd, Docker, a supervisor) stops a program with
SIGTERM and, a while later, SIGKILL. Python's default for SIGTERM is to die
on the spot, skipping every ``finally`` and ``with`` block: temporary files
stay, MCP server processes lose their parent. Here the first SIGTERM raises
:class:`Terminated` in the main thread, as Ctrl-C raises KeyboardInterrupt,
so the same clean-up runs for both. Exit codes follow the shell's
convention: 130 after SIGINT, 143 after SIGTERM.

While that clean-up runs, a second SIGINT or SIGTERM ends the process at
once (exit 130 or 143), after a SIGKILL to every process it started (MCP
servers, a build's compilers), so that none outlives it. Temporary files a
hard exit leaves are removed by the next run (toolgrad_edge.leftovers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class Terminated(BaseException):
    """SIGTERM, raised in the main thread.

    Not a KeyboardInterrupt: code that goes on after Ctrl-C (chat abandons one
    turn) must not go on after SIGTERM. Not an Exception: ``except Exception``
    does not swallow it.
    """


_stopping = False


def rearm() -> None:
    """The program is back to waiting for its user (chat's prompt): the next signal unwinds again."""
    global _stopping
    _stopping = False


def child_pids() -> list[int]:
    """This process's children, where the system lists them (Linux's /proc); else none."""
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as fh:
                pids += [int(p) for p in fh.read().split()]
        except (OSError, ValueError):
            pass
    return pids


def kill_children(reap_within_s: float = 1.0) -> None:
    """SIGKILL every child, and the process group of those that lead one (MCP servers, cmake and its
    compilers); then reap them, so that none is left a zombie for an init that may not reap."""
    children = child_pids()
    for pid in children:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass  # gone meanwhile
    deadline = time.monotonic() + reap_within_s
    for pid in children:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                break  # reaped by someone else (asyncio's child watcher)
            time.sleep(0.005)


def _handle(signum: int, frame) -> None:
    global _stopping
    if _stopping:
        try:
            kill_children()
            sys.stderr.write("Stopped.\n")
            sys.stderr.flush()
        finally:
            os._exit(128 + signum)
    _stopping = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated


def _raise_after_callback(unraisable) -> None:
    """sys.unraisablehook: our signal's exception, dropped by ctypes in a C callback, is raised again later.

    A handler runs at the main thread's next Python instruction; during a long C call
    (llama_decode, a model load) that is inside a Python callback the C code calls
    (llama.cpp's log and eval callbacks), and ctypes prints and drops what a callback
    raises. So the exception is raised again by a profile function at the first call
    or return outside that callback, once the C code has returned.
    """
    exc = unraisable.exc_value
    if not (_stopping and isinstance(exc, (Terminated, KeyboardInterrupt))):
        _previous_hook(unraisable)
        return
    callback = getattr(unraisable.object, "__code__", None)
    skip = {callback, _raise_after_callback.__code__, _raise_when_out.__code__}

    def profile(frame, event, arg):
        _raise_when_out(frame, skip, exc)

    sys.setprofile(profile)


def _raise_when_out(frame, skip, exc) -> None:
    while frame is not None:
        if frame.f_code in skip:
            return
        frame = frame.f_back
    sys.setprofile(None)
    raise exc


_previous_hook = sys.unraisablehook


@contextlib.contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[None]:
    """Within this block, SIGTERM raises Terminated and a second signal exits at once (main thread only)."""
    global _stopping, _previous_hook
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    _stopping = False
    previous = {sig: signal.signal(sig, _handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    _previous_hook, sys.unraisablehook = sys.unraisablehook, _raise_after_callback
    try:
        yield
    finally:
        sys.unraisablehook = _previous_hook
        sys.setprofile(None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
