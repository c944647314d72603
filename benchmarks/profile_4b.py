"""Memory and pass costs at ToolGrad 4B's size, from a Gemma 3 4B-shaped checkpoint with random weights.

Random weights make the answers meaningless, not the memory or the pass
costs: those depend on the shapes and the quantization only. Three steps:

    python benchmarks/profile_4b.py make     [--dir /work/artifacts/gemma3-4b-random]   # bf16 checkpoint
    python benchmarks/profile_4b.py convert  [--dir ...]   # toolgrad-edge's converter -> Q4_K_M, Q4_0 GGUFs
    python benchmarks/profile_4b.py measure  [--dir ...] [--threads N] [--json out.json]

``measure`` reports, for each GGUF: peak RSS of a fresh process for n_ctx
2k/4k/8k x KV f16/q8_0 x full-size SWA cache on/off (each process loads the
model, evaluates a 256-token prompt, so every weight page is touched, and
exits), next to the planner's estimate (toolgrad_edge.hardware); prefill
tokens/s; and the median cost of one forward pass of k tokens with r logits
rows for k, r in 1, 2, 4, 8, 16 after the prompt. docs/hardware.md is written
from these figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# gemma-3-4b's text config (REFERENCE section 12). The vocabulary is the 270M GGUF's 262,144 tokens
# (the published 4B pads its embedding to 262,208 rows: 64 rows, 0.16 MB in Q4_K_M).
GEMMA3_4B = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                 max_position_embeddings=131072, rms_norm_eps=1e-6)
QUANTS = ("Q4_K_M", "Q4_0")
CONTEXTS = (2048, 4096, 8192)
KV_TYPES = ("f16", "q8_0")
PROMPT_TOKENS = 256
SHAPES = [(k, r) for k in (1, 2, 4, 8, 16) for r in (1, 2, 4, 8, 16) if r <= k]


def make(dest: Path) -> Path:
    """A bf16 Gemma3ForCausalLM of gemma-3-4b's shape with random weights (std 0.02, norms 0), with a tokenizer."""
    import shutil

    import torch
    from make_270m_checkpoint import MODEL_CARD, gemma_gguf_path, write_tokenizer_files
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    gguf_path = gemma_gguf_path()
    tmp = dest.with_name(dest.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = Gemma3TextConfig(
        vocab_size=262144, **GEMMA3_4B, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    config.architectures = ["Gemma3ForCausalLM"]
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, param in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        value = torch.empty(param.shape, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            value.zero_()  # Gemma's norms scale by (1 + w)
        else:
            value.normal_(0.0, 0.02, generator=generator)
        state[name] = value
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as in Gemma 3
    model.load_state_dict(state, assign=True)
    model.save_pretrained(str(tmp), max_shard_size="2GB")
    write_tokenizer_files(tmp, gguf_path)
    (tmp / "README.md").write_text(MODEL_CARD.replace("Gemma 3 270M, dequantized from Q4_K_M",
                                                      "Gemma 3 4B-shaped, random weights"))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def convert(folder: Path) -> list[Path]:
    from toolgrad_edge.convert import convert_checkpoint

    return convert_checkpoint(folder, outdir=folder.parent / "gguf", quants=QUANTS, progress=True)


def gguf_files(folder: Path) -> list[Path]:
    out = folder.parent / "gguf"
    files = sorted(p for p in out.glob("*.gguf") if any(q in p.name for q in QUANTS))
    if not files:
        raise SystemExit(f"no GGUF under {out}: run `convert` first.")
    return files


# -- one configuration, in a fresh process --------------------------------------------------------------------

CHILD = """
import json, resource, sys, time
from toolgrad_edge.engines.llama_session import LlamaSession
path, n_ctx, kv, swa, threads, n_prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", int(sys.argv[5]), int(sys.argv[6])
t = time.perf_counter()
s = LlamaSession(path, n_ctx=n_ctx, n_threads=threads, kv_type=kv, swa_full=swa, n_outputs_max=16)
load = time.perf_counter() - t
tokens = [2] + [(i * 7919) % 200000 + 1000 for i in range(n_prompt - 1)]
t = time.perf_counter()
s.decode(tokens, 1)
prefill = time.perf_counter() - t
status = {}
try:  # Linux: anonymous memory (KV cache, buffers, repacked weights) apart from mapped file pages (the GGUF)
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon", "RssFile")):
            key, value = line.split(":", 1)
            status[key] = int(value.split()[0]) * 1024
except OSError:
    pass
print(json.dumps({"load_s": load, "prefill_s": prefill, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "rss_anon_bytes": status.get("RssAnon"), "rss_file_bytes": status.get("RssFile")}))
"""


def one_config(path: Path, n_ctx: int, kv: str, swa: bool, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(n_ctx), kv, "1" if swa else "0", str(threads),
                          str(PROMPT_TOKENS)], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{path.name} n_ctx={n_ctx} kv={kv} swa_full={swa}: exit {out.returncode}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def pass_costs(path: Path, threads: int, runs: int) -> dict:
    """Median ms of a pass of k tokens with r logits rows after the prompt; prefill tokens/s; one-token pass."""
    from toolgrad_edge.engines.llama_session import LlamaSession

    s = LlamaSession(path, n_ctx=4096, n_threads=threads, n_outputs_max=16)
    try:
        prompt = [2] + [(i * 7919) % 200000 + 1000 for i in range(PROMPT_TOKENS - 1)]
        prefill = []
        for _ in range(runs):
            s.clear()
            t = time.perf_counter()
            s.decode(prompt, 1)
            prefill.append(time.perf_counter() - t)
        filler = prompt[-16:]
        costs = {}
        for k, r in SHAPES:
            times = []
            for i in range(runs + 1):
                t = time.perf_counter()
                s.decode_at(filler[:k], list(range(k - r, k)))
                times.append(time.perf_counter() - t)
                s.rewind(len(prompt))
            costs[f"{k}x{r}"] = 1000 * statistics.median(times[1:])
        return {"prefill_tokens_per_s": PROMPT_TOKENS / statistics.median(prefill), "pass_ms": costs}
    finally:
        s.close()


def measure(folder: Path, threads: int, runs: int, what: str = "all") -> dict:
    from toolgrad_edge import hardware
    from toolgrad_edge.engines.kernel_guard import detect_kernel_plan
    from toolgrad_edge.hardware import cpu_name
    from toolgrad_edge.gguf_info import model_shape, read_gguf_info

    report = {"cpu": cpu_name(), "threads": threads, "prompt_tokens": PROMPT_TOKENS,
              "kernels": detect_kernel_plan().reason, "models": {}}
    for path in gguf_files(folder):
        info = read_gguf_info(path)
        shape = model_shape(info)
        entry = {"file_size_bytes": info.file_size, "quantization": info.file_type, "memory": []}
        matrix = [(n, kv, swa) for n in CONTEXTS for kv in KV_TYPES for swa in (True, False)]
        if "Q4_0" in path.name:  # the other file: the default configuration and the smallest
            matrix = [(8192, "f16", True), (2048, "q8_0", False)]
        for n, kv, swa in (matrix if what in ("all", "memory") else []):
            got = one_config(path, n, kv, swa, threads)
            plan = hardware.choose_context(shape, None, n_ctx=n, kv_type=kv, swa_full=swa)
            entry["memory"].append({"n_ctx": n, "kv_type": kv, "swa_full": swa, **got,
                                    "planned_bytes": plan.need_bytes, "kv_bytes": plan.kv_bytes})
            print(f"{path.name} n_ctx={n} kv={kv} swa_full={swa}: peak RSS {got['peak_rss_bytes'] / 2**30:.2f} GiB "
                  f"(planned {plan.need_bytes / 2**30:.2f})", flush=True)
        if what == "memory":
            report["models"][path.name] = entry
            continue
        entry.update(pass_costs(path, threads, runs))
        print(f"{path.name}: prefill {entry['prefill_tokens_per_s']:.1f} tokens/s, one-token pass "
              f"{entry['pass_ms']['1x1']:.0f} ms", flush=True)
        report["models"][path.name] = entry
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["make", "convert", "measure"])
    parser.add_argument("--dir", type=Path, default=Path("/work/artifacts/gemma3-4b-random"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--what", choices=["all", "memory", "passes"], default="all",
                        help="measure: the memory matrix, the pass costs, or both")
    args = parser.parse_args(argv)
    if args.step == "make":
        print(make(args.dir))
    elif args.step == "convert":
        for p in convert(args.dir):
            print(p, f"{p.stat().st_size / 1e9:.2f} GB")
    else:
        from toolgrad_edge.hardware import default_threads

        report = measure(args.dir, args.threads or default_threads()[0], args.runs, args.what)
        text = json.dumps(report, indent=2)
        if args.json:
            args.json.write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
