"""A 2-round assistant conversation: tokens evaluated per round with and without KV reuse, model vs tool time.

The conversation: "What time is it in Tokyo?" -> the model calls
mcp-server-time's get_current_time (round 1, tool_choice required) -> the
result goes back -> the model answers (round 2, tool_choice none). Each
configuration runs the same conversation --repeats times after one warm-up
and reports medians per round:

* reuse: one ToolRuntime for both rounds (the runtime keeps the longest
  common token prefix in its KV cache, and the assistant renders its history
  with the model's own text so that prefix reaches into round 1's answer);
* cold: every round on a fresh ToolRuntime with prefix_cache=False, so each
  round evaluates its whole prompt (the "without" baseline).

The runtime's CallResult carries ``token_ids`` (the answer's tokens as
decoded); the history holds them and round 2 reuses all of round 1's answer.
Rendered from text alone, the reuse would stop where the decoded tokens differ
from the canonical tokenization of the same text.

Per round: prompt tokens, tokens evaluated (prompt minus cached), seconds in
the model, seconds in tools.

    python benchmarks/assistant.py                    # 270M demo model, 3 repeats
    python benchmarks/assistant.py --model model.gguf --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from toolgrad_edge.assistant import Assistant
from toolgrad_edge.runtime import ToolRuntime

QUESTION = "What time is it in Tokyo?"
TIME_SERVER = f"{sys.executable} -m mcp_server_time --local-timezone UTC"


class ColdRuntime:
    """Each call on a freshly loaded ToolRuntime without a prefix cache: nothing is reused."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def call(self, *args, **kwargs):
        with ToolRuntime(prefix_cache=False, **self.kwargs) as rt:
            return rt.call(*args, **kwargs)


def conversation(assistant: Assistant) -> list[dict]:
    """One 2-round conversation; per round: tokens and seconds."""
    assistant.reset()
    t0 = time.perf_counter()
    transcript = assistant.ask(QUESTION)
    wall = time.perf_counter() - t0
    rounds = []
    for i, turn in enumerate(transcript.turns):
        rounds.append({"round": i + 1, "prompt_tokens": turn.prompt_tokens, "cached_tokens": turn.cached_tokens,
                       "evaluated_tokens": turn.evaluated_tokens, "completion_tokens": turn.completion_tokens,
                       "model_s": turn.model_s, "tools_s": turn.tools_s})
    if len(rounds) != 2:
        # The model answered without a complete call (e.g. cut at --max-tokens): not a 2-round sample.
        print(f"note: a conversation took {len(rounds)} model turn(s), not counted: "
              f"{json.dumps(transcript.to_dict())[:300]}", file=sys.stderr)
        return None
    rounds[0]["wall_s"] = wall
    rounds[0]["calls"] = [c.to_dict() for c in transcript.rounds[0].tool_calls] if transcript.rounds else []
    return rounds


def measure(label: str, runtime, repeats: int, max_tokens: int) -> dict:
    with Assistant(runtime, mcp=[TIME_SERVER], tool_choice="required", max_rounds=2,
                   max_tokens=max_tokens) as assistant:
        conversation(assistant)  # warm-up: page the model in, start the prefix cache
        runs = [run for run in (conversation(assistant) for _ in range(repeats)) if run]
    if not runs:
        raise SystemExit(f"{label}: no conversation took 2 rounds; raise --max-tokens or try another --model.")
    summary = {"config": label, "runs": len(runs), "calls": runs[-1][0]["calls"], "rounds": []}
    for r in range(2):
        summary["rounds"].append({key: statistics.median(run[r][key] for run in runs)
                                  for key in ("prompt_tokens", "cached_tokens", "evaluated_tokens",
                                              "completion_tokens", "model_s", "tools_s")})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the runtime's default model).")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    load = dict(model=args.model, n_threads=args.threads)
    results = []
    with ToolRuntime(**load) as rt:
        results.append(measure("reuse", rt, args.repeats, args.max_tokens))
    results.append(measure("cold", ColdRuntime(**load), args.repeats, args.max_tokens))

    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'config':<7} {'runs':>4} {'round':>5} {'prompt':>7} {'cached':>7} {'evaluated':>9} {'generated':>9} "
          f"{'model s':>8} {'tools s':>8}")
    for result in results:
        for i, r in enumerate(result["rounds"]):
            print(f"{result['config']:<7} {result['runs']:>4} {i + 1:>5} {r['prompt_tokens']:>7.0f} "
                  f"{r['cached_tokens']:>7.0f} {r['evaluated_tokens']:>9.0f} {r['completion_tokens']:>9.0f} "
                  f"{r['model_s']:>8.2f} "
                  f"{r['tools_s']:>8.3f}")
    print("round-1 calls:", json.dumps(results[0]["calls"]))


if __name__ == "__main__":
    main()
