"""Memory and pass costs at ToolGrad 4B's size, from a Gemma 3 4B-shaped checkpoint with random weights.

Random weights make the answers meaningless, not the memory or the pass
costs: those depend on the shapes and the quantization only. The steps:

    python benchmarks/profile_4b.py make     [--dir /work/artifacts/gemma3-4b-random]   # bf16 checkpoint
    python benchmarks/profile_4b.py convert  [--dir ...]   # toolgrad-edge's converter -> Q4_K_M, Q4_0 GGUFs
    python benchmarks/profile_4b.py measure  [--dir ...] [--threads N] [--json out.json]
    python benchmarks/profile_4b.py sequences [--dir ...] [--threads N] [--runs 7] [--json out.json]

``measure`` reports, for each GGUF: peak RSS of a fresh process for n_ctx
2k/4k/8k x KV f16/q8_0 x full-size SWA cache on/off (each process loads the
model, evaluates a 256-token prompt, so every weight page is touched, and
exits), next to the planner's estimate (toolgrad_edge.hardware); prefill
tokens/s; and the median cost of one forward pass of k tokens with r logits
rows for k, r in 1, 2, 4, 8, 16 after the prompt. docs/hardware.md is written
from these figures.

``sequences`` times the batched engine's passes on the Q4_K_M file: one pass
carrying 1, 2, 4 and 8 sequences (one token each, a logits row each) through
``MultiSession.run``, the sequences sharing a 256-token prefix by
``copy_sequence``; each pass whole ("full") and stopped after the final norm
("hidden": what a pass with a narrow output head costs). ``convert --quants
Q4_K_M`` makes only the file it needs.
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


def convert(folder: Path, quants: tuple[str, ...] = QUANTS) -> list[Path]:
    from toolgrad_edge.convert import convert_checkpoint

    return convert_checkpoint(folder, outdir=folder.parent / "gguf", quants=quants, progress=True)


def gguf_files(folder: Path, quants: tuple[str, ...] = QUANTS) -> list[Path]:
    out = folder.parent / "gguf"
    files = sorted(p for p in out.glob("*.gguf") if any(q in p.name for q in quants))
    if not files:
        raise SystemExit(f"no {'/'.join(quants)} GGUF under {out}: run `convert` first.")
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


# -- passes carrying several sequences (the batched engine's session) ---------------------------------------

SEQUENCE_COUNTS = (1, 2, 4, 8)
SEQUENCE_MODES = ("full", "hidden")


def sequence_passes(path: Path, threads: int, runs: int, n_ctx: int = 4096) -> dict:
    """Median ms of one MultiSession pass carrying k sequences, one token and one logits row each.

    The prefix (PROMPT_TOKENS tokens) is evaluated once in sequence 8 and
    copied to sequences 0-7 (``copy_sequence``: shared cells, as the batched
    engine shares a tool prefix). Every timed pass puts its tokens at
    position PROMPT_TOKENS and is removed again after it, so all passes see
    the same cache. "full" passes compute the output layer; "hidden" passes
    stop after ``result_norm`` (``_want_hidden``), which is what a pass with
    a narrow output head costs. Rounds interleave every (k, mode) cell, so
    load from other processes falls on all cells alike; round 0 is a warm-up.
    """
    from toolgrad_edge.engines.multi_session import MultiSession
    from toolgrad_edge.engines.output_head import OutputHead
    from toolgrad_edge.engines.scheduler import Slice, Submission
    from toolgrad_edge.gguf_info import read_gguf_info

    info = read_gguf_info(path)
    head = OutputHead.from_gguf(path, info.tensors)
    if head is None:
        raise SystemExit(f"{path.name}: its output weight's type has no narrow head; hidden-only passes "
                         "cannot be timed.")
    n_seq = max(SEQUENCE_COUNTS)
    prefix_seq = n_seq
    s = MultiSession(path, n_seq_max=n_seq + 1, n_ctx=n_ctx, n_threads=threads, n_batch=512,
                     output_head=head, n_outputs_max=max(16, 4 * n_seq))
    if s._head is None:
        raise SystemExit(f"{path.name}: the session turned the narrow head off (llama_cpp._ggml not loadable).")
    try:
        prompt = [2] + [(i * 7919) % 200000 + 1000 for i in range(PROMPT_TOKENS - 1)]
        p = len(prompt)
        t = time.perf_counter()
        s.run([Slice(Submission(prefix_seq, prompt, 0, [p - 1]), 0, p, (p - 1,))])
        prefill_s = time.perf_counter() - t
        for seq in range(n_seq):
            s.copy_sequence(prefix_seq, seq, p)
        s._verify_head = False  # no pass of this run checks the head against a whole pass
        times: dict[tuple[int, str], list[float]] = {(k, m): [] for k in SEQUENCE_COUNTS for m in SEQUENCE_MODES}
        rescanned = 0
        for rnd in range(runs + 1):
            for k in SEQUENCE_COUNTS:
                for mode in SEQUENCE_MODES:
                    plan = [Slice(Submission(seq, [prompt[1 + (rnd * n_seq + seq) % (p - 1)]], p, [0]), 0, 1, (0,))
                            for seq in range(k)]
                    for attempt in range(3):
                        s._want_hidden = mode == "hidden"
                        s._hidden = None
                        try:
                            t = time.perf_counter()
                            rows = s.run(plan)
                            took = time.perf_counter() - t
                        finally:
                            s._want_hidden = False
                            for seq in range(k):
                                s.remove(seq, p)
                        if len(rows) != k:
                            raise SystemExit(f"a pass of {k} sequences returned {len(rows)} logits rows")
                        if mode == "full":
                            break
                        if s._hidden is not None and s._hidden.size == k * head.n_embd:
                            break
                        # The callback did not find result_norm at a known address (a graph of a new
                        # shape): that pass ran whole. Look the node up by name and pass again.
                        s._scan_names = True
                        rescanned += 1
                    else:
                        raise SystemExit(f"hidden-only pass of {k} sequences did not stop after result_norm")
                    if rnd:
                        times[(k, mode)].append(took)
            for seq in range(n_seq):
                if s.sequence_length(seq) != p:
                    raise SystemExit(f"sequence {seq} holds {s.sequence_length(seq)} positions after a round, not {p}")
        ms = {mode: {k: 1000 * statistics.median(times[(k, mode)]) for k in SEQUENCE_COUNTS}
              for mode in SEQUENCE_MODES}
        fastest = {mode: {k: 1000 * min(times[(k, mode)]) for k in SEQUENCE_COUNTS} for mode in SEQUENCE_MODES}
        return {"file": path.name, "prefix_tokens": p, "prefix_prefill_s": prefill_s, "n_ctx": n_ctx,
                "runs": runs, "hidden_rescans": rescanned, "pass_ms": ms, "min_ms": fastest,
                "all_ms": {f"{k}/{m}": [round(1000 * x, 1) for x in v] for (k, m), v in times.items()},
                "ratio_to_1": {m: {k: ms[m][k] / ms[m][1] for k in SEQUENCE_COUNTS} for m in SEQUENCE_MODES},
                "calls_per_pass_time_8": {m: 8 * ms[m][1] / ms[m][8] for m in SEQUENCE_MODES}}
    finally:
        s.close()


def sequences(folder: Path, threads: int, runs: int) -> dict:
    import os

    from toolgrad_edge.hardware import cpu_name

    files = gguf_files(folder, ("Q4_K_M",))
    if len(files) > 1:
        raise SystemExit(f"several Q4_K_M files under {files[0].parent}: {', '.join(f.name for f in files)}")
    path = files[0]
    load = os.getloadavg()
    report = {"cpu": cpu_name(), "threads": threads, "load_before": load[0],
              **sequence_passes(path, threads, runs)}
    report["load_after"] = os.getloadavg()[0]
    return report


def sequences_table(r: dict) -> str:
    ms, ratio, low = r["pass_ms"], r["ratio_to_1"], r["min_ms"]
    lines = [f"{r['file']}: {r['cpu']}, {r['threads']} threads, prefix {r['prefix_tokens']} tokens shared by "
             f"copy_sequence, medians of {r['runs']} passes (ms; fastest pass in brackets)", "",
             "| sequences in the pass | full | ratio to 1 | hidden only | ratio to 1 |", "|---|---|---|---|---|"]
    for k in SEQUENCE_COUNTS:
        lines.append(f"| {k} | {ms['full'][k]:.0f} ({low['full'][k]:.0f}) | {ratio['full'][k]:.2f} "
                     f"| {ms['hidden'][k]:.0f} ({low['hidden'][k]:.0f}) | {ratio['hidden'][k]:.2f} |")
    c = r["calls_per_pass_time_8"]
    lines += ["", f"8 x cost(1) / cost(8): full {c['full']:.2f}, hidden only {c['hidden']:.2f}",
              f"load average before / after: {r['load_before']:.2f} / {r['load_after']:.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["make", "convert", "measure", "sequences"])
    parser.add_argument("--dir", type=Path, default=Path("/work/artifacts/gemma3-4b-random"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None,
                        help="timed runs per figure (measure: 3; sequences: 7, at least 5)")
    parser.add_argument("--quants", nargs="+", default=list(QUANTS), choices=QUANTS,
                        help="convert: the GGUF types to write")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--what", choices=["all", "memory", "passes"], default="all",
                        help="measure: the memory matrix, the pass costs, or both")
    args = parser.parse_args(argv)
    if args.step == "make":
        print(make(args.dir))
    elif args.step == "convert":
        for p in convert(args.dir, tuple(args.quants)):
            print(p, f"{p.stat().st_size / 1e9:.2f} GB")
    elif args.step == "sequences":
        from toolgrad_edge.hardware import default_threads

        runs = 7 if args.runs is None else args.runs
        if runs < 5:
            parser.error("sequences: --runs must be at least 5")
        report = sequences(args.dir, args.threads or default_threads()[0], runs)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        print(sequences_table(report))
    else:
        from toolgrad_edge.hardware import default_threads

        report = measure(args.dir, args.threads or default_threads()[0], args.runs or 3, args.what)
        text = json.dumps(report, indent=2)
        if args.json:
            args.json.write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
