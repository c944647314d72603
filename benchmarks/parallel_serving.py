"""serve --parallel 1 against --parallel N, in one run: calls/s, tokens/s, latency and TTFT at 1, 2, 4, 8 clients.

For each --parallel value the server starts in this process (uvicorn on a free
loopback port, as benchmarks/server_load.py does), a warm-up request evaluates
the tool prefix, then for each client count every client sends its requests
one after another, all clients at once. Each request streams
(``stream_options.include_usage``) and forces its own tool, as server_load.py's
workload does; every call is validated against its tool's schema.

Reported per (parallel, clients): calls/s, output tokens/s, p50 and p95
latency, median time to first streamed byte, errors and invalid calls; then
the ratio of --parallel N to --parallel 1 at each client count. Optionally
(--pass-cost) the cost of one pass carrying 1, 2, 4, 8 sequences of one
token each, measured on the batched engine's own session.

    python benchmarks/parallel_serving.py                      # --parallel 1 and 8, 270M model
    python benchmarks/parallel_serving.py --parallel 1 4 --clients 1 4 --requests 3 --json
    python benchmarks/parallel_serving.py --url http://127.0.0.1:8080 --label llama-server-np8

A machine shared with other work makes absolute figures noisy; compare the
ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_load import QUESTION, SCHEMAS, TOOLS, serve_in_thread  # noqa: E402  (the same workload)


def start(model, n_ctx: int, parallel: int, threads: int | None):
    """The server on a free loopback port with --parallel; returns (url, stop, runtime)."""
    from toolgrad_edge.runtime import ToolRuntime
    from toolgrad_edge.server import ServerSettings, create_app

    runtime = ToolRuntime(model, n_ctx=n_ctx, parallel=parallel, n_threads=threads)
    url, stop_server = serve_in_thread(create_app(runtime, ServerSettings(max_queue=64)), timeout_s=180)

    def stop() -> None:
        stop_server()
        runtime.close()

    return url, stop, runtime


def one(http: httpx.Client, url: str, tool: str, seed: int, max_tokens: int) -> dict:
    body = {"model": "local", "messages": [{"role": "user", "content": QUESTION}], "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": tool}}, "parallel_tool_calls": False,
            "max_tokens": max_tokens, "temperature": 0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, calls, tokens = None, {}, 0
    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"latency": time.perf_counter() - t0, "error": f"{r.status_code}: {r.read()[:200]!r}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens", 0)
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if first is None and (delta.get("content") or delta.get("tool_calls")):
                    first = time.perf_counter() - t0
                for tc in delta.get("tool_calls") or []:
                    slot = calls.setdefault(tc["index"], ["", ""])
                    slot[0] += tc.get("function", {}).get("name") or ""
                    slot[1] += tc.get("function", {}).get("arguments") or ""
    return {"latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens, "tool": tool,
            "calls": [tuple(v) for _, v in sorted(calls.items())]}


def valid(outcome: dict) -> bool:
    calls = outcome.get("calls")
    if not calls or len(calls) != 1 or calls[0][0] != outcome["tool"]:
        return False
    try:
        jsonschema.validate(json.loads(calls[0][1]), SCHEMAS[outcome["tool"]])
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    names = list(SCHEMAS)

    def client(i: int) -> list[dict]:
        with httpx.Client(timeout=900) as http:
            return [one(http, url, names[(i + j) % len(names)], i * 100 + j, max_tokens) for j in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = [o for batch in pool.map(client, range(clients)) for o in batch]
    wall = time.perf_counter() - t0
    ok = [o for o in outcomes if "error" not in o]
    lat = sorted(o["latency"] for o in outcomes)
    p95 = lat[max(0, min(len(lat) - 1, round(0.95 * len(lat)) - 1))]
    ttfts = [o["ttft"] for o in ok if o.get("ttft") is not None]
    return {"clients": clients, "requests": len(outcomes), "wall_s": round(wall, 2),
            "calls_per_s": round(sum(len(o["calls"]) for o in ok) / wall, 3),
            "tokens_per_s": round(sum(o["tokens"] for o in ok) / wall, 2),
            "p50_s": round(statistics.median(lat), 3), "p95_s": round(p95, 3),
            "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
            "errors": len(outcomes) - len(ok), "invalid_calls": sum(1 for o in ok if not valid(o))}


def pass_cost(runtime, rounds: int = 5) -> dict:
    """Median ms of one pass carrying 1, 2, 4, 8 sequences (one token each, logits for each), after a prompt."""
    from toolgrad_edge.engines.scheduler import Slice, Submission

    engine = runtime.engine
    session = engine._session
    n = min(8, engine.parallel)
    prompt = session.tokenize("The quick brown fox jumps over the lazy dog. " * 40)
    with engine._ctx_lock:
        for seq in range(n):
            session.remove(seq)
            session.run([Slice(Submission(seq, prompt, 0, [len(prompt) - 1]), 0, len(prompt), (len(prompt) - 1,))])
        out = {}
        for k in (1, 2, 4, 8):
            if k > n:
                break
            times = []
            for r in range(rounds):
                plan = [Slice(Submission(seq, [prompt[r]], len(prompt) + r, [0]), 0, 1, (0,)) for seq in range(k)]
                t0 = time.perf_counter()
                session.run(plan)
                times.append(time.perf_counter() - t0)
            for seq in range(n):
                session.remove(seq, len(prompt))
            out[k] = round(1000 * statistics.median(times), 1)
        for seq in range(n):
            session.remove(seq)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-ctx", type=int, default=2048, help="context per request")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--url", default=None, help="measure a running server instead (e.g. llama-server -np 8 "
                                                 "behind `toolgrad-edge serve --engine`)")
    ap.add_argument("--label", default=None, help="the name of --url's row")
    ap.add_argument("--pass-cost", action="store_true", help="also time passes of 1, 2, 4, 8 sequences")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    rows, costs = [], {}
    targets = [(args.label or args.url, args.url, None)] if args.url else [(p, None, p) for p in args.parallel]
    for label, url, parallel in targets:
        stop = runtime = None
        if url is None:
            url, stop, runtime = start(args.model, args.n_ctx, parallel, args.threads)
        try:
            with httpx.Client(timeout=900) as warm:
                one(warm, url, next(iter(SCHEMAS)), 0, args.max_tokens)  # warm-up: the tool prefix
            for clients in args.clients:
                rows.append({"parallel": label, **load(url, clients, args.requests, args.max_tokens)})
                print(json.dumps(rows[-1]), file=sys.stderr)
            if args.pass_cost and runtime is not None and parallel and parallel > 1:
                costs[parallel] = pass_cost(runtime)
        finally:
            if stop is not None:
                stop()
    base = {r["clients"]: r for r in rows if r["parallel"] == targets[0][0]}
    ratios = [{"parallel": r["parallel"], "clients": r["clients"],
               "calls_per_s_ratio": round(r["calls_per_s"] / base[r["clients"]]["calls_per_s"], 2)
               if base.get(r["clients"]) and base[r["clients"]]["calls_per_s"] else None}
              for r in rows if r["parallel"] != targets[0][0]]
    report = {"rows": rows, "ratios_to_first": ratios, "pass_cost_ms": costs}
    if args.json:
        print(json.dumps(report))
    else:
        cols = ["parallel", "clients", "calls_per_s", "tokens_per_s", "p50_s", "p95_s", "ttft_p50_s", "errors",
                "invalid_calls"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")
        for r in ratios:
            print(f"--parallel {r['parallel']} / {targets[0][0]} at {r['clients']} clients: "
                  f"{r['calls_per_s_ratio']}x calls/s")
        for p, c in costs.items():
            print(f"pass cost at --parallel {p} (ms by sequences in the pass): {c}")
    return 0 if all(not r["errors"] and not r["invalid_calls"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
