"""What leaving an evaluated tool prefix in the restored layout costs a cold request.

A prefix-cache miss evaluates the tool prefix, saves its state and loads it
back (LlamaSession.evaluate_prefix), so that it decodes like a restored one.
This times the three steps separately, medians after a warm-up, for the
five-tool file of tests/data and the bench prompt.

    python benchmarks/prefix_restore_cost.py gemma-3-270m-q4_k_m.gguf --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from toolgrad_edge import ToolRuntime, load_tools
from toolgrad_edge.bench.measure import bench_prompt
from toolgrad_edge.prompt import render_prompt

FIVE_TOOLS = Path(__file__).resolve().parent.parent / "tests" / "data" / "five_tools.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    prompts = {"five_tools": ("Text Maria that I'm running 10 minutes late.", FIVE_TOOLS),
               "bench_prompt": bench_prompt(0)}
    with ToolRuntime(args.model, n_threads=args.threads, n_ctx=4096, prefix_cache=False) as rt:
        session = rt.session
        for name, (query, tools) in prompts.items():
            prefix = rt.tokenize_segments(render_prompt(query, load_tools(tools)).prefix)
            times: dict[str, list[float]] = {"evaluate": [], "save_state": [], "clear + load_state": []}
            for _ in range(args.runs + 1):
                session.clear()
                t0 = time.perf_counter()
                session.decode(prefix, 1)
                t1 = time.perf_counter()
                state = session.save_state()
                t2 = time.perf_counter()
                session.load_state(state, prefix)  # clears first
                t3 = time.perf_counter()
                for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                    times[key].append(dt)
            figures = ", ".join(f"{key} {1000 * statistics.median(v[1:]):.1f} ms" for key, v in times.items())
            print(f"{name}: prefix {len(prefix)} tokens, state {len(state) / 1e6:.1f} MB: {figures}")


if __name__ == "__main__":
    main()
