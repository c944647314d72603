"""Grammar build time and size for 1, 10 and 100 tools, and the cost of free argument order.

Tools are drawn from BFCL v4's live_multiple function lists (real schemas of
mixed size) when the data is there, else synthesised. For each tool count it
reports the median time of load_tools (cold, and cached as on later
requests), of a cold build (compile_grammar, no cache) and of a cached
build_grammar, the grammar size in bytes and rules, and the size with
declared argument order only (order_states=1) for comparison.

Usage:
  python benchmarks/grammar_build.py [--data-dir DIR] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from toolgrad_edge.grammars import build_grammar, load_tools
from toolgrad_edge.grammars.gbnf import compile_grammar
from toolgrad_edge.grammars.tools import _cached_tool

DEFAULT_DATA = Path("/work/dl/bfcl/bfcl_eval/data")


def tool_pool(data_dir: Path, count: int) -> list[dict]:
    path = data_dir / "BFCL_v4_live_multiple.json"
    seen: dict[str, dict] = {}
    if path.exists():
        for line in open(path):
            for fn in json.loads(line)["function"]:
                seen.setdefault(fn["name"], fn)
            if len(seen) >= count:
                break
    for i in range(len(seen), count):  # synthetic filler
        seen[f"tool_{i}"] = {"name": f"tool_{i}", "description": "", "parameters": {
            "type": "object", "required": ["a"], "properties": {
                "a": {"type": "string"}, "b": {"type": "integer", "minimum": 0},
                "c": {"type": "string", "enum": ["x", "y", "z"]}, "d": {"type": "boolean"}}}}
    return list(seen.values())[:count]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()

    rows = []
    pool = tool_pool(args.data_dir, 100)
    for count in (1, 10, 100):
        tools = load_tools(pool[:count])
        grammar = compile_grammar(tools)
        fixed = compile_grammar(tools, order_states=1)
        rows.append({
            "tools": count,
            "properties": sum(len(t.parameters.get("properties", {})) for t in tools),
            "load_cold_ms": 1000 * median_time(
                lambda: (_cached_tool.cache_clear(), load_tools(pool[:count])), args.repeats),
            "load_ms": 1000 * median_time(lambda: load_tools(pool[:count]), args.repeats),
            "build_ms": 1000 * median_time(lambda: compile_grammar(tools), args.repeats),
            "cached_ms": 1000 * median_time(lambda: build_grammar(tools), args.repeats),
            "bytes": len(grammar.encode()),
            "rules": grammar.count("\n"),
            "declared_order_bytes": len(fixed.encode()),
            "declared_order_rules": fixed.count("\n"),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'tools':>5} {'props':>5} {'load ms':>8} {'cached':>7} {'build ms':>9} {'cached ms':>9} "
          f"{'bytes':>8} {'rules':>6} {'fixed-order bytes':>18} {'size x':>6}")
    for r in rows:
        print(f"{r['tools']:>5} {r['properties']:>5} {r['load_cold_ms']:>8.2f} {r['load_ms']:>7.2f} "
              f"{r['build_ms']:>9.2f} "
              f"{r['cached_ms']:>9.3f} {r['bytes']:>8} {r['rules']:>6} {r['declared_order_bytes']:>18} "
              f"{r['bytes'] / r['declared_order_bytes']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
