"""BFCL v1+v2 for one or more GGUF files, with and without grammar, as one Markdown table.

    python benchmarks/bfcl_eval.py MODEL.gguf [MODEL.gguf ...] [--limit N] [--max-tokens 512]
        [--tool-choice auto|required] [--speculation on|off|both]

Results go to benchmarks/out/bfcl/<model>-<grammar|no-grammar>[-required][-stepwise]/
(BFCL result files; a rerun resumes) and the table to stdout. The checker
environment is benchmarks/bfcl/env (built on first use). Scores are BFCL's
official checker's. ``--speculation both`` runs each configuration with and
without speculative decoding and prints, per model, how many entries' outputs
differ between the two (expected: none, or near-ties only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toolgrad_edge.evaluate import evaluate_bfcl, parse_categories
from toolgrad_edge.evaluate.bfcl import TOOL_CHOICES, differing_results

HERE = Path(__file__).resolve().parent


def pct(x):
    return "n/a" if x is None else f"{100 * x:.2f}"


def row(name: str, grammar: bool, rep: dict) -> str:
    s = rep["summary"]
    nl, lv = s["non_live"], s["live"]
    cells = [
        name, "on" if grammar else "off", rep["tool_choice"], "on" if rep["speculative"] else "off",
        pct(nl["simple"]), pct(nl["multiple"]), pct(nl["parallel"]), pct(nl["parallel_multiple"]), pct(nl["overall"]),
        pct(lv["simple"]), pct(lv["multiple"]), pct(lv["parallel"]), pct(lv["parallel_multiple"]), pct(lv["overall"]),
        pct(s["relevance"]), pct(s["irrelevance"]), pct(s["valid_call_rate"]),
        "n/a" if s["mean_latency_s"] is None else f"{s['mean_latency_s']:.2f}", str(s["n_entries"]),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| model | grammar | tool choice | speculative | NL Simple | NL Multi | NL Par | NL MultiPar | NL Overall "
    "| L Simple | L Multi | L Par | L MultiPar | L Overall | Relevance | Irrelevance | valid-call % | s/entry | entries |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--categories", default="all")
    ap.add_argument("--only", choices=("grammar", "no-grammar"), default=None)
    ap.add_argument("--tool-choice", choices=TOOL_CHOICES, default="auto",
                    help="required: forced call list outside the relevance categories (grammar runs only)")
    ap.add_argument("--speculation", choices=("on", "off", "both"), default="on")
    args = ap.parse_args(argv)

    modes = [m for m in (True, False) if args.only is None or args.only == ("grammar" if m else "no-grammar")]
    if args.tool_choice == "required":
        modes = [m for m in modes if m]  # a call can be forced only by the grammar
    speculation = {"on": [True], "off": [False], "both": [True, False]}[args.speculation]
    rows, differences = [], []
    for model in args.models:
        for grammar in modes:
            outs = {}
            for speculative in speculation:
                suffix = ("-required" if args.tool_choice == "required" else "") + ("" if speculative else "-stepwise")
                out = HERE / "out" / "bfcl" / f"{model.stem}-{'grammar' if grammar else 'no-grammar'}{suffix}"
                rep = evaluate_bfcl(
                    model, categories=args.categories, limit=args.limit, grammar=grammar, out_dir=out,
                    tool_choice=args.tool_choice, speculative=speculative,
                    checker_env_dir=HERE / "bfcl" / "env", max_tokens=args.max_tokens, n_threads=args.threads,
                    progress=lambda done, total, e: print(f"\r{model.name} {done}/{total} {e.category:24}",
                                                         end="", file=sys.stderr, flush=True),
                    log=lambda m: print(m, file=sys.stderr),
                )
                print(file=sys.stderr)
                rows.append(row(model.name, grammar, rep))
                outs[speculative] = out
            if len(outs) == 2:
                diff = differing_results(outs[True], outs[False], parse_categories(args.categories))
                n = sum(len(ids) for ids in diff.values())
                ids = ", ".join(i for ids in diff.values() for i in ids)
                differences.append(f"- {model.name}, grammar {'on' if grammar else 'off'}: {n} entries differ"
                                   + (f" ({ids})" if ids else ""))
    print(f"BFCL v1+v2, bfcl-eval checker; limit {args.limit or 'none'} per category, max_tokens {args.max_tokens}\n")
    print(HEADER)
    print("\n".join(rows))
    if differences:
        print("\nOutputs with speculative decoding vs. without (one token per forward pass):")
        print("\n".join(differences))
    return 0


if __name__ == "__main__":
    sys.exit(main())
