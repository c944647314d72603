"""Speed measurements of one GGUF file, used by `toolgrad-edge bench`.

Every figure is a median over `runs` timed runs after one warm-up, and every
ratio compares two figures measured in the same process on the same prompts:

- free: plain decoding, no grammar, one token per forward pass;
- constrained: the default engine (grammar engine as a sample-then-check
  gate, jump-forward, prompt-lookup drafts, the draft model when given);
- stepwise: the same grammar, one token per forward pass (speculative=False);
- baseline: llama-cpp-python's own grammar path (`create_completion(grammar=...)`),
  on its own `Llama` object in a child process (so that peak_rss_bytes is the runtime's).

Decode speed counts the tokens after the prompt over the time after it.
greedy_agreement is the fraction of the bench queries of the run (one per run,
warm-up included) whose greedy output is the same text with and without speculation.
cold_warm_agreement (python workload) is the fraction of those greedy runs, in
both modes, whose token ids are the same again with an empty KV cache, so that
the tool prefix is evaluated instead of kept (expected 1.0).
"""

from __future__ import annotations

import json
import os
import sys
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from ..errors import EvaluationError
from ..hardware import cpu_name

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


def _baseline_decode(model_path, n_threads: int, n_gpu_layers: int, n_ctx: int, prompt_tokens: list[int],
                     grammar: str, max_tokens: int, runs: int) -> tuple[float, int]:
    """llama-cpp-python's grammar path on the same file: median tokens/s after the first token."""
    from llama_cpp import LlamaGrammar

    from ..engines.kernel_guard import load_llama
    from ..engines.llama_session import quiet_stderr

    with quiet_stderr(True):
        llm = load_llama(model_path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                    n_gpu_layers=n_gpu_layers, verbose=False)
    try:
        g = LlamaGrammar.from_string(grammar, verbose=False)
        speeds, counts = [], []
        for i in range(runs + 1):
            first = None
            n = 0
            for _ in llm.create_completion(prompt_tokens, max_tokens=max_tokens, temperature=0.0, grammar=g,
                                           stream=True):
                n += 1
                if first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
            if i and n >= 2 and first is not None:
                speeds.append((n - 1) / (end - first))
                counts.append(n)
        return _median(speeds), int(_median(counts)) if counts else 0
    finally:
        llm.close()


def _decode_tps(result) -> float | None:
    if result.usage.completion_tokens < 2 or result.timings.decode_s <= 0:
        return None
    return result.usage.completion_tokens / result.timings.decode_s


class _Series:
    """Timed calls of one kind: speeds and summed step statistics."""

    def __init__(self):
        self.tps: list[float] = []
        self.tokens: list[int] = []
        self.passes = self.drafted = self.accepted = self.forced = self.completion = self.narrow = 0

    def add(self, result) -> None:
        tps = _decode_tps(result)
        if tps is not None:
            self.tps.append(tps)
        self.tokens.append(result.usage.completion_tokens)
        st = result.stats
        self.passes += st.get("forward_passes") or 0
        self.drafted += st.get("drafted_tokens") or 0
        self.accepted += st.get("accepted_tokens") or 0
        self.forced += st.get("forced_tokens") or 0
        self.narrow += st.get("narrow_passes") or 0
        self.completion += result.usage.completion_tokens

    def report(self, prefix: str = "") -> dict:
        return {
            f"{prefix}decode_tps": _median(self.tps),
            f"{prefix}tokens": _median(self.tokens),
            f"{prefix}tokens_per_forward": self.completion / self.passes if self.passes else None,
            f"{prefix}draft_acceptance": self.accepted / self.drafted if self.drafted else None,
            f"{prefix}forced_tokens": self.forced,
        }


def _divergence(rt, messages, tool_dicts, syntax: str, spec, step) -> dict:
    """Where two greedy outputs part, and by how much the model preferred the stepwise token there.

    The logits at the first differing token are recomputed one token at a
    time; a gap smaller than the batched-versus-one-token noise (up to about
    0.9 on this back-end) is a near-tie, not a bug.
    """
    from ..engines.llama_session import common_prefix
    from ..grammars import load_tools
    from ..prompt import render_prompt

    a, b = spec.token_ids, step.token_ids
    k = common_prefix(a, b)
    if k >= min(len(a), len(b)):
        return {"first_difference_token": k, "logit_gap": None}
    parts = render_prompt(messages, load_tools(tool_dicts), syntax)
    tokens = rt.tokenize_segments(parts.prefix) + rt.tokenize_segments(parts.rest) + b[:k]
    session = rt.session
    session.sync(tokens[:-1])
    logits = session.decode(tokens[-1:], 1)[0]
    return {"first_difference_token": k, "logit_gap": float(logits[b[k]] - logits[a[k]]),
            "speculative_token": session.piece(a[k]).decode("utf-8", "replace"),
            "stepwise_token": session.piece(b[k]).decode("utf-8", "replace")}


