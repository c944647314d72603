"""serve --parallel 1 against --parallel N and llama-server -np N, in one run: calls/s, tokens/s, latency, TTFT.

For each --parallel value the server starts in this process (uvicorn on a free
loopback port, as benchmarks/server_load.py does), a warm-up request evaluates
the tool prefix, then for each client count every client sends its requests
one after another, all clients at once. Each request streams
(``stream_options.include_usage``) and forces its own tool, as server_load.py's
workload does; every call is validated against its tool's schema.

For each --llama-server N, the same run then starts llama.cpp's llama-server
(built by ``toolgrad-edge build-server``; --server-binary or
$TOOLGRAD_EDGE_LLAMA_SERVER names another) on the same model file with
``-np N -c N*n_ctx --threads T --swa-full`` on a free loopback port, T being
the thread count the in-process rows use, and puts this project's OpenAI
server in front of it (the llama-server engine, engines/llama_server.py: one
queue worker per slot). The requests are the same, so each one reaches
llama-server as a token-id prompt with the same tool's compiled GBNF grammar
(tool_choice forced by name). One warm-up request per slot, all at once, puts
the tool prefix in every slot's cache; then the rows are measured exactly like
the others. llama-server is stopped when its rows are done and on every exit
(an exception, Ctrl-C, SIGTERM; on Linux also when this process is killed).

Reported per (server, clients): calls/s, output tokens/s, p50 and p95
latency, median time to first streamed byte, errors and invalid calls; then
the ratio of every other server's calls/s to the first one's at each client
count. Optionally (--pass-cost), on the batched engine's own session: the
cost of one pass carrying 1, 2, 4, 8 sequences of one token each, with the
output layer and without it (narrow rows), and the KV bytes the shared tool
prefix saves at N sequences (llama.cpp's state writer, per sequence against
all at once).

    python benchmarks/parallel_serving.py                      # --parallel 1 and 8, 270M model
    python benchmarks/parallel_serving.py --parallel 1 8 --llama-server 8   # the issue's three servers
    python benchmarks/parallel_serving.py --parallel 1 4 --clients 1 4 --requests 3 --json
    python benchmarks/parallel_serving.py --url http://127.0.0.1:8080 --label llama-server-np8

A machine shared with other work makes absolute figures noisy; compare the
ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import stop as stop_process  # noqa: E402  (terminate, then kill)
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


def llama_server_binary(given: str | None) -> Path:
    """The llama-server to run: --server-binary, $TOOLGRAD_EDGE_LLAMA_SERVER, or build-server's cached build."""
    from toolgrad_edge.engines.server_build import ENV_BINARY, server_binary

    path = Path(given or os.environ.get(ENV_BINARY) or server_binary()).expanduser()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise SystemExit(f"llama-server not found at {path}: run `toolgrad-edge build-server` first "
                         f"(or name a binary with --server-binary or ${ENV_BINARY}).")
    return path


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, SIGTERM when this benchmark dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_llama_server(binary: Path, model: Path, slots: int, n_ctx: int, threads: int):
    """llama-server -np ``slots`` on a free loopback port, this project's server in front of it.

    Returns (url of the front server, stop, facts about llama-server). ``stop`` ends both; so does an
    exception here.
    """
    from toolgrad_edge.engines.llama_server import LlamaServerEngine
    from toolgrad_edge.runtime import ToolRuntime
    from toolgrad_edge.server import ServerSettings, create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # --swa-full: the whole sliding-window cache, as the in-process runtime keeps it (docs/engines.md).
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots),
           "--ctx-size", str(slots * n_ctx), "--threads", str(threads), "--swa-full", "--no-webui"]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    backend = f"http://127.0.0.1:{port}"
    runtime = stop_front = None

    def stop() -> None:
        try:
            if stop_front is not None:
                stop_front()
            if runtime is not None:
                runtime.close()
        finally:
            stop_process(proc)
            log.close()

    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                tail = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()][-1:]
                raise SystemExit(f"llama-server exited with {proc.returncode} before it was ready"
                                 f"{': ' + tail[0] if tail else ''} ({' '.join(cmd)})")
            try:
                if httpx.get(backend + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"llama-server at {backend} was not ready within 300 s ({' '.join(cmd)})")
            time.sleep(0.25)
        runtime = ToolRuntime(engine=LlamaServerEngine(backend, read_timeout=900))
        info = runtime.engine.engine_info
        if info.total_slots != slots:
            raise SystemExit(f"llama-server at {backend} reports {info.total_slots} slots, not the {slots} asked.")
        url, stop_front = serve_in_thread(create_app(runtime, ServerSettings(max_queue=64)), timeout_s=180)
    except BaseException:
        stop()
        raise
    facts = {"slots": info.total_slots, "slot_ctx": info.n_ctx, "build": info.build, "threads": threads,
             "command": " ".join(cmd)}
    return url, stop, facts


