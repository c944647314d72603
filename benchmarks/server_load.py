"""Bounded load run against the server's OpenAI and Ollama APIs, on loopback.

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
    python benchmarks/server_load.py --api mixed --clients 8 --requests 2   # Ollama against OpenAI clients

--api ollama or mixed compares the two APIs on one workload: every request
sends all the tools and must call (tool_choice "required" on /v1, the
server's --tool-choice required default on /api/chat, which has no such
field; parallel calls allowed on both), and every call it returns must
validate. mixed runs half the clients on each API at the same time and
reports latency and calls/s per API.

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


def start_server(model: str | None, n_ctx: int, max_tokens: int, tool_choice: str = "auto"):
    """The server in a thread on a free loopback port; returns (url, stop, model name, baseline latencies)."""
    from toolgrad_edge.runtime import ToolRuntime
    from toolgrad_edge.server import ServerSettings, create_app

    runtime = ToolRuntime(model, n_ctx=n_ctx)
    direct_latencies(runtime, max_tokens, rounds=1)  # warm-up: evaluates the tool prefix
    baseline = direct_latencies(runtime, max_tokens)  # again after the load run: the machine may be shared
    url, stop_server = serve_in_thread(create_app(runtime, ServerSettings(max_queue=64, tool_choice=tool_choice)))

    def stop() -> None:
        stop_server()
        baseline.extend(direct_latencies(runtime, max_tokens))
        runtime.close()

    return url, stop, runtime.model_path.name, baseline


def serve_in_thread(app, timeout_s: float = 120):
    """uvicorn serving ``app`` on a free loopback port in a thread; returns (url, stop)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise SystemExit(f"the server did not start within {timeout_s:.0f} s")

    def stop() -> None:
        server.should_exit = True
        thread.join(30)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def sse_calls(lines) -> list[tuple[str, str]]:
    """(name, arguments JSON text) of each tool call in an OpenAI chat-completions SSE stream."""
    got: dict[int, list[str]] = {}
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for tc in chunk["choices"][0]["delta"].get("tool_calls") or [] if chunk["choices"] else []:
            slot = got.setdefault(tc["index"], ["", ""])
            slot[0] += tc.get("function", {}).get("name") or ""
            slot[1] += tc.get("function", {}).get("arguments") or ""
    return [tuple(v) for _, v in sorted(got.items())]


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
        with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"latency": time.perf_counter() - t0, "error": f"{r.status_code}: {r.read()[:200]!r}"}
            calls = sse_calls(r.iter_lines())
        latency = time.perf_counter() - t0
    return {"latency": latency, "calls": calls, "tool": tool}


def one_required_request(http: httpx.Client, url: str, api: str, seed: int, max_tokens: int,
                         stream: bool, model: str) -> dict:
    """The comparison workload on either API: all tools, a call required, every call checked."""
    messages = [{"role": "user", "content": QUESTION}]
    if api == "openai":
        path = "/v1/chat/completions"
        body = {"model": "local", "messages": messages, "tools": TOOLS, "tool_choice": "required",
                "max_tokens": max_tokens, "temperature": 0, "seed": seed, "stream": stream}
    else:
        path = "/api/chat"  # no tool-choice field: the server's --tool-choice required applies
        body = {"model": model, "messages": messages, "tools": TOOLS, "stream": stream,
                "options": {"num_predict": max_tokens, "temperature": 0, "seed": seed}}
    t0 = time.perf_counter()
    with http.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            return {"api": api, "latency": time.perf_counter() - t0, "error": f"{r.status_code}: {r.read()[:200]!r}"}
        lines = list(r.iter_lines())
    latency = time.perf_counter() - t0
    calls: list[tuple[str, dict]] = []
    if api == "ollama":
        for line in filter(None, lines):
            obj = json.loads(line)
            if "error" in obj:
                return {"api": api, "latency": latency, "error": obj["error"]}
            calls += [(c["function"]["name"], c["function"]["arguments"])
                      for c in obj.get("message", {}).get("tool_calls") or []]
    elif not stream:
        message = json.loads("".join(lines))["choices"][0]["message"]
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or []]
    else:
        calls = [(n, json.loads(a)) for n, a in sse_calls(lines)]
    return {"api": api, "latency": latency, "calls": calls}


def is_valid_required(outcome: dict) -> bool:
    if not outcome.get("calls"):
        return False
    try:
        for name, arguments in outcome["calls"]:
            jsonschema.validate(arguments, SCHEMAS[name])
    except (KeyError, jsonschema.ValidationError):
        return False
    return True


def summary(outcomes: list[dict], wall: float) -> dict:
    latencies = sorted(o["latency"] for o in outcomes)
    p95_index = max(0, min(len(latencies) - 1, round(0.95 * len(latencies)) - 1))
    calls = sum(len(o.get("calls") or []) for o in outcomes)
    return {"requests": len(outcomes), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[p95_index], 3), "calls": calls, "calls_per_s": round(calls / wall, 3),
            "errors": sum(1 for o in outcomes if "error" in o),
            "invalid_calls": sum(1 for o in outcomes if "error" not in o and not is_valid_required(o))}


def compare(args, url: str, headers: dict) -> tuple[list[dict], float]:
    """--api ollama|mixed: the required workload; mixed puts even clients on /v1 and odd ones on /api."""
    def api_of(i: int) -> str:
        return "ollama" if args.api == "ollama" or i % 2 == 1 else "openai"

    with httpx.Client(headers=headers, timeout=600) as warm:
        model = warm.get(url + "/api/tags").json()["models"][0]["model"]  # the name Ollama clients must send
        for api in sorted({api_of(i) for i in range(args.clients)}):
            one_required_request(warm, url, api, 0, args.max_tokens, False, model)  # warm-up

    def client(i: int) -> list[dict]:
        with httpx.Client(headers=headers, timeout=600) as http:
            return [one_required_request(http, url, api_of(i), i * 100 + j, args.max_tokens, args.stream, model)
                    for j in range(args.requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        outcomes = [o for batch in pool.map(client, range(args.clients)) for o in batch]
    return outcomes, time.perf_counter() - t0


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
    ap.add_argument("--api", choices=["openai", "ollama", "mixed"], default="openai",
                    help="openai: named tool per client on /v1 (the default run); ollama or mixed: the "
                         "required-call workload on /api/chat, or on both APIs at once")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    stop, model, baseline = None, args.model, []
    url = args.url
    if url is None:
        url, stop, model, baseline = start_server(args.model, args.n_ctx, args.max_tokens,
                                                  "auto" if args.api == "openai" else "required")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    names = list(SCHEMAS)
    if args.api != "openai":
        try:
            outcomes, wall = compare(args, url, headers)
        finally:
            if stop is not None:
                stop()
        report = {"model": str(model), "api": args.api, "clients": args.clients, "stream": args.stream,
                  "max_tokens": args.max_tokens, "wall_s": round(wall, 2),
                  "req_per_s": round(len(outcomes) / wall, 3), **summary(outcomes, wall),
                  "direct_p50_s": round(statistics.median(baseline), 3) if baseline else None}
        for api in ("openai", "ollama"):
            mine = [o for o in outcomes if o["api"] == api]
            if mine and args.api == "mixed":
                report[api] = summary(mine, wall)
        print(json.dumps(report) if args.json else json.dumps(report, indent=2))
        for e in [o["error"] for o in outcomes if "error" in o][:5]:
            print("error:", e, file=sys.stderr)
        return 0 if not report["errors"] and not report["invalid_calls"] else 1
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