FORWARD_SHAPES = ((1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 4), (8, 8))


def _forward_costs(rt, prompt_tokens: list[int], runs: int) -> dict:
    """Median milliseconds of one forward pass after the bench prompt, per (tokens, logits rows).

    These bound what several tokens per pass can gain on this model and
    machine: a forced token rides along for the cost of a token without a
    logits row, a draft token needs a row, and on a small model the
    262k-row output layer is most of a pass.
    """
    session = rt.session
    session.sync(prompt_tokens)
    filler = prompt_tokens[-8:]  # any tokens: the cost depends on the shape, not on which
    out = {}
    for n_tokens, rows in FORWARD_SHAPES:
        times = []
        for _ in range(max(runs, 3) + 1):
            start = time.perf_counter()
            session.decode(filler[:n_tokens], rows)
            times.append(time.perf_counter() - start)
            session.rewind(len(prompt_tokens))
        out[f"{n_tokens}_tokens_{rows}_rows"] = 1000 * _median(times[1:])
    return out


def _cold_warm_agreement(rt, kwargs: dict, warm: dict) -> dict:
    """Each warm greedy run {(query, speculative): token ids} again with its tool prefix evaluated."""
    _, tool_dicts = bench_prompt(0)
    differences = []
    for (i, speculative), token_ids in warm.items():
        messages, _ = bench_prompt(i)
        rt.clear_kv_cache()
        cold = rt.call(messages, tool_dicts, speculative=speculative, **kwargs)
        if cold.token_ids != token_ids:
            differences.append({"query": i, "speculative": speculative, "cold": cold.raw_text})
    return {"cold_warm_agreement": 1 - len(differences) / len(warm) if warm else None,
            "cold_warm_runs": len(warm), "cold_warm_differences": differences}


def _workload(rt, syntax: str, runs: int, max_tokens: int, say, label: str,
              with_free: bool = False) -> dict:
    """Timed free / constrained / stepwise calls, one bench query per run, and their greedy agreement."""
    _, tool_dicts = bench_prompt(0)
    free, spec, step = _Series(), _Series(), _Series()
    kwargs = dict(tool_choice="required", syntax=syntax, max_tokens=max_tokens, parallel=True)
    agree = 0
    outputs = []
    warm = {}  # (query, speculative) -> greedy token ids with the tool prefix kept in the KV cache
    for i in range(runs + 1):
        say(f"{label} run {i}/{runs}")
        messages, _ = bench_prompt(i)
        if with_free:
            f = rt.call(messages, tool_dicts, constrained=False, speculative=False, max_tokens=max_tokens)
        c = rt.call(messages, tool_dicts, speculative=True, **kwargs)
        s = rt.call(messages, tool_dicts, speculative=False, **kwargs)
        agree += c.raw_text == s.raw_text
        warm[(i, True)], warm[(i, False)] = c.token_ids, s.token_ids
        if c.raw_text != s.raw_text:
            outputs.append({"query": i, "speculative": c.raw_text, "stepwise": s.raw_text,
                            **_divergence(rt, messages, tool_dicts, syntax, c, s)})
        if i:  # run 0 is the warm-up
            if with_free:
                free.add(f)
            spec.add(c)
            step.add(s)
    out = {
        "decode_tps_constrained": _median(spec.tps),
        "decode_tps_stepwise": _median(step.tps),
        "tokens_per_forward": spec.completion / spec.passes if spec.passes else None,
        "draft_acceptance": spec.accepted / spec.drafted if spec.drafted else None,
        "forced_tokens_per_run": spec.forced / max(runs, 1),
        "narrow_passes_per_run": spec.narrow / max(runs, 1),
        "forward_passes_per_run": spec.passes / max(runs, 1),
        "greedy_agreement": agree / (runs + 1),
        "greedy_prompts": runs + 1,
        "greedy_differences": outputs,
        "max_logit_gap_of_differences": max((abs(d["logit_gap"]) for d in outputs if d["logit_gap"] is not None),
                                            default=None),
        "constrained_tokens": _median(spec.tokens),
        "stepwise_tokens": _median(step.tokens),
    }
    if with_free:
        out["decode_tps_free"] = _median(free.tps)
        out["free_tokens"] = _median(free.tokens)
        out.update(_cold_warm_agreement(rt, kwargs, warm))
    return out


