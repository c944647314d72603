"""`toolgrad-edge bench --batch-agreement N`: does a request's greedy answer depend on its neighbours?

The bench's requests (the shipped tool prompt, bench queries 0..N-1,
``tool_choice="required"``, greedy) are decoded three ways, and their
generated token ids compared:

- alone: one at a time on the one-request in-process engine (``parallel=1``,
  what ``serve --parallel 1`` and ``eval --parallel 1`` run): the reference;
- batched engine, alone: one at a time on the batched engine
  (``parallel=N``), so nothing shares its passes;
- batched: all N at once on that batched engine, one thread each, so their
  rows share forward passes.

``batch_agreement`` is the share of requests whose batched token ids equal
the reference's; for each request that differs, the first differing
position. ``engine_alone_agreement`` (batched engine alone against the
reference) tells a difference that comes from the engine itself (its unified
KV cache, the copied tool prefix) from one that comes from the neighbours.
A difference is expected only at greedy near-ties: llama.cpp's kernels round
differently by batch size (docs/server.md). Every decode is also checked
for a valid call list: at least one complete call, each valid for its schema,
and no parse error unless the list was cut by max_tokens (then the calls it
completed count).
"""

from __future__ import annotations

import os
import platform
import threading
from pathlib import Path
from typing import Callable

from ..errors import EvaluationError
from ..hardware import cpu_name
from .compare import _num, markdown_table, text_table
from .measure import bench_prompt

SYNTAX = "python"


def steps(parallel: int) -> int:
    """Progress ticks measure_batch_agreement reports per file."""
    return 2 * parallel + 1


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where the token lists part (the shorter one's length if one extends the other)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _valid(result) -> bool:
    """At least one complete call, each checked against its schema by the runtime's parser; a list cut by
    max_tokens (finish "length") counts by the calls it completed, the one cut in half is no answer."""
    return bool(result.tool_calls) and (not result.parse_error or result.finish_reason == "length")


def _decode(rt, query: int, max_tokens: int):
    messages, tools = bench_prompt(query)
    return rt.call(messages, tools, tool_choice="required", syntax=SYNTAX, max_tokens=max_tokens, parallel=True,
                   temperature=0.0)


def run_together(fns: list[Callable[[], object]], name: str = "together") -> list:
    """Run the functions on one thread each, released together by a barrier; their results in order.

    The first error raised on a thread is raised again here, once every thread has ended.
    """
    results: list = [None] * len(fns)
    errors: list[BaseException] = []
    start = threading.Barrier(len(fns))

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = fns[i]()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"{name}-{i}") for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _at_once(rt, parallel: int, max_tokens: int) -> list:
    """Queries 0..parallel-1 on one thread each, released together; results in query order."""
    return run_together([lambda i=i: _decode(rt, i, max_tokens) for i in range(parallel)], "bench-agreement")


def measure_batch_agreement(model_path=None, parallel: int = 2, *, max_tokens: int = 64,
                            n_threads: int | None = None, grammar_engine: str | None = None,
                            progress: Callable[[str], None] | None = None) -> dict:
    """Decode the bench's first ``parallel`` requests alone and ``parallel`` at once; compare token ids.

    Returns ``{"model", "model_name", "parallel", "max_tokens", "n_threads",
    "requests": [{"query", "identical", "first_difference", "alone_tokens",
    "batched_tokens", "engine_alone_identical", "valid", ...}], "identical",
    "batch_agreement", "engine_alone_identical", "engine_alone_agreement",
    "invalid_decodes", "batched_passes", "mean_tokens_per_pass"}``.
    """
    from ..runtime import ToolRuntime

    if parallel < 2:
        raise EvaluationError(f"--batch-agreement needs at least 2 requests at once, got {parallel}.")
    if max_tokens < 1:
        raise EvaluationError(f"max_tokens must be >= 1, got {max_tokens}.")
    say = progress or (lambda message: None)
    options = dict(n_threads=n_threads, prefix_cache=False, grammar_engine=grammar_engine)

    with ToolRuntime(model_path, **options) as rt:
        info = {"model": str(rt.model_path), "model_name": rt.model_name,
                "n_threads": rt.describe().n_threads, "grammar_engine": rt.grammar_engine}
        alone = []
        for i in range(parallel):
            say(f"alone {i + 1}/{parallel}")
            alone.append(_decode(rt, i, max_tokens))
    with ToolRuntime(model_path, parallel=parallel, **options) as rt:
        engine_alone = []
        for i in range(parallel):
            say(f"batched engine alone {i + 1}/{parallel}")
            engine_alone.append(_decode(rt, i, max_tokens))
        say(f"{parallel} at once")
        before = rt.engine.stats
        batched = _at_once(rt, parallel, max_tokens)
        after = rt.engine.stats

    requests = []
    for i, (a, e, b) in enumerate(zip(alone, engine_alone, batched)):
        first = _first_difference(a.token_ids, b.token_ids)
        row = {"query": i, "identical": first is None, "first_difference": first,
               "alone_tokens": len(a.token_ids), "batched_tokens": len(b.token_ids),
               "alone_finish": a.finish_reason, "batched_finish": b.finish_reason,
               "engine_alone_identical": e.token_ids == a.token_ids,
               "valid": all(_valid(r) for r in (a, e, b))}
        if first is not None:
            row.update(alone_text=a.raw_text, batched_text=b.raw_text)
        invalid = [name for name, r in (("alone", a), ("batched engine alone", e), ("batched", b)) if not _valid(r)]
        if invalid:
            row["invalid"] = [{"decode": name, "raw_text": r.raw_text, "finish_reason": r.finish_reason,
                               "parse_error": r.parse_error}
                              for name, r in (("alone", a), ("batched engine alone", e), ("batched", b))
                              if name in invalid]
        requests.append(row)
    identical = sum(r["identical"] for r in requests)
    engine_identical = sum(r["engine_alone_identical"] for r in requests)
    passes = after["forward_passes"] - before["forward_passes"]
    tokens = after["evaluated_tokens"] - before["evaluated_tokens"]
    return {
        **info, "parallel": parallel, "max_tokens": max_tokens, "requests": requests,
        "identical": identical, "batch_agreement": identical / parallel,
        "engine_alone_identical": engine_identical, "engine_alone_agreement": engine_identical / parallel,
        "invalid_decodes": sum(len(r.get("invalid", [])) for r in requests),
        # How much the "at once" decodes really shared passes: rows per pass while they ran.
        "batched_passes": passes, "mean_tokens_per_pass": tokens / passes if passes else None,
    }