def one(http: httpx.Client, url: str, tool: str, seed: int, max_tokens: int) -> dict:
    body = {"model": "local", "messages": [{"role": "user", "content": QUESTION}], "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": tool}}, "parallel_tool_calls": False,
            "max_tokens": max_tokens, "temperature": 0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, calls, tokens, finish = None, {}, 0, None
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
                finish = choice.get("finish_reason") or finish
                if first is None and (delta.get("content") or delta.get("tool_calls")):
                    first = time.perf_counter() - t0
                for tc in delta.get("tool_calls") or []:
                    slot = calls.setdefault(tc["index"], ["", ""])
                    slot[0] += tc.get("function", {}).get("name") or ""
                    slot[1] += tc.get("function", {}).get("arguments") or ""
    return {"latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens, "tool": tool,
            "calls": [tuple(v) for _, v in sorted(calls.items())], "finish": finish}


def cut(outcome: dict) -> bool:
    """No call because max_tokens ended the answer inside it (a long string argument): not an invalid call."""
    return not outcome.get("calls") and outcome.get("finish") == "length"


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
            "errors": len(outcomes) - len(ok), "invalid_calls": sum(1 for o in ok if not valid(o) and not cut(o)),
            "cut_by_max_tokens": sum(1 for o in ok if cut(o))}


def pass_cost(runtime, rounds: int = 7) -> dict:
    """What one pass costs with k = 1, 2, 4, 8 sequences in it, as in serving: each sequence a copy of the
    warm-up's tool prefix (the prefix sequence) plus a 30-token question, then one token each.

    Median ms of a pass with the output layer (``full``: every row's logits) and of one that stops after
    the final norm (``narrow``: every row asks for a few tokens, so the head computes them); and the KV
    bytes of those sequences, counted by llama.cpp's own state writer: each sequence on its own (what N
    copies of the prefix would take) against all of them at once (shared cells written once).
    """
    import llama_cpp
    from toolgrad_edge.engines.scheduler import Slice, Submission

    engine = runtime.engine
    session = engine._session
    prefix = list(engine._prefix_tokens or [])
    n = min(8, engine.parallel)
    question = session.tokenize(" What is the weather in Paris, and what time is it in Tokyo? Book a table.")[:30]
    few = {k: [236761, 236764] for k in range(n)}

    def part(seq, tokens, pos0):
        return Slice(Submission(seq, tokens, pos0, [len(tokens) - 1]), 0, len(tokens), (len(tokens) - 1,))

    out: dict = {"prefix_tokens": len(prefix), "full": {}, "narrow": {}}
    with engine._ctx_lock:
        for seq in range(n):
            session.copy_sequence(engine.prefix_seq, seq, len(prefix))
            session.run([part(seq, question, len(prefix))])
        pos = len(prefix) + len(question)
        per_seq = sum(llama_cpp.llama_state_seq_get_size(session._ctx, seq) for seq in range(n))
        together = llama_cpp.llama_state_seq_get_size(session._ctx, -1)  # every cell once, with its sequences
        out["kv_bytes"] = {"sequences": n, "each_on_its_own": per_seq, "shared": together,
                           "saved": per_seq - together}
        session._verify_head = False  # measured passes only (the head was checked during the load runs)
        for k in (1, 2, 4, 8):
            if k > n:
                break
            for mode in ("full", "narrow"):
                times = []
                for r in range(rounds):
                    plan = [part(seq, [question[r]], pos) for seq in range(k)]
                    t0 = time.perf_counter()
                    session.run(plan, {j: few[j] for j in range(k)} if mode == "narrow" else None)
                    times.append(time.perf_counter() - t0)
                    for seq in range(k):
                        session.remove(seq, pos)
                out[mode][k] = round(1000 * statistics.median(times), 1)
        for seq in range(n):
            session.remove(seq)
    return out


