"""Where two BFCL runs of one model disagree, how close was the model's choice?

    python benchmarks/bfcl_near_ties.py MODEL.gguf RUN_A RUN_B [--categories LIST] [--data-dir DIR]

RUN_A and RUN_B are result folders of `toolgrad-edge eval bfcl` (e.g. with and
without --no-speculative). For every entry whose outputs differ, both outputs
are tokenized, and at the first token where they part the model's logits for
the two candidate tokens are compared, evaluated two ways: one token per
forward pass after the prompt (as stepwise decoding does) and the common
output prefix in one batch (as a verified draft is). A difference between the
two runs is explained by batch noise when the margin is small (llama.cpp's CPU
logits for the same tokens differ by up to ~0.9 between batch shapes on the
270M, see issue 11) and when the batched evaluation ranks the two tokens the
other way round.

Each differing entry is generated again in both runs' settings (run.json)
to get the exact token ids (CallResult.token_ids, or the tokens the decoder
emitted) and to check that the recorded outputs are reproduced. A rerun
evaluates the prompt from an empty cache, while in the run the cache still
held the previous entry's prompt start, so the prompt's batches (and with
them the logits, by batch noise) can differ: near-ties may then go the other
way, and the line says so. Prints one
line per differing entry and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from toolgrad_edge.evaluate import load_entries, parse_categories
from toolgrad_edge.evaluate.bfcl import (RUN_MANIFEST, category_tool_choice, differing_results, read_results,
                                         result_file)
from toolgrad_edge.evaluate.checker_env import find_checker_env
from toolgrad_edge.grammars import load_tools
from toolgrad_edge.prompt import END_OF_TURN, render_prompt
from toolgrad_edge.runtime import ToolRuntime

HERE = Path(__file__).resolve().parent


def first_split(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def next_logits(session, prefix: list[int], rest: list[int], output: list[int], one_by_one: bool) -> np.ndarray:
    """Logits after prompt + output, the prompt evaluated as the runtime does (tool prefix, then the rest)."""
    session.clear()
    session.decode(prefix, 1)
    logits = session.decode(rest, 1)[0]
    if output and one_by_one:
        for token in output:
            logits = session.decode([token], 1)[0]
    elif output:
        logits = session.decode(output, 1)[0]
    return np.asarray(logits, dtype=np.float64)


class TokenRecorder:
    """The token ids of the last call: CallResult.token_ids where the runtime has it, else StepDecoder.step's."""

    def __init__(self):
        from toolgrad_edge import decoding

        self.tokens: list[int] = []
        original = decoding.StepDecoder.step

        def step(decoder, budget):
            emitted = original(decoder, budget)
            self.tokens.extend(emitted)
            return emitted

        decoding.StepDecoder.step = step

    def call(self, runtime, entry, run: dict):
        self.tokens = []
        runtime.clear_kv_cache()  # the prompt evaluated from scratch, whatever ran before
        res = runtime.call(entry.messages, entry.functions, tool_choice=category_tool_choice(entry.category,
                           run.get("tool_choice", "auto")), parallel=True, syntax=run["syntax"],
                           max_tokens=run["max_tokens"], temperature=0.0, constrained=run["grammar"],
                           speculative=run.get("speculative", True))
        return res, list(getattr(res, "token_ids", None) or self.tokens)


def margins(runtime, recorder: TokenRecorder, entry, run_a: dict, run_b: dict, text_a: str, text_b: str) -> dict:
    """Regenerate both outputs; where their tokens part, logit(A's token) - logit(B's token), two ways."""
    session = runtime.session  # the in-process engine's LlamaSession: this diagnostic drives it directly
    res_a, a = recorder.call(runtime, entry, run_a)
    res_b, b = recorder.call(runtime, entry, run_b)
    parts = render_prompt(entry.messages, load_tools(entry.functions), run_a["syntax"])
    prefix = runtime.tokenize_segments(parts.prefix)
    rest = runtime.tokenize_segments(parts.rest)
    end = runtime.engine._control[END_OF_TURN]
    reproduced = {"a": res_a.raw_text == text_a, "b": res_b.raw_text == text_b}
    retokenized = a == b
    if retokenized:
        # The rerun gives one output in both settings (the flip hung on the prompt's batches):
        # compare the recorded outputs, tokenized canonically, which may not be the emitted tokens.
        a, b = session.tokenize(text_a), session.tokenize(text_b)
    a, b = a + [end], b + [end]
    n = first_split(a, b)
    ta, tb = a[n], b[n]
    step = next_logits(session, prefix, rest, a[:n], one_by_one=True)
    batch = next_logits(session, prefix, rest, a[:n], one_by_one=False)

    def piece(token: int) -> str:
        return session.piece(int(token)).decode("utf-8", "replace")

    return {
        "reproduced": reproduced, "retokenized": retokenized, "position": n,
        "token_a": piece(ta), "token_b": piece(tb),
        "margin_stepwise": float(step[ta] - step[tb]), "margin_batched": float(batch[ta] - batch[tb]),
        "top1_stepwise": piece(np.argmax(step)), "batch_noise_max": float(np.max(np.abs(step - batch))),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--categories", default="simple_python,multiple,live_simple")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ids", default=None, help="only these entries (comma-separated ids)")
    args = ap.parse_args(argv)

    data = args.data_dir
    if data is None:
        env = find_checker_env(HERE / "bfcl" / "env")
        if env is None:
            sys.exit("no --data-dir and no checker environment in benchmarks/bfcl/env")
        data = env.data_dir
    cats = parse_categories(args.categories)
    diff = differing_results(args.run_a, args.run_b, cats)
    run_a, run_b = (json.loads((run / RUN_MANIFEST).read_text()) for run in (args.run_a, args.run_b))
    recorder = TokenRecorder()
    rows = []
    with ToolRuntime(model=args.model, n_threads=args.threads, prefix_cache=False, speculative=False) as rt:
        for c in cats:
            if not diff[c]:
                continue
            entries = {e.id: e for e in load_entries(data, c)}
            ra, rb = read_results(result_file(args.run_a, c)), read_results(result_file(args.run_b, c))
            for entry_id in diff[c]:
                if args.ids and entry_id not in args.ids.split(","):
                    continue
                m = margins(rt, recorder, entries[entry_id], run_a, run_b, ra[entry_id]["result"],
                            rb[entry_id]["result"])
                rows.append({"id": entry_id, **m})
                print(f"{entry_id:24} token {m['position']:3}: A {m['token_a']!r} vs B {m['token_b']!r}; "
                      f"logit A-B one-token {m['margin_stepwise']:+.3f}, batched {m['margin_batched']:+.3f}; "
                      f"max |one-token - batched| {m['batch_noise_max']:.3f}"
                      + "".join(f"  (run {k.upper()}'s output not reproduced by a rerun)"
                                for k, ok in m["reproduced"].items() if not ok)
                      + ("  (reruns agree; recorded outputs re-tokenized)" if m["retokenized"] else ""))
    print(json.dumps({"differing": sum(len(v) for v in diff.values()), "entries": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
