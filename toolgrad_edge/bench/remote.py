"""`toolgrad-edge bench --engine URL`: the bench's tool-call workload over one llama-server.

The same requests as the local bench (toolgrad_edge.bench.measure): the shipped tool
prompt, one bench query per run, tool_choice="required", in both call
syntaxes, sent through ``ToolRuntime(engine=URL)``, so rendering, /tokenize,
the grammar, the HTTP stream and the parsing are all inside the figures. One
client, one request at a time; run 0 is the warm-up (it also leaves the tool
prefix in a slot's cache), then medians of ``runs`` timed runs.

Every figure is as this client sees it:

- decode_tps_constrained: tokens after the first over the time after the first
  streamed piece (the first piece ends the TTFT, so its token is not counted twice);
- ttft_warm_s: from the call to the first streamed piece, with the tool prefix
  in a slot's cache (warm_cached_tokens: how many prompt tokens the server reused);
- latency_p50_s: whole calls, rendering to parsed result;
- valid_fraction: timed calls that came back as schema-valid calls (at least
  one call, no parse_error); invalid_calls lists the others.

What only a run on a local file can see (file size, peak RSS, prefill speed,
free and stepwise decoding, llama-cpp-python's baseline, tokens per forward
pass, cold TTFT, quality) is left out, not estimated.
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Callable

from ..hardware import cpu_name
from .compare import _num, markdown_table, text_table
from .measure import bench_prompt

SYNTAXES = ("python", "json")


def steps(runs: int) -> int:
    """Progress ticks measure_engine reports."""
    return len(SYNTAXES) * (runs + 1)


def _median(values: list[float]):
    return float(statistics.median(values)) if values else None


def _decode_tps(result) -> float | None:
    """Tokens after the first over the time after the first piece; None below two tokens."""
    if result.usage.completion_tokens < 2 or result.timings.decode_s <= 0:
        return None
    return (result.usage.completion_tokens - 1) / result.timings.decode_s


def _workload(rt, syntax: str, runs: int, max_tokens: int, say: Callable[[str], None]) -> tuple[dict, object]:
    """Timed required calls, one bench query per run; returns the figures and the warm-up's result."""
    _, tool_dicts = bench_prompt(0)
    tps, tokens, ttft, latency, cached = [], [], [], [], []
    invalid = []
    warm = None
    for i in range(runs + 1):
        say(f"{syntax} run {i}/{runs}")
        messages, _ = bench_prompt(i)
        result = rt.call(messages, tool_dicts, tool_choice="required", syntax=syntax, max_tokens=max_tokens,
                         parallel=True)
        if i == 0:
            warm = result
            continue
        speed = _decode_tps(result)
        if speed is not None:
            tps.append(speed)
        tokens.append(result.usage.completion_tokens)
        ttft.append(result.timings.ttft_s)
        latency.append(result.timings.total_s)
        cached.append(result.usage.cached_tokens)
        if not result.tool_calls or result.parse_error:
            invalid.append({"query": i, "raw_text": result.raw_text, "finish_reason": result.finish_reason,
                            "parse_error": result.parse_error})
    figures = {
        "decode_tps_constrained": _median(tps),
        "constrained_tokens": _median(tokens),
        "ttft_warm_s": _median(ttft),
        "warm_cached_tokens": _median(cached),
        "latency_p50_s": _median(latency),
        "valid_fraction": (runs - len(invalid)) / runs,
        "invalid_calls": invalid,
    }
    return figures, warm


def measure_engine(url, runs: int = 5, max_tokens: int = 64,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Measure toolgrad-edge over the llama-server at ``url`` (or a LlamaServerEngine); the report dict.

    Raises GenerationError (naming the URL) when the server is unreachable or
    fails, ModelLoadError when it does not serve a Gemma 3 vocabulary.
    """
    from ..errors import EvaluationError
    from ..runtime import ToolRuntime

    if runs < 1 or max_tokens < 2:
        raise EvaluationError(f"runs must be >= 1 and max_tokens >= 2, got runs={runs} max_tokens={max_tokens}.")
    say = progress or (lambda message: None)
    with ToolRuntime(engine=url) as rt:
        info = rt.describe().server
        python, warm = _workload(rt, "python", runs, max_tokens, say)
        js, _ = _workload(rt, "json", runs, max_tokens, say)
    server = {"url": info.url, "model": info.model, "n_ctx_per_slot": info.n_ctx, "n_vocab": info.n_vocab,
              "total_slots": info.total_slots, "build": info.build}
    entry = {
        "model": info.model, "model_name": Path(info.model).stem if info.model else None,
        "backend": f"llama-server at {info.url}", "grammar_engine": "llama-server", "max_tokens": max_tokens,
        "prompt_tokens": warm.usage.prompt_tokens,  # query 0, tokenized by the server
        **python,
        "constrained_output": warm.raw_text,
        "json": js,
        "runs": runs,
    }
    return {
        # The client's machine: decoding happens on the server ("server" says what it reported).
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "backend": entry["backend"],
                    "system": f"{platform.system()} {platform.machine()}", "python": platform.python_version()},
        "runs": runs,
        "server": server,
        "models": [entry],
    }


# --- output ------------------------------------------------------------------------------

HEADER = ("model", "prompt tokens", "constrained t/s", "json constrained t/s", "tokens/call",
          "TTFT warm s", "cached tokens", "latency p50 s", "valid", "json valid")


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for m in report["models"]:
        js = m.get("json") or {}
        rows.append([
            m.get("model_name") or "?", _num(m.get("prompt_tokens"), "{}"),
            _num(m.get("decode_tps_constrained")), _num(js.get("decode_tps_constrained")),
            _num(m.get("constrained_tokens"), "{:g}"), _num(m.get("ttft_warm_s"), "{:.3f}"),
            _num(m.get("warm_cached_tokens"), "{:g}"), _num(m.get("latency_p50_s"), "{:.3f}"),
            _num(m.get("valid_fraction"), "{:.0%}"), _num(js.get("valid_fraction"), "{:.0%}"),
        ])
    return rows


def _context_line(report: dict) -> str:
    s, m = report["server"], report["machine"]
    return (f"llama-server at {s['url']} (build {s['build'] or '?'}, {s['total_slots'] or '?'} slots of "
            f"{s['n_ctx_per_slot']} tokens), one client on {m['cpu']}; medians of {report['runs']} runs "
            "after a warm-up")


NOTE = ("As this client sees it: constrained t/s = tokens after the first / time after the first streamed piece; "
        "TTFT = call to first piece, tool prefix cached on the server. Prefill, free decoding, peak RSS and "
        "quality need a local file: toolgrad-edge bench -m FILE.")


def format_table(report: dict) -> str:
    out = [_context_line(report), "", *text_table(list(HEADER), table_rows(report)), "", NOTE]
    for m in report["models"]:
        for syntax, figures in (("python", m), ("json", m.get("json") or {})):
            for bad in figures.get("invalid_calls") or []:
                out.append(f"invalid ({syntax}, query {bad['query']}, finish {bad['finish_reason']}): "
                           f"{bad['parse_error'] or 'no call'}")
    return "\n".join(out)


def format_markdown(report: dict) -> str:
    return "\n".join([f"_{_context_line(report)}_", "", *markdown_table(list(HEADER), table_rows(report))])
