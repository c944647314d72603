"""cli/stopping.py: SIGTERM raises Terminated in the main thread, even when it lands inside a C callback."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import pytest

from toolgrad_edge.cli.stopping import Terminated, stop_on_signals

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def test_sigterm_raises_terminated_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Terminated):
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next instruction
                pass
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_signal_inside_a_c_callback_is_raised_once_the_c_call_returns(capfd):
    """llama.cpp calls Python back (log, eval callbacks) during long C calls; ctypes drops what they raise."""
    libc = ctypes.CDLL(None)
    compare_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
    calls = []

    def compare(a, b):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled on this callback's next instruction
        return a[0] - b[0]

    callback = compare_type(compare)
    values = (ctypes.c_int * 64)(*range(64, 0, -1))
    after = []
    with pytest.raises(Terminated):
        with stop_on_signals():
            libc.qsort(values, len(values), ctypes.sizeof(ctypes.c_int), callback)
            after.append("the C call returned")
            after.append("and the program went on")
    assert len(calls) > 1  # the C code went on calling back after the signal: the raise waited
    assert after == []  # raised at the first step after the C call, not later
    assert "Exception ignored" not in capfd.readouterr().err
    assert sys.getprofile() is None
