"""Where a batched request's logits come to depend on its neighbours: llama.cpp's kernels, row by row.

The batched engine (engines/batched.py) puts several sequences' rows in one
forward pass. A request's tokens can then differ from the tokens it gets
alone at near-ties. This script finds out which part of a pass makes the
difference, on the batched engine's own session (MultiSession), by
evaluating the same tokens of one sequence in passes of other shapes and
comparing its logits with the logits it gets in a pass of its own (maximum
absolute difference over the vocabulary; 0.0 means bit for bit):

  position   a decode row alone, and at each place in passes of 2..8 rows
  rows       a k-token prompt chunk alone, and beside a 40-token chunk of another sequence
  layout     the same chunk with its cells placed after other sequences' cells, or in a hole between them

Each is run with llama.cpp's repacked weights (CPU_REPACK, the default here)
and with plain weights ($TOOLGRAD_EDGE_REPACK=0), in one process.

    python benchmarks/batch_kernels.py [--model PATH] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def load(model, threads: int, repack: bool):
    from toolgrad_edge.engines.multi_session import MultiSession
    from toolgrad_edge.engines.kernel_guard import detect_kernel_plan

    os.environ["TOOLGRAD_EDGE_REPACK"] = "1" if repack else "0"
    plan = detect_kernel_plan()
    session = MultiSession(model, n_seq_max=9, n_ctx=4096, n_threads=threads, n_batch=512)
    return session, plan


def measure(session) -> dict:
    from toolgrad_edge.engines.scheduler import Slice, Submission

    s = session
    prefix = [s.bos] + s.tokenize("You are a helpful assistant that calls tools. " * 25)
    text = s.tokenize("What is the weather in Paris today, and what time is it in Tokyo? Book a table for two.")
    P = len(prefix)

    def part(seq, tokens, pos0):
        return Slice(Submission(seq, tokens, pos0, [len(tokens) - 1]), 0, len(tokens), (len(tokens) - 1,))

    def reset():
        for q in range(9):
            s.remove(q)
        s.run([part(8, prefix, 0)])
        for q in range(8):
            s.copy_sequence(8, q, P)

    def diff(a, b) -> float:
        return round(float(np.abs(a - b).max()), 4)

    out: dict = {"position": {}, "rows": {}, "layout": {}}
    # A decode row at each place of a pass of n rows (every sequence decodes the same token after the prefix).
    reset()
    alone = s.run([part(0, [text[0]], P)])[0][0]
    for n in (2, 3, 4, 5, 6, 8):
        reset()
        res = s.run([part(q, [text[0]], P) for q in range(n)])
        out["position"][n] = [diff(res[q][0], alone) for q in range(n)]
    # A k-token chunk alone, and beside a 40-token chunk of another sequence.
    for k in (1, 2, 4, 7, 8, 16, 32):
        reset()
        a = s.run([part(0, text[:k], P)])[0][0]
        reset()
        b = s.run([part(0, text[:k], P), part(1, prefix[1:41], P)])[0][0]
        out["rows"][k] = diff(b, a)
    # Cell layout: the same 8-token chunk after other sequences' cells, and in a hole between them.
    reset()
    a = s.run([part(0, text[:8], P)])[0][0]
    reset()
    s.run([part(5, prefix[1:41], P)])
    b = s.run([part(0, text[:8], P)])[0][0]
    reset()
    s.run([part(5, prefix[1:41], P)])
    s.run([part(6, prefix[1:41], P)])
    s.remove(5, P)
    c = s.run([part(0, text[:8], P)])[0][0]
    out["layout"] = {"after other cells": diff(b, a), "in a hole": diff(c, a)}
    for q in range(9):
        s.remove(q)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from toolgrad_edge.model_resolution import resolve_model

    model = resolve_model(args.model)
    report = {"model": str(model), "threads": args.threads}
    for repack in (True, False):
        session, plan = load(model, args.threads, repack)
        try:
            report["repacked" if repack else "plain"] = {"kernels": plan.reason, **measure(session)}
        finally:
            session.close()
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"model {report['model']}, {args.threads} threads; max |logit difference| against the row's own pass")
    for name in ("repacked", "plain"):
        r = report[name]
        print(f"\n{name} weights ({r['kernels']})")
        for n, row in r["position"].items():
            print(f"  decode row at each place of a {n}-row pass: {row}")
        for k, d in r["rows"].items():
            print(f"  {k}-token chunk beside a 40-token chunk: {d}")
        for where, d in r["layout"].items():
            print(f"  8-token chunk with its cells {where}: {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