def measure_model(model_path, runs: int = 5, n_threads: int | None = None, n_gpu_layers="auto",
                  max_tokens: int = 64, progress: Callable[[str], None] | None = None,
                  draft_model: str | os.PathLike | None = None, grammar_engine: str | None = None) -> dict:
    """Measure one model. Returns medians and same-run ratios (see module docstring)."""
    from ..grammars import build_grammar, load_tools
    from ..prompt import render_prompt
    from ..runtime import ToolRuntime

    say = progress or (lambda msg: None)
    messages, tool_dicts = bench_prompt(0)
    tools = load_tools(tool_dicts)
    grammar = build_grammar(tools, syntax="python", tool_choice="required")
    prefill: list[float] = []
    ttft_cold: list[float] = []
    ttft_warm: list[float] = []

    with tempfile.TemporaryDirectory(prefix="toolgrad-bench-") as tmp:
        tmp = Path(tmp)
        with ToolRuntime(model_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads, prefix_cache=False,
                         grammar_engine=grammar_engine) as rt:
            described = rt.describe()
            info = {"model": str(rt.model_path), "model_name": rt.model_name, "quant": described.gguf.file_type,
                    "file_size_bytes": rt.model_path.stat().st_size, "n_threads": described.n_threads,
                    "backend": rt.backend, "n_gpu_layers": described.n_gpu_layers, "cpu": cpu_name(),
                    "grammar_engine": rt.grammar_engine, "max_tokens": max_tokens}
            n_ctx, n_gpu = rt.n_ctx, described.n_gpu_layers
            parts = render_prompt(messages, tools)
            prompt_tokens = rt.tokenize_segments(parts.prefix) + rt.tokenize_segments(parts.rest)
            info["prompt_tokens"] = len(prompt_tokens)
            for i in range(runs + 1):
                say(f"prefill run {i}/{runs}")
                rt.clear_kv_cache()  # cold prefill: nothing in the KV cache, no prefix cache
                r = rt.call(messages, tool_dicts, constrained=False, speculative=False, max_tokens=1)
                if i:
                    prefill.append(r.usage.prompt_tokens / r.timings.ttft_s)
            python = _workload(rt, "python", runs, max_tokens, say, "python", with_free=True)
            js = _workload(rt, "json", runs, max_tokens, say, "json")
            say("forward pass costs")
            forward_ms = _forward_costs(rt, prompt_tokens, runs)
            info["constrained_output"] = rt.call(messages, tool_dicts, tool_choice="required",
                                                 max_tokens=max_tokens).raw_text
        drafted = None
        if draft_model is not None:
            with ToolRuntime(model_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads, prefix_cache=False,
                             grammar_engine=grammar_engine, draft_model=draft_model) as rt:
                drafted = {"draft_model": str(draft_model),
                           "python": _workload(rt, "python", runs, max_tokens, say, "draft python"),
                           "json": _workload(rt, "json", runs, max_tokens, say, "draft json")}

        # Time to first token: a new runtime (a new process, as far as the
        # cache can tell) with an empty prefix cache, then again with the
        # entry the first one wrote to disk.
        for i in range(runs + 1):
            say(f"ttft run {i}/{runs}")
            cache = tmp / f"prefix-{i}"
            with ToolRuntime(model_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads, cache_dir=cache,
                             grammar_engine=grammar_engine) as rt:
                cold = rt.call(messages, tools, tool_choice="required", max_tokens=1)
            with ToolRuntime(model_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads, cache_dir=cache,
                             grammar_engine=grammar_engine) as rt:
                warm_messages, _ = bench_prompt(1 + i)
                warm = rt.call(warm_messages, tools, tool_choice="required", max_tokens=1)
                hit = rt.engine.prefix_cache.stats.disk_hits
            if i == 0:
                continue
            ttft_cold.append(cold.timings.ttft_s)
            ttft_warm.append(warm.timings.ttft_s)
            info["warm_cached_tokens"] = warm.usage.cached_tokens
            info["warm_disk_hits"] = hit

    say("baseline (llama-cpp-python's grammar path)")
    # In a process of its own: its Llama object's memory is not the runtime's peak RSS.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        base_tps, base_n = pool.submit(_baseline_decode, str(model_path), info["n_threads"], n_gpu, n_ctx,
                                       prompt_tokens, grammar, max_tokens, runs).result()
    result = {**info, "prefill_tps": _median(prefill), "ttft_cold_s": _median(ttft_cold),
              "ttft_warm_s": _median(ttft_warm)}
    result.update({k: v for k, v in python.items()})
    result["decode_tps_baseline"] = base_tps
    result["forward_ms"] = forward_ms
    result["json"] = js
    if drafted is not None:
        result["with_draft_model"] = drafted
    result["tokens_per_run"] = {"free_tokens": python["free_tokens"],
                                "constrained_tokens": python["constrained_tokens"],
                                "stepwise_tokens": python["stepwise_tokens"], "baseline_tokens": base_n}
    result["runs"] = runs
    result["peak_rss_bytes"] = _peak_rss_bytes()
    free = result["decode_tps_free"]
    result["ratios"] = {
        "constrained_vs_free": result["decode_tps_constrained"] / free,
        "stepwise_vs_free": result["decode_tps_stepwise"] / free,
        "json_constrained_vs_free": js["decode_tps_constrained"] / free,
        "json_stepwise_vs_free": js["decode_tps_stepwise"] / free,
        "baseline_vs_free": base_tps / free,
        "constrained_vs_baseline": result["decode_tps_constrained"] / base_tps,
        "ttft_warm_vs_cold": result["ttft_warm_s"] / result["ttft_cold_s"],
    }
    if drafted is not None:
        result["ratios"]["draft_model_constrained_vs_free"] = drafted["python"]["decode_tps_constrained"] / free
    return result


