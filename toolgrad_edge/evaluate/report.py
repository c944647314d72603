"""The BFCL report: per-category scores, BFCL's summary rules, the seed's table layout.

Summary rules are BFCL's own (bfcl_eval/eval_checker/eval_runner_helper.py):
- Non-live overall: the unweighted mean of Simple, Multiple, Parallel and
  Parallel-multiple. BFCL's Simple also averages Java and JavaScript; the
  seed's table (and this evaluation) is Python only, so Simple = simple_python.
- Live overall: the mean of the four live AST categories weighted by entry count.
- Irrelevance: the unweighted mean of irrelevance and live_irrelevance.
- Relevance: live_relevance.
A summary figure is None (printed "n/a") when one of its categories was not run.

Decoding figures (per category and for the run) come from the records' own
``stats``: tokens per forward pass and draft acceptance, None when no record
has them (result files written before they were recorded).
"""

from __future__ import annotations

import json
from typing import Iterable

from .categories import CALL_CATEGORIES, CATEGORIES, INFERENCE_ERROR_PREFIX, LIVE, NON_LIVE

COLUMNS = ("Simple", "Multi", "Par", "MultiPar", "Overall")


def unweighted_mean(scores: list[dict | None]) -> float | None:
    if not scores or any(s is None or s["accuracy"] is None for s in scores):
        return None
    return sum(s["accuracy"] for s in scores) / len(scores)


def weighted_mean(scores: list[dict | None]) -> float | None:
    if not scores or any(s is None or s["accuracy"] is None for s in scores):
        return None
    n = sum(s["n"] for s in scores)
    return sum(s["accuracy"] * s["n"] for s in scores) / n if n else None


def summarize(categories: dict[str, dict]) -> dict:
    """BFCL's summary figures from per-category {"accuracy", "n", ...} (fractions 0-1)."""
    get = categories.get
    non_live = [get(c) for c in NON_LIVE]
    live = [get(c) for c in LIVE]

    def acc(name):
        s = get(name)
        return None if s is None else s["accuracy"]

    call_cats = [categories[c] for c in CALL_CATEGORIES if c in categories and categories[c]["n"]]
    n_calls_expected = sum(s["n"] for s in call_cats)
    all_cats = [s for s in categories.values() if s["n"]]
    n_entries = sum(s["n"] for s in all_cats)
    latency_total = sum(s.get("latency_total_s", 0.0) for s in all_cats)
    return {
        "non_live": {
            "simple": acc("simple_python"), "multiple": acc("multiple"), "parallel": acc("parallel"),
            "parallel_multiple": acc("parallel_multiple"), "overall": unweighted_mean(non_live),
        },
        "live": {
            "simple": acc("live_simple"), "multiple": acc("live_multiple"), "parallel": acc("live_parallel"),
            "parallel_multiple": acc("live_parallel_multiple"), "overall": weighted_mean(live),
        },
        "relevance": acc("live_relevance"),
        "irrelevance": unweighted_mean([get("irrelevance"), get("live_irrelevance")]),
        "valid_call_rate": (
            sum(s["valid_calls"] for s in call_cats) / n_calls_expected if n_calls_expected else None
        ),
        "mean_latency_s": latency_total / n_entries if n_entries else None,
        "n_entries": n_entries,
        "correct": sum(s["correct"] for s in all_cats),
        "inference_errors": sum(s.get("inference_errors", 0) for s in all_cats),
        "latency_total_s": latency_total,
    }


def decoding_figures(records: Iterable[dict]) -> dict:
    """``tokens_per_forward`` (generated tokens / forward passes) and ``draft_acceptance``
    (accepted / drafted tokens), summed over the records that carry decoding ``stats``."""
    tokens = passes = drafted = accepted = 0
    for r in records:
        stats = r.get("stats")
        if not isinstance(stats, dict) or stats.get("forward_passes") is None:
            continue
        tokens += r.get("output_token_count") or 0
        passes += stats["forward_passes"]
        drafted += stats.get("drafted_tokens") or 0
        accepted += stats.get("accepted_tokens") or 0
    return {
        "tokens_per_forward": tokens / passes if passes else None,
        "draft_acceptance": accepted / drafted if drafted else None,
    }


