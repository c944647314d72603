"""toolgrad-edge's own server against toolgrad-edge over llama.cpp's llama-server, side by side.

Builds ``llama-server`` once from the llama-cpp-python source distribution of
the installed version (``toolgrad-edge build-server``: CPU, cmake, cached
under the project's cache dir),
starts it on 127.0.0.1 with the model and N parallel slots, and measures in
one run, at 1, 2, 4 and 8 concurrent clients:

  own     toolgrad-edge's server (``toolgrad-edge serve``, one worker), chat
          completions over HTTP, as benchmarks/server_load.py sends them;
  remote  ToolRuntime(engine=URL of llama-server): prompt rendered and calls
          parsed here, decoding in llama-server's slots (and once without
          the grammar, "remote-free", to show what the grammar costs there);
  direct  (1 client) ToolRuntime(model, speculative=False).call in this
          process: the in-process engine's latency for the same requests;
  serve-remote  toolgrad-edge's server in front of the llama-server
          (``serve --engine URL``, one queue worker per slot), over HTTP.

Every client forces its own tool (tool_choice by name) and every call is
validated against that tool's schema. Servers run one after the other, never
at the same time. Only loopback addresses; request loops are bounded.

    python benchmarks/engines.py --build-only            # build (many minutes on 2 cores), print the path
    python benchmarks/engines.py                          # 4 slots, clients 1,2,4,8, 2 requests each
    python benchmarks/engines.py --slots 4 --clients 1,8 --requests 3 --json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from server_load import QUESTION, SCHEMAS, TOOLS, is_valid, one_request  # same requests and checks

from toolgrad_edge.engines.server_build import ENV_BINARY, build_llama_server


# -- servers ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode} before it was ready.")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise SystemExit(f"{url} was not healthy within {seconds:g} s.")


def start_llama_server(binary: Path, model: Path, slots: int, ctx_per_slot: int, threads: int):
    port = free_port()
    # --swa-full: the full-size sliding-window cache, as the in-process runtime keeps it.
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots),
           "--ctx-size", str(slots * ctx_per_slot), "--threads", str(threads), "--swa-full", "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return url, proc


def start_own_server(model: Path | None, n_ctx: int, threads: int, engine: str | None = None):
    """``toolgrad-edge serve`` on the model, or (``engine``) in front of a llama-server."""
    port = free_port()
    where = ["--engine", engine] if engine else ["--model", str(model), "--ctx", str(n_ctx), "--threads", str(threads)]
    cmd = [sys.executable, "-c", "from toolgrad_edge.cli import main; main()", "serve", *where,
           "--host", "127.0.0.1", "--port", str(port), "--max-queue", "64", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return url, proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


# -- clients ------------------------------------------------------------------------
def runtime_request(runtime, tool: str, seed: int, max_tokens: int, constrained: bool = True) -> dict:
    """One request through ToolRuntime.call, shaped like server_load's outcomes."""
    t0 = time.perf_counter()
    try:
        result = runtime.call([{"role": "user", "content": QUESTION}], TOOLS, tool_choice=tool, parallel=False,
                              max_tokens=max_tokens, temperature=0.0, seed=seed, constrained=constrained)
    except Exception as exc:  # noqa: BLE001 - a benchmark counts errors, it does not stop on them
        return {"latency": time.perf_counter() - t0, "error": str(exc)[:200]}
    calls = [(c.name, json.dumps(c.arguments)) for c in result.tool_calls]
    return {"latency": time.perf_counter() - t0, "calls": calls, "tool": tool,
            "tokens": result.usage.completion_tokens, "decode_s": result.timings.decode_s}


