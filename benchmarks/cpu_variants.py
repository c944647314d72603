"""The CPU kernel matrix: llama.cpp built for each CPU feature set this machine can run, measured the same way.

Builds llama-cpp-python from the sdist of the installed version, once per
variant, into a folder of its own under the project's cache (a wheel built with
``pip wheel --no-cache-dir``, so pip's wheel cache never holds a hand-built
llama.cpp, then ``pip install --target``); each measurement runs in a child
process whose PYTHONPATH puts that variant's llama_cpp first. Variants:

- ``avx2``: AVX, AVX2, FMA, F16C, BMI2 only (GGML_NATIVE off), as on older x86 laptops;
- ``avx512``: every feature of this CPU but AMX, named one by one;
- ``native``: the default ``pip install`` build (-march=native; on an AMX CPU
  toolgrad-edge's guard keeps the AMX kernels out);
- ``native-norepack``: the same build with ``TOOLGRAD_EDGE_REPACK=0``, the
  weights left in the plain CPU buffer type: the kernels an AMX CPU runs with
  the guard (no AMX, no repacking), measurable on any CPU.

For each variant and each GGUF given (pick files whose output weights are
Q8_0, Q6_K and BF16), it records the narrow head's max |difference| against
llama.cpp's logits over a fixed text, and ``toolgrad-edge bench`` (prefill and
decode tokens/s, constrained/free, greedy agreement between speculative and
stepwise decoding).

    python benchmarks/cpu_variants.py build
    python benchmarks/cpu_variants.py measure -m gemma-3-270m-q4_k_m.gguf -m gemma3-270m-hf-BF16.gguf \\
        --head-model gemma3-4b-random-Q4_0.gguf [--runs 3] [--json out.json] [--markdown]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

AVX2_OPTIONS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                "-DGGML_BMI2=ON"]
HEAD_TEXT = ('[get_weather(city="Paris", unit="celsius")] The capital of France is Paris, and the capital of '
             'Italy is Rome; the weather there is sunny.')


def variants() -> dict[str, list[str] | None]:
    """name -> CMake options, for the variants this CPU can run (None: the default build in this venv)."""
    from toolgrad_edge.hardware import cmake_feature_args, cpu_flags

    flags = cpu_flags()
    out: dict[str, list[str] | None] = {}
    if "avx2" in flags:
        out["avx2"] = AVX2_OPTIONS
    if "avx512f" in flags:
        out["avx512"] = cmake_feature_args(flags)  # every feature this CPU has, AMX left out
    out["native"] = None
    return out


def variant_dir(name: str) -> Path:
    from toolgrad_edge.paths import cache_root

    return cache_root() / "cpu-variants" / importlib.metadata.version("llama-cpp-python") / name


def build(name: str, options: list[str], jobs: int = 2) -> Path:
    target = variant_dir(name)
    if (target / "llama_cpp").is_dir():
        return target
    version = importlib.metadata.version("llama-cpp-python")
    wheels = target.with_name(name + ".wheel")
    wheels.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_ARGS": " ".join(options), "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
    print(f"building llama-cpp-python {version} [{name}]: {' '.join(options)}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "--no-binary",
                    "llama-cpp-python", f"llama-cpp-python=={version}", "-w", str(wheels)], check=True, env=env)
    [wheel] = wheels.glob("llama_cpp_python-*.whl")
    tmp = target.with_name(name + ".partial")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--target", str(tmp),
                    str(wheel)], check=True)
    tmp.rename(target)
    return target


# Run in the child, with the variant's llama_cpp first on the path.
HEAD_CHILD = r"""
import json, sys
import numpy as np
import llama_cpp
from toolgrad_edge.convert.gguf_header import read_gguf_header
from toolgrad_edge.engines.llama_session import LlamaSession
from toolgrad_edge.engines.output_head import OutputHead
from toolgrad_edge import hardware
from toolgrad_edge.engines.kernel_guard import detect_kernel_plan
path, text = sys.argv[1], sys.argv[2]
head = OutputHead.from_gguf(path, read_gguf_header(path).tensors)
out = {"llama_cpp": llama_cpp.__file__, "system_info": hardware.system_info().strip(),
       "kernels": detect_kernel_plan().reason, "weight_type": head.qtype.name if head else None}
