"""Bounded load run against the OpenAI-compatible server, on loopback.

Starts the server in this process (uvicorn on a free 127.0.0.1 port) on the
default model, or uses --url for a server already running, then sends
CLIENTS x REQUESTS chat completions at once. Each client forces its own tool
(tool_choice by name), so a reply that carries another client's tool would
show output mixed between requests. Every returned call is validated against
its tool's schema.

Prints requests/s, p50/p95 latency, errors and invalid calls; --json for one
JSON object.

    python benchmarks/server_load.py                      # 8 clients x 5 requests, 270M model
    python benchmarks/server_load.py --clients 4 --requests 10 --stream
    python benchmarks/server_load.py --url http://127.0.0.1:8080 --api-key KEY

When it starts the server itself, it also times the same requests through
ToolRuntime.call directly (no HTTP, no queue; two per tool before the load
run and two after) and reports their median as direct_p50_s and
direct_req_per_s: the ceiling for one model, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


TOOLS = [
    _tool("get_weather", "Current weather in a city.", {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    }, ["city"]),
    _tool("get_time", "Current time in a time zone.", {"tz": {"type": "string", "enum": ["CET", "UTC", "JST"]}},
          ["tz"]),
    _tool("book_table", "Book a restaurant table.", {
        "people": {"type": "integer", "minimum": 1, "maximum": 9},
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
    }, ["people", "city"]),
    _tool("send_email", "Send a short email.", {
        "to": {"type": "string", "maxLength": 40},
        "subject": {"type": "string", "maxLength": 40},
    }, ["to", "subject"]),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = "What is the weather in Paris, what time is it in Tokyo, and book a table for 2 in London."


def direct_latencies(runtime, max_tokens: int, rounds: int = 2) -> list[float]:
    """Baseline in the same run: each tool's request through ToolRuntime.call, no server, one at a time."""
    times = []
    for i, name in enumerate(list(SCHEMAS) * rounds):
        t0 = time.perf_counter()
        runtime.call([{"role": "user", "content": QUESTION}], TOOLS, tool_choice=name, parallel=False,
                     max_tokens=max_tokens, temperature=0.0, seed=i)
        times.append(time.perf_counter() - t0)
    return times


def start_server(model: str | None, n_ctx: int, max_tokens: int):
    """The server in a thread on a free loopback port; returns (url, stop, model name, baseline latencies)."""
    import uvicorn

    from toolgrad_edge.runtime import ToolRuntime
    from toolgrad_edge.server import ServerSettings, create_app

    runtime = ToolRuntime(model, n_ctx=n_ctx)
    direct_latencies(runtime, max_tokens, rounds=1)  # warm-up: evaluates the tool prefix
    baseline = direct_latencies(runtime, max_tokens)  # again after the load run: the machine may be shared
    app = create_app(runtime, ServerSettings(max_queue=64))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise SystemExit("the server did not start within 120 s")

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
        baseline.extend(direct_latencies(runtime, max_tokens))
        runtime.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop, runtime.model_path.name, baseline


def one_request(http: httpx.Client, url: str, tool: str, seed: int, max_tokens: int, stream: bool) -> dict:
    body = {"model": "local", "messages": [{"role": "user", "content": QUESTION}], "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": tool}}, "parallel_tool_calls": False,
            "max_tokens": max_tokens, "temperature": 0, "seed": seed, "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        r = http.post(url + "/v1/chat/completions", json=body)
        latency = time.perf_counter() - t0
        if r.status_code != 200:
            return {"latency": latency, "error": f"{r.status_code}: {r.text[:200]}"}
        calls = [(c["function"]["name"], c["function"]["arguments"])
                 for c in r.json()["choices"][0]["message"].get("tool_calls") or []]
    else:
        got: dict[int, list[str]] = {}
        with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"latency": time.perf_counter() - t0, "error": f"{r.status_code}: {r.read()[:200]!r}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for tc in chunk["choices"][0]["delta"].get("tool_calls") or [] if chunk["choices"] else []:
                    slot = got.setdefault(tc["index"], ["", ""])
                    slot[0] += tc.get("function", {}).get("name") or ""
                    slot[1] += tc.get("function", {}).get("arguments") or ""
        latency = time.perf_counter() - t0
        calls = [tuple(v) for _, v in sorted(got.items())]
    return {"latency": latency, "calls": calls, "tool": tool}


def is_valid(outcome: dict) -> bool:
    calls = outcome.get("calls")
    if not calls or len(calls) != 1 or calls[0][0] != outcome["tool"]:
        return False  # no call, or another request's tool: output mixed or lost
    try:
        jsonschema.validate(json.loads(calls[0][1]), SCHEMAS[outcome["tool"]])
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=5, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--stream", action="store_true", help="stream every request")
    ap.add_argument("--model", default=None, help="GGUF file (default: the runtime's default model)")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--url", default=None, help="use a running server instead of starting one")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    stop, model, baseline = None, args.model, []
    url = args.url
    if url is None:
        url, stop, model, baseline = start_server(args.model, args.n_ctx, args.max_tokens)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    names = list(SCHEMAS)
    try:
        with httpx.Client(headers=headers, timeout=600) as warm:
            one_request(warm, url, names[0], 0, args.max_tokens, False)  # warm-up: evaluates the tool prefix

        def client(i: int) -> list[dict]:
            with httpx.Client(headers=headers, timeout=600) as http:
                return [one_request(http, url, names[i % len(names)], i * 100 + j, args.max_tokens, args.stream)
                        for j in range(args.requests)]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            outcomes = [o for batch in pool.map(client, range(args.clients)) for o in batch]
        wall = time.perf_counter() - t0
    finally:
        if stop is not None:
            stop()

    latencies = sorted(o["latency"] for o in outcomes)
    errors = [o["error"] for o in outcomes if "error" in o]
    invalid = sum(1 for o in outcomes if "error" not in o and not is_valid(o))
    p95_index = max(0, min(len(latencies) - 1, round(0.95 * len(latencies)) - 1))
    report = {
        "model": str(model),
        "clients": args.clients,
        "requests": len(outcomes),
        "stream": args.stream,
        "max_tokens": args.max_tokens,
        "wall_s": round(wall, 2),
        "req_per_s": round(len(outcomes) / wall, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(latencies[p95_index], 3),
        # The same requests through ToolRuntime.call, one at a time, just before the load run:
        # the most a single model can serve, whatever the server does.
        "direct_p50_s": round(statistics.median(baseline), 3) if baseline else None,
        "direct_req_per_s": round(1 / statistics.median(baseline), 3) if baseline else None,
        "errors": len(errors),
        "invalid_calls": invalid,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>16}: {value}")
        for e in errors[:5]:
            print("error:", e, file=sys.stderr)
    return 0 if not errors and not invalid else 1


if __name__ == "__main__":
    sys.exit(main())