def measure_in_subprocess(draft_model: str | os.PathLike | None = None, grammar_engine: str | None = None):
    """A `measure` for compare.compare_models: measure_model in a fresh interpreter per file
    (so each file's peak RSS is its own), with this module's options."""

    def measure(path: Path, *, runs: int, n_threads: int | None, n_gpu_layers="auto", max_tokens: int = 64,
                progress: Callable[[str, int], None] | None = None) -> dict:
        cmd = [sys.executable, "-m", "toolgrad_edge.bench.measure", str(path), "--runs", str(runs),
               "--max-tokens", str(max_tokens), "--n-gpu-layers", str(n_gpu_layers)]
        if n_threads:
            cmd += ["--threads", str(n_threads)]
        if draft_model:
            cmd += ["--draft-model", str(draft_model)]
        if grammar_engine:
            cmd += ["--grammar-engine", grammar_engine]
        return run_measure_child(cmd, path, progress)

    return measure


def run_measure_child(cmd: list[str], path: Path, progress: Callable[[str, int], None] | None = None) -> dict:
    """Run a measuring child process: its PROGRESS lines on stderr tick `progress`, its last stdout line is the JSON result."""
    say = progress or (lambda label, advance: None)
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        tail: list[str] = []
        for line in proc.stderr:
            if line.startswith("PROGRESS "):
                say(f"{Path(path).name}: {line[9:].strip()}", 1)
            else:
                tail = (tail + [line.rstrip()])[-10:]
        proc.wait()
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise EvaluationError(f"measuring {path} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads(text.strip().splitlines()[-1])


def steps_per_file(runs: int, draft_model: bool = False) -> int:
    """Progress ticks measure_model reports per file."""
    workloads = 4 if draft_model else 2
    return (runs + 1) * (3 + workloads) + 2


def _main(argv: Sequence[str]) -> int:
    import argparse

    from ..errors import ToolgradEdgeError

    parser = argparse.ArgumentParser(prog="python -m toolgrad_edge.bench.measure")
    parser.add_argument("model")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--n-gpu-layers", default="auto")
    parser.add_argument("--draft-model", default=None)
    parser.add_argument("--grammar-engine", default=None)
    args = parser.parse_args(list(argv))
    gpu = args.n_gpu_layers if args.n_gpu_layers == "auto" else int(args.n_gpu_layers)

    def progress(message: str) -> None:
        print(f"PROGRESS {message}", file=sys.stderr, flush=True)

    try:
        result = measure_model(args.model, runs=args.runs, n_threads=args.threads, n_gpu_layers=gpu,
                               max_tokens=args.max_tokens, progress=progress, draft_model=args.draft_model,
                               grammar_engine=args.grammar_engine)
    except ToolgradEdgeError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