def build_report(
    *, model: str, grammar: bool, syntax: str, limit: int | None, out_dir: str,
    checker: dict, records: dict[str, list[dict]], wall_s: float | None = None,
    tool_choice: str = "auto", speculative: bool = True, parallel: int = 1,
) -> dict:
    """Merge the checker's scores with the run's own records (latency, errors)."""
    categories = {}
    for name in CATEGORIES:
        if name not in checker["categories"]:
            continue
        s = checker["categories"][name]
        recs = records.get(name, [])
        latencies = [r.get("latency") or 0.0 for r in recs]
        categories[name] = {
            "accuracy": s["accuracy"],
            "n": s["n"],
            "correct": s["correct"],
            "valid_call_rate": s["valid_calls"] / s["n"] if s["n"] else None,
            "valid_calls": s["valid_calls"],
            "with_calls": s["with_calls"],
            "mean_latency_s": sum(latencies) / len(latencies) if latencies else None,
            "latency_total_s": sum(latencies),
            "inference_errors": sum(1 for r in recs if str(r.get("result", "")).startswith(INFERENCE_ERROR_PREFIX)),
            **decoding_figures(recs),
        }
    return {
        "model": model,
        "grammar": grammar,
        "syntax": syntax,
        "tool_choice": tool_choice,
        "speculative": speculative,
        "parallel": parallel,
        "limit": limit,
        "out_dir": out_dir,
        "bfcl_eval": checker.get("bfcl_eval"),
        "categories": categories,
        "summary": {
            **summarize(categories),
            **decoding_figures(r for name in categories for r in records.get(name, [])),
            "wall_s": wall_s,
        },
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _tool_choice_text(tool_choice: str) -> str:
    if tool_choice == "auto":
        return "tool choice auto"
    return f"tool choice {tool_choice} (relevance categories: auto)"


def format_table(report: dict) -> str:
    """The seed's table (Non-live / Live: Simple, Multi, Par, MultiPar, Overall; Relevance, Irrelevance)."""
    s = report["summary"]
    cats = report["categories"]
    limit = f"first {report['limit']} per category" if report.get("limit") else "all entries"
    lines = [
        f"BFCL v1+v2 (bfcl-eval {report.get('bfcl_eval') or '?'} ast_checker), model {report['model']}",
        f"grammar {'on' if report['grammar'] else 'off'}, syntax {report['syntax']}, "
        f"{_tool_choice_text(report.get('tool_choice', 'auto'))}"
        f"{'' if report.get('speculative', True) else ', speculative decoding off'}, {limit}"
        + ("" if report.get("parallel", 1) == 1 else f", {report['parallel']} entries at once"),
        "",
        f"{'':10}" + "".join(f"{c:>10}" for c in COLUMNS),
    ]
    for label, key, names in (("Non-live", "non_live", NON_LIVE), ("Live", "live", LIVE)):
        row = s[key]
        values = [row["simple"], row["multiple"], row["parallel"], row["parallel_multiple"], row["overall"]]
        lines.append(f"{label:10}" + "".join(f"{_pct(v):>10}" for v in values))
        counts = [cats[c]["n"] if c in cats else 0 for c in names]
        lines.append(f"{'  (n)':10}" + "".join(f"{n:>10}" for n in counts) + f"{sum(counts):>10}")
    lines += [
        "",
        f"{'Relevance':12}{_pct(s['relevance']):>8}   (n={cats['live_relevance']['n'] if 'live_relevance' in cats else 0})",
        f"{'Irrelevance':12}{_pct(s['irrelevance']):>8}   (n="
        + "+".join(str(cats[c]["n"]) for c in ("irrelevance", "live_irrelevance") if c in cats) + ")",
        "",
        f"valid-call rate {_pct(s['valid_call_rate'])} %   mean latency "
        + ("n/a" if s["mean_latency_s"] is None else f"{s['mean_latency_s']:.2f} s/entry")
        + f"   entries {s['n_entries']} ({s['correct']} correct, {s['inference_errors']} inference errors)"
        + ("" if s.get("wall_s") is None else f"   wall {s['wall_s']:.0f} s"),
    ]
    if s.get("tokens_per_forward") is not None:
        acceptance = s.get("draft_acceptance")
        lines.append(f"decoding: {s['tokens_per_forward']:.2f} tokens per forward pass, draft acceptance "
                     + ("n/a (no drafts)" if acceptance is None else f"{100 * acceptance:.1f} %"))
    lines.append(f"result files: {report['out_dir']}")
    return "\n".join(lines)


def format_category_table(report: dict) -> str:
    """Per-category detail: accuracy, n, valid-call rate, mean latency."""
    lines = [f"{'category':24}{'acc %':>8}{'n':>6}{'valid %':>9}{'s/entry':>9}"]
    for name, c in report["categories"].items():
        lat = "n/a" if c["mean_latency_s"] is None else f"{c['mean_latency_s']:.2f}"
        lines.append(f"{name:24}{_pct(c['accuracy']):>8}{c['n']:>6}{_pct(c['valid_call_rate']):>9}{lat:>9}")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The seed's table as Markdown (for docs)."""
    s = report["summary"]
    head = "| | Simple | Multi | Par | MultiPar | Overall |\n|---|---|---|---|---|---|"
    rows = []
    for label, key in (("Non-live", "non_live"), ("Live", "live")):
        r = s[key]
        vals = [r["simple"], r["multiple"], r["parallel"], r["parallel_multiple"], r["overall"]]
        rows.append(f"| {label} | " + " | ".join(_pct(v) for v in vals) + " |")
    tail = (
        f"\n\nRelevance {_pct(s['relevance'])}, Irrelevance {_pct(s['irrelevance'])}, "
        f"valid-call rate {_pct(s['valid_call_rate'])} %, mean latency "
        + ("n/a" if s["mean_latency_s"] is None else f"{s['mean_latency_s']:.2f} s/entry")
        + f", {s['n_entries']} entries."
    )
    return head + "\n" + "\n".join(rows) + tail


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)