def run_level(send, clients: int, per_client: int) -> dict:
    """``clients`` threads, each sending ``per_client`` requests back to back; figures of the level."""
    names = list(SCHEMAS)

    def client(i: int) -> list[dict]:
        return [send(names[(i + j) % len(names)], i * 100 + j) for j in range(per_client)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = [o for batch in pool.map(client, range(clients)) for o in batch]
    wall = time.perf_counter() - t0
    latencies = sorted(o["latency"] for o in outcomes)
    errors = [o["error"] for o in outcomes if "error" in o]
    p95 = latencies[max(0, min(len(latencies) - 1, round(0.95 * len(latencies)) - 1))]
    # Tokens per call and decode time per token (after the first), where the engine reports them.
    timed = [o for o in outcomes if o.get("tokens", 0) > 1]
    ms_per_token = (round(1000 * sum(o["decode_s"] for o in timed) / sum(o["tokens"] - 1 for o in timed), 1)
                    if timed else None)
    tokens = round(statistics.mean(o["tokens"] for o in timed), 1) if timed else None
    return {"clients": clients, "requests": len(outcomes), "calls_per_s": round(len(outcomes) / wall, 3),
            "tokens_per_s": round(sum(o["tokens"] for o in timed) / wall, 1) if timed else None,
            "p50_s": round(statistics.median(latencies), 3), "p95_s": round(p95, 3),
            "tokens_per_call": tokens, "decode_ms_per_token": ms_per_token,
            "errors": len(errors), "invalid": sum(1 for o in outcomes if "error" not in o and not is_valid(o)),
            "first_error": errors[0] if errors else None}


def measure(name: str, send, levels: list[int], per_client: int, warm) -> list[dict]:
    warm()
    rows = []
    for clients in levels:
        row = {"engine": name, **run_level(send, clients, per_client)}
        rows.append(row)
        print(f"  {name:>6} {clients} clients: {row['calls_per_s']:.2f} calls/s, p50 {row['p50_s']:.2f}s, "
              f"p95 {row['p95_s']:.2f}s, invalid {row['invalid']}, errors {row['errors']}", file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-only", action="store_true", help="build llama-server, print its path and stop")
    ap.add_argument("--server-binary", default=os.environ.get(ENV_BINARY), help=f"default: ${ENV_BINARY} or build")
    ap.add_argument("--model", default=None, help="GGUF file (default: the runtime's default model)")
    ap.add_argument("--slots", type=int, default=4, help="llama-server --parallel")
    ap.add_argument("--clients", default="1,2,4,8", help="concurrency levels")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--n-ctx", type=int, default=2048, help="context per request (per slot for llama-server)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-own", action="store_true", help="measure llama-server only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    per_client = min(max(args.requests, 1), 20)

    binary = Path(args.server_binary) if args.server_binary else build_llama_server()
    if args.build_only:
        print(binary)
        print(f"export {ENV_BINARY}={binary}   # runs tests/test_engine_llama_server_real.py", file=sys.stderr)
        return 0

    import httpx

    from toolgrad_edge.model_resolution import resolve_model
    from toolgrad_edge.runtime import ToolRuntime

    model = resolve_model(args.model)
    rows: list[dict] = []
    load_before = os.getloadavg()[0]

    # direct: the in-process engine, one request at a time (the 1-client latency reference)
    with ToolRuntime(model, n_ctx=args.n_ctx, n_threads=args.threads, speculative=False) as runtime:
        direct = lambda tool, seed: runtime_request(runtime, tool, seed, args.max_tokens)  # noqa: E731
        rows += measure("direct", direct, [1], per_client * 2, lambda: [direct(t, 0) for t in SCHEMAS])

    if not args.skip_own:
        url, proc = start_own_server(model, args.n_ctx, args.threads)
        try:
            with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=16)) as http:
                own = lambda tool, seed: one_request(http, url, tool, seed, args.max_tokens, False)  # noqa: E731
                rows += measure("own", own, levels, per_client, lambda: [own(t, 0) for t in SCHEMAS])
        finally:
            stop(proc)

    url, proc = start_llama_server(binary, model, args.slots, args.n_ctx, args.threads)
    try:
        with ToolRuntime(engine=url) as runtime:
            remote = lambda tool, seed: runtime_request(runtime, tool, seed, args.max_tokens)  # noqa: E731

            def warm_slots():  # every slot evaluates the tool prefix once
                with ThreadPoolExecutor(args.slots) as pool:
                    list(pool.map(lambda i: remote(list(SCHEMAS)[i % len(SCHEMAS)], 0), range(args.slots)))

            rows += measure("remote", remote, levels, per_client, warm_slots)
            # The same requests without the grammar (the base model rarely writes calls then): whether
            # llama-server's batching scales once the grammar's sampling cost is out of the way.
            free = lambda tool, seed: runtime_request(runtime, tool, seed, args.max_tokens, False)  # noqa: E731
            rows += measure("remote-free", free, sorted({1, max(levels)}), per_client, lambda: None)
            server = runtime.describe().server
        if not args.skip_own:
            # toolgrad-edge's OpenAI server in front of the llama-server (serve --engine: one
            # queue worker per slot), as HTTP clients on other machines would use it.
            front, front_proc = start_own_server(None, args.n_ctx, args.threads, engine=url)
            try:
                with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=16)) as http:
                    served = lambda tool, seed: one_request(http, front, tool, seed, args.max_tokens, False)  # noqa: E731
                    rows += measure("serve-remote", served, levels, per_client, lambda: None)
            finally:
                stop(front_proc)
    finally:
        stop(proc)

    by = {(r["engine"], r["clients"]): r for r in rows}
    top = max(levels)
    summary = {
        "model": model.name, "llama_server": f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}"
        f" sources, build {server.build}", "slots": args.slots, "threads": args.threads,
        "max_tokens": args.max_tokens, "requests_per_client": per_client,
        # Other work on the machine slows spinning llama.cpp threads most: record it.
        "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if ("own", top) in by:
        summary[f"remote_over_own_calls_per_s_at_{top}"] = round(
            by[("remote", top)]["calls_per_s"] / by[("own", top)]["calls_per_s"], 2)
    if ("serve-remote", top) in by and ("own", top) in by:
        summary[f"serve_remote_over_own_calls_per_s_at_{top}"] = round(
            by[("serve-remote", top)]["calls_per_s"] / by[("own", top)]["calls_per_s"], 2)
    if ("remote", 1) in by:
        summary["remote_over_direct_p50_at_1"] = round(by[("remote", 1)]["p50_s"] / by[("direct", 1)]["p50_s"], 2)
    if args.json:
        print(json.dumps({"summary": summary, "rows": rows}))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
        print("| engine | clients | requests | calls/s | p50 s | p95 s | tokens/call | tokens/s | decode ms/token "
              "| invalid | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['engine']} | {r['clients']} | {r['requests']} | {r['calls_per_s']} | {r['p50_s']} | "
                  f"{r['p95_s']} | {r['tokens_per_call'] or '-'} | {r['tokens_per_s'] or '-'} | "
                  f"{r['decode_ms_per_token'] or '-'} | {r['invalid']} | {r['errors']} |")
    checked = [r for r in rows if r["engine"] != "remote-free"]
    return 0 if not any(r["errors"] or r["invalid"] for r in checked) else 1


if __name__ == "__main__":
    sys.exit(main())
