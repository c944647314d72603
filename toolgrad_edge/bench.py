"""Speed measurements of one GGUF file, used by `toolgrad-edge bench`.

Every figure is a median over `runs` timed runs after one warm-up, and every
ratio compares two figures measured in the same process on the same prompt:
free decoding, toolgrad-edge's constrained decoding, and llama-cpp-python's
own grammar path (`create_completion(grammar=...)`, the baseline).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Callable

BENCH_PROMPT = "bench_prompt.json"


def bench_prompt(query_index: int = 0) -> tuple[list[dict], list[dict]]:
    """The realistic ~1,500-token tool prompt shipped with the package (BFCL live_multiple tools)."""
    data = json.loads(resources.files("toolgrad_edge").joinpath("data", BENCH_PROMPT).read_text())
    queries = data["queries"]
    return [{"role": "user", "content": queries[query_index % len(queries)]}], data["tools"]


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _baseline_decode(rt, prompt_tokens: list[int], grammar: str, max_tokens: int) -> tuple[float, int]:
    """llama-cpp-python's grammar path on the same loaded model: tokens/s after the first token."""
    from llama_cpp import LlamaGrammar

    llm = rt._llm
    g = LlamaGrammar.from_string(grammar, verbose=False)
    first = None
    n = 0
    for _ in llm.create_completion(prompt_tokens, max_tokens=max_tokens, temperature=0.0, grammar=g, stream=True):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    if n < 2 or first is None:
        return float("nan"), n
    return (n - 1) / (end - first), n


def measure_model(model_path, runs: int = 5, n_threads: int | None = None, n_gpu_layers="auto",
                  max_tokens: int = 64, progress: Callable[[str], None] | None = None) -> dict:
    """Measure one model. Returns medians and same-run ratios (see module docstring)."""
    from .grammars import build_grammar, load_tools
    from .runtime import ToolRuntime

    say = progress or (lambda msg: None)
    messages, tool_dicts = bench_prompt(0)
    tools = load_tools(tool_dicts)
    grammar = build_grammar(tools, syntax="python", tool_choice="required")
    samples: dict[str, list[float]] = {k: [] for k in (
        "prefill_tps", "decode_tps_free", "decode_tps_constrained", "decode_tps_baseline",
        "decode_tps_constrained_no_ff", "constrained_decode_s", "constrained_decode_s_no_ff",
        "ttft_cold_s", "ttft_warm_s")}
    counts = {"free_tokens": [], "constrained_tokens": [], "baseline_tokens": [], "forced_tokens": []}

    with tempfile.TemporaryDirectory(prefix="toolgrad-bench-") as tmp:
        tmp = Path(tmp)
        with ToolRuntime(model_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads, prefix_cache=False) as rt:
            info = {"model": str(rt.model_path), "model_name": rt.model_name, "quant": rt.info.file_type,
                    "file_size_bytes": rt.model_path.stat().st_size, "n_threads": rt.n_threads,
                    "backend": rt.backend, "n_gpu_layers": rt.n_gpu_layers, "cpu": cpu_name()}
            from .prompt import render_prompt

            parts = render_prompt(messages, tools)
            prompt_tokens = rt.tokenize_segments(parts.prefix) + rt.tokenize_segments(parts.rest)
            info["prompt_tokens"] = len(prompt_tokens)
            for i in range(runs + 1):
                say(f"decode run {i}/{runs}")
                # Cold prefill: nothing in the KV cache, no prefix cache.
                rt._llm.n_tokens = 0
                free = rt.call(messages, tools, constrained=False, max_tokens=max_tokens)
                constrained = rt.call(messages, tools, tool_choice="required", max_tokens=max_tokens)
                forced = rt.last_stats.get("forced_tokens", 0)
                rt.fast_forward = False
                no_ff = rt.call(messages, tools, tool_choice="required", max_tokens=max_tokens)
                rt.fast_forward = True
                base_tps, base_n = _baseline_decode(rt, prompt_tokens, grammar, max_tokens)
                if i == 0:
                    continue  # warm-up
                samples["prefill_tps"].append(free.usage.prompt_tokens / free.timings.ttft_s)
                if free.usage.completion_tokens > 1:
                    samples["decode_tps_free"].append(free.usage.completion_tokens / free.timings.decode_s)
                if constrained.usage.completion_tokens > 1:
                    samples["decode_tps_constrained"].append(
                        constrained.usage.completion_tokens / constrained.timings.decode_s)
                samples["decode_tps_baseline"].append(base_tps)
                if no_ff.usage.completion_tokens > 1:
                    samples["decode_tps_constrained_no_ff"].append(
                        no_ff.usage.completion_tokens / no_ff.timings.decode_s)
                samples["constrained_decode_s"].append(constrained.timings.decode_s)
                samples["constrained_decode_s_no_ff"].append(no_ff.timings.decode_s)
                counts["forced_tokens"].append(forced)
                counts["free_tokens"].append(free.usage.completion_tokens)
                counts["constrained_tokens"].append(constrained.usage.completion_tokens)
                counts["baseline_tokens"].append(base_n)
            info["constrained_output"] = constrained.raw_text

        # Time to first token: a new runtime (a new process, as far as the
        # cache can tell) with an empty prefix cache, then again with the
        # entry the first one wrote to disk.
        for i in range(runs + 1):
            say(f"ttft run {i}/{runs}")
            cache = tmp / f"prefix-{i}"
            with ToolRuntime(model_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads, cache_dir=cache) as rt:
                cold = rt.call(messages, tools, tool_choice="required", max_tokens=1)
            with ToolRuntime(model_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads, cache_dir=cache) as rt:
                warm_messages, _ = bench_prompt(1 + i)
                warm = rt.call(warm_messages, tools, tool_choice="required", max_tokens=1)
                hit = rt.prefix_cache.stats.disk_hits
            if i == 0:
                continue
            samples["ttft_cold_s"].append(cold.timings.ttft_s)
            samples["ttft_warm_s"].append(warm.timings.ttft_s)
            info["warm_cached_tokens"] = warm.usage.cached_tokens
            info["warm_disk_hits"] = hit

    result = {**info, **{k: _median(v) for k, v in samples.items()}}
    result["tokens_per_run"] = {k: _median(v) for k, v in counts.items()}
    result["runs"] = runs
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["ratios"] = {
        "constrained_vs_free": result["decode_tps_constrained"] / result["decode_tps_free"],
        "baseline_vs_free": result["decode_tps_baseline"] / result["decode_tps_free"],
        "constrained_vs_baseline": result["decode_tps_constrained"] / result["decode_tps_baseline"],
        "ttft_warm_vs_cold": result["ttft_warm_s"] / result["ttft_cold_s"],
        # Same call with and without feeding forced tool-name tokens in a batch.
        "fast_forward_decode_time": result["constrained_decode_s"] / result["constrained_decode_s_no_ff"],
    }
    return result
