"""SIGTERM stops a streaming `toolgrad-edge serve`: each stream ends properly, waiting requests get 503,
and the process exits 0 (a real `serve` subprocess on the Gemma 3 270M demo model).

The streamed answer is held long by a format schema that asks for 250 numbers, so the signal always
arrives mid-stream. Waits are on events (a line on the stream, the queue's count in /health); the
10 s bound on the exit is generous (the job ends at its next token).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow

LONG = {"type": "object", "properties": {"numbers": {"type": "array", "items": {"type": "integer"},
                                                     "minItems": 250}}, "required": ["numbers"]}
PROMPT = [{"role": "user", "content": "List two hundred and fifty numbers."}]
MAX_TOKENS = 1024
EXIT_BOUND_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(gguf):
    port = _free_port()
    cmd = [sys.executable, "-c", "from toolgrad_edge.cli import main; main()", "serve", "--model", str(gguf),
           "--port", str(port), "--n-ctx", "2048",
           # One request decodes at a time, so the second one waits in the queue.
           "--parallel", "1", "--max-tokens-limit", str(MAX_TOKENS), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).json().get("status") == "ok":
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail("serve did not start: " + (proc.communicate()[0] or "")[-2000:])


def _requests(url: str, api: str):
    """(path, body) of one long streamed request on ``api``."""
    if api == "openai":
        body = {"model": "m", "messages": PROMPT, "stream": True, "max_tokens": MAX_TOKENS,
                "stream_options": {"include_usage": True}, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": LONG}}}
        return "/v1/chat/completions", body
    body = {"model": "gemma-3-270m", "messages": PROMPT, "stream": True, "format": LONG,
            "options": {"num_predict": MAX_TOKENS, "temperature": 0}}
    return "/api/chat", body


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_sigterm_during_a_stream_ends_it_properly_and_exits_0(gemma_270m_gguf, api):
    proc, url = _serve(gemma_270m_gguf)
    try:
        path, body = _requests(url, api)
        other_path, other_body = _requests(url, "ollama" if api == "openai" else "openai")
        lines: list[str] = []
        first_line = threading.Event()
        stream_done = threading.Event()

        def read_stream():
            with httpx.stream("POST", url + path, json=body, timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first_line.set()
            stream_done.set()

        waiting: list[httpx.Response] = []

        def wait_in_queue():
            whole = {key: value for key, value in other_body.items() if key != "stream_options"}
            waiting.append(httpx.post(url + other_path, json={**whole, "stream": False}, timeout=60))

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        assert first_line.wait(60), "the stream did not start"
        queued = threading.Thread(target=wait_in_queue, daemon=True)
        queued.start()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=5).json()["queue"]["waiting"] < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)

        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=EXIT_BOUND_S)
        exit_s = time.monotonic() - signalled
        out = proc.stdout.read()
        assert proc.returncode == 0, out[-2000:]
        assert exit_s < EXIT_BOUND_S
        assert stream_done.wait(5), "the client's stream did not end"
        queued.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # The stream ended as a finished answer, cut well before its budget.
    if api == "openai":
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == "stop" and finishes.count("stop") == 1
        assert chunks[-1]["usage"]["completion_tokens"] < MAX_TOKENS
    else:
        last = json.loads(lines[-1])
        assert last["done"] is True and last["done_reason"] == "stop"
        assert last["eval_count"] < MAX_TOKENS
        assert all(json.loads(line)["done"] is False for line in lines[:-1])
    # The request that waited behind it was not run: 503, in its API's shape.
    (other,) = waiting
    assert other.status_code == 503, other.text
    error = other.json()["error"]
    assert (error["code"] == "shutting_down") if api == "ollama" else ("shutting down" in error)