if head is not None:
    plain = LlamaSession(path, n_ctx=512, n_threads=2)
    tokens = plain.tokenize(text)
    plain.decode(tokens[:4], 1)
    worst = 0.0
    narrow = LlamaSession(path, n_ctx=512, n_threads=2, output_head=head)
    narrow._verify_head = False  # compare every pass here, the first one included
    narrow.decode(tokens[:4], 1)
    for k in range(4, len(tokens)):
        full = plain.decode(tokens[k:k + 1], 1)[0]
        ids = np.unique(np.concatenate([np.argsort(-full)[:40], np.arange(0, full.size, full.size // 40)]))
        worst = max(worst, float(np.abs(narrow.decode_narrow(tokens[k:k + 1], ids) - full[ids]).max()))
    out["head_max_abs_difference"] = worst
    out["positions"] = len(tokens) - 4
print(json.dumps(out))
"""


def _child(variant_path: Path | None, args: list[str], extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(extra_env or {})}
    if variant_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(variant_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=3600)


def measure(models: list[Path], runs: int, threads: int | None, head_models: list[Path] = (),
            only: set[str] | None = None) -> dict:
    from toolgrad_edge.hardware import cpu_name

    report = {"cpu": cpu_name(), "runs": runs, "variants": {}}
    for name, options in [*variants().items(), ("native-norepack", None)]:
        path = None if options is None else variant_dir(name)
        extra_env = {"TOOLGRAD_EDGE_REPACK": "0"} if name == "native-norepack" else None
        if only and name not in only:
            continue
        if path is not None and not (path / "llama_cpp").is_dir():
            print(f"[{name}] not built: run `python benchmarks/cpu_variants.py build` first", flush=True)
            continue
        entry = {"cmake_args": options or [], "env": extra_env or {}, "models": {}}
        for model in [*models, *head_models]:
            head = _child(path, ["-c", HEAD_CHILD, str(model), HEAD_TEXT], extra_env)
            if head.returncode != 0:
                raise SystemExit(f"[{name}] {model.name}: head check exited {head.returncode}\n{head.stderr[-2000:]}")
            row = json.loads(head.stdout.strip().splitlines()[-1])
            if model in head_models:  # e.g. the 4B-shaped file for a Q6_K output weight: too slow to bench here
                entry["models"][model.name] = row
                print(f"[{name}] {model.name}: head {row.get('head_max_abs_difference')} ({row['weight_type']})",
                      flush=True)
                continue
            cmd = ["-c", "from toolgrad_edge.cli import main; main()", "bench", "-m", str(model), "--runs", str(runs),
                   "--json", "--no-quality"]
            if threads:
                cmd += ["--threads", str(threads)]
            bench = _child(path, cmd, extra_env)
            if bench.returncode != 0:
                raise SystemExit(f"[{name}] {model.name}: bench exited {bench.returncode}\n{bench.stderr[-2000:]}")
            row["bench"] = json.loads(bench.stdout)
            entry["models"][model.name] = row
            print(f"[{name}] {model.name}: head {row.get('head_max_abs_difference')} ({row['weight_type']})", flush=True)
        report["variants"][name] = entry
    return report


def _bench_figures(bench: dict) -> dict:
    models = bench.get("models") or [bench]
    m = models[0] if isinstance(models, list) else next(iter(models.values()))
    r = m.get("ratios", {})
    return {"prefill": m.get("prefill_tps"), "free": m.get("decode_tps_free"),
            "constrained_vs_free": r.get("constrained_vs_free"), "greedy": m.get("greedy_agreement")}


def markdown(report: dict) -> str:
    lines = [f"CPU: {report['cpu']}; medians of {report['runs']} runs.", "",
             "| build | model (output weight) | head max abs diff | prefill t/s | decode t/s free | "
             "constrained / free | greedy agreement |", "|---|---|---|---|---|---|---|"]
    for name, entry in report["variants"].items():
        for model, row in entry["models"].items():
            f = _bench_figures(row["bench"]) if "bench" in row else {}
            head = row.get("head_max_abs_difference")

            def num(x, fmt):
                return format(x, fmt) if isinstance(x, (int, float)) else "-"

            lines.append(f"| {name} | {model} ({row['weight_type']}) | {num(head, '.1e')} | "
                         f"{num(f.get('prefill'), '.0f')} | {num(f.get('free'), '.1f')} | "
                         f"{num(f.get('constrained_vs_free'), '.2f')} | {num(f.get('greedy'), '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["build", "measure"])
    parser.add_argument("-m", "--model", dest="models", type=Path, action="append", default=[],
                        help="GGUF: head check and bench (repeatable)")
    parser.add_argument("--head-model", dest="head_models", type=Path, action="append", default=[],
                        help="GGUF: head check only (repeatable)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated variants to measure, e.g. native,native-norepack")
    args = parser.parse_args(argv)
    if args.step == "build":
        for name, options in variants().items():
            if options is not None:
                print(build(name, options, args.jobs))
        return 0
    if not args.models and not args.head_models:
        parser.error("measure needs at least one -m MODEL.gguf or --head-model MODEL.gguf")
    only = set(args.only.split(",")) if args.only else None
    report = measure(args.models, args.runs, args.threads, args.head_models, only)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(markdown(report) if args.markdown else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