def measure_files(paths: list[Path], parallel: int, *, max_tokens: int = 64, n_threads: int | None = None,
                  grammar_engine: str | None = None, progress: Callable[[str, int], None] | None = None) -> dict:
    """The batch-agreement report of each file: ``{"machine", "parallel", "max_tokens", "models": [...]}``."""
    tick = progress or (lambda label, advance: None)
    models = []
    for path in paths:
        name = Path(path).name

        def say(message: str, name=name) -> None:
            tick(f"{name}: {message}", 1)

        models.append(measure_batch_agreement(path, parallel, max_tokens=max_tokens, n_threads=n_threads,
                                              grammar_engine=grammar_engine, progress=say))
    return {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                        "system": f"{platform.system()} {platform.machine()}",
                        "python": platform.python_version()},
            "parallel": parallel, "max_tokens": max_tokens, "models": models}


# --- output ------------------------------------------------------------------------------

HEADER = ("model", "requests at once", "batch_agreement", "batched engine alone", "tokens per pass",
          "invalid decodes")


def summary_line(model: dict) -> str:
    n = model["parallel"]
    return f"batch_agreement: {model['identical']} of {n} identical"


def table_rows(report: dict) -> list[list[str]]:
    return [[m["model_name"] or "?", str(m["parallel"]), f"{m['identical']} of {m['parallel']}",
             f"{m['engine_alone_identical']} of {m['parallel']}", _num(m["mean_tokens_per_pass"], "{:.2f}"),
             str(m["invalid_decodes"])] for m in report["models"]]


def _context_line(report: dict) -> str:
    return (f"greedy token ids of the bench's first {report['parallel']} requests (tool_choice required, "
            f"max {report['max_tokens']} tokens): {report['parallel']} at once on the batched engine against "
            f"each alone on the one-request engine; {report['machine']['cpu']}")


def _tokens(n: int, finish: str | None) -> str:
    return f"{n} tokens" + (", cut by max tokens" if finish == "length" else "")


def _request_lines(model: dict) -> list[str]:
    out = [f"{model['model_name']}: {summary_line(model)}"]
    for r in model["requests"]:
        if r["identical"]:
            what = f"identical ({_tokens(r['alone_tokens'], r.get('alone_finish'))})"
        else:
            what = (f"differs from token {r['first_difference']} (alone "
                    f"{_tokens(r['alone_tokens'], r.get('alone_finish'))}; batched "
                    f"{_tokens(r['batched_tokens'], r.get('batched_finish'))})")
        if not r["engine_alone_identical"]:
            what += "; the batched engine alone differs too"
        out.append(f"  query {r['query']}: {what}")
        if not r["identical"]:
            out.append(f"    alone:   {r['alone_text']!r}")
            out.append(f"    batched: {r['batched_text']!r}")
        for bad in r.get("invalid", []):
            out.append(f"    invalid ({bad['decode']}, finish {bad['finish_reason']}): "
                       f"{bad['parse_error'] or 'no call'}")
    return out


def format_table(report: dict) -> str:
    out = [_context_line(report), "", *text_table(list(HEADER), table_rows(report)), ""]
    for m in report["models"]:
        out += _request_lines(m)
    return "\n".join(out)


def format_markdown(report: dict) -> str:
    return "\n".join([f"_{_context_line(report)}_", "", *markdown_table(list(HEADER), table_rows(report)), "",
                      *(summary_line(m) for m in report["models"])])