def name(label) -> str:
    return f"--parallel {label}" if isinstance(label, int) else str(label)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--llama-server", type=int, nargs="+", action="extend", default=[], metavar="N",
                    help="also measure llama-server -np N (this project's server in front, same grammar), "
                         "after the --parallel rows")
    ap.add_argument("--server-binary", default=None, help="llama-server to run (default: "
                    "$TOOLGRAD_EDGE_LLAMA_SERVER, else `toolgrad-edge build-server`'s build)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-ctx", type=int, default=2048, help="context per request (per slot for llama-server)")
    ap.add_argument("--threads", type=int, default=None, help="default: the runtime's own choice for this machine")
    ap.add_argument("--url", default=None, help="measure a running server instead of --parallel (e.g. "
                                                 "`toolgrad-edge serve --engine URL` of a llama-server)")
    ap.add_argument("--label", default=None, help="the name of --url's row")
    ap.add_argument("--pass-cost", action="store_true", help="also time passes of 1, 2, 4, 8 sequences")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for option, values in (("--parallel", args.parallel), ("--llama-server", args.llama_server),
                           ("--clients", args.clients), ("--requests", [args.requests]),
                           ("--n-ctx", [args.n_ctx]), ("--threads", [args.threads or 1])):
        if any(v < 1 for v in values):
            ap.error(f"{option} takes positive integers, got {' '.join(map(str, values))}")

    binary = model = None
    threads = args.threads
    if args.llama_server:
        from toolgrad_edge.hardware import default_threads
        from toolgrad_edge.model_resolution import resolve_model

        binary = llama_server_binary(args.server_binary)  # before anything is measured: fail at once
        model = resolve_model(args.model)  # the file ToolRuntime(args.model) loads
        threads = threads or default_threads()[0]  # what the in-process runtime chooses when not told
    # SIGTERM ends the run through the same clean-up as Ctrl-C (the finally blocks below).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    rows, costs, servers = [], {}, {}
    targets = [(args.label or args.url, args.url, None)] if args.url else [(p, None, p) for p in args.parallel]
    targets += [(f"llama-server -np {n}", None, n) for n in args.llama_server]
    for label, url, parallel in targets:
        stop = runtime = None
        warm_requests = 1
        if url is None and isinstance(label, int):
            url, stop, runtime = start(args.model, args.n_ctx, parallel, threads)
        elif url is None:
            url, stop, servers[label] = start_llama_server(binary, model, parallel, args.n_ctx, threads)
            warm_requests = parallel  # each slot keeps its own prompt cache
        try:
            def warm(i: int) -> None:  # warm-up: the tool prefix
                with httpx.Client(timeout=900) as http:
                    one(http, url, list(SCHEMAS)[i % len(SCHEMAS)], 0, args.max_tokens)

            with ThreadPoolExecutor(warm_requests) as pool:
                list(pool.map(warm, range(warm_requests)))
            for clients in args.clients:
                rows.append({"parallel": label, **load(url, clients, args.requests, args.max_tokens)})
                print(json.dumps(rows[-1]), file=sys.stderr)
            if args.pass_cost and runtime is not None and parallel and parallel > 1:
                costs[parallel] = pass_cost(runtime)
        finally:
            if stop is not None:
                stop()
    first = targets[0][0]
    base = {r["clients"]: r for r in rows if r["parallel"] == first}
    ratios = [{"parallel": r["parallel"], "clients": r["clients"],
               "calls_per_s_ratio": round(r["calls_per_s"] / base[r["clients"]]["calls_per_s"], 2)
               if base.get(r["clients"]) and base[r["clients"]]["calls_per_s"] else None}
              for r in rows if r["parallel"] != first]
    report = {"rows": rows, "ratios_to_first": ratios, "pass_cost_ms": costs, "llama_server": servers}
    if args.json:
        print(json.dumps(report))
    else:
        cols = ["parallel", "clients", "calls_per_s", "tokens_per_s", "p50_s", "p95_s", "ttft_p50_s", "errors",
                "invalid_calls", "cut_by_max_tokens"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")
        for r in ratios:
            print(f"{name(r['parallel'])} / {name(first)} at {r['clients']} clients: "
                  f"{r['calls_per_s_ratio']}x calls/s")
        for p, c in costs.items():
            print(f"pass cost at --parallel {p} after a {c['prefix_tokens']}-token tool prefix, ms by sequences in "
                  f"the pass: with the output layer {c['full']}, narrow (stopped after the final norm) {c['narrow']}")
            kv = c["kv_bytes"]
            print(f"KV of {kv['sequences']} sequences: {kv['each_on_its_own'] / 2**20:.1f} MiB written one by one, "
                  f"{kv['shared'] / 2**20:.1f} MiB with shared cells once; sharing saves "
                  f"{kv['saved'] / 2**20:.1f} MiB")
        for label, facts in servers.items():
            print(f"{label}: {facts['command']} (build {facts['build']}, {facts['slots']} slots of "
                  f"{facts['slot_ctx']} tokens)")
    return 0 if all(not r["errors"] and not r["invalid_calls"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
