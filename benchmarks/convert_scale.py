"""Scale benchmark for the converter: a checkpoint with Gemma-3-4B's real text dimensions.

1. Write a random-weights bf16 checkpoint shaped like ToolGrad 4B's text model
   (34 layers, hidden 2560, ffn 10240, 8 heads, 4 KV heads, head_dim 256,
   vocab 262208), Gemma3ForConditionalGeneration naming, two shards with an
   index (about 7.8 GB), tensor by tensor: never a whole model in memory.
2. safetensors -> BF16 GGUF in a child process: wall time, peak RSS, size.
3. BF16 -> Q4_K_M with llama.cpp's quantizer in a child process: the same.
4. Q4_K_M decode speed (tokens/s) with llama.cpp on this CPU.
5. Delete the multi-GB files (unless --keep).

    python benchmarks/convert_scale.py [--workdir /tmp/toolgrad-scale] [--keep]

Peak RSS is the child's ru_maxrss (os.wait4), so each step is measured alone.
Results are printed and written to benchmarks/out/convert_scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

DIMS = dict(vocab=262208, hidden=2560, ff=10240, layers=34, heads=8, kv_heads=4, head_dim=256)

CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text", "hidden_size": DIMS["hidden"], "intermediate_size": DIMS["ff"],
        "num_hidden_layers": DIMS["layers"], "num_attention_heads": DIMS["heads"],
        "num_key_value_heads": DIMS["kv_heads"], "head_dim": DIMS["head_dim"], "vocab_size": DIMS["vocab"],
        "sliding_window": 1024, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "max_position_embeddings": 131072, "query_pre_attn_scalar": 256,
    },
    "vision_config": {"model_type": "siglip_vision_model"},
    "torch_dtype": "bfloat16",
}


def text_tensor_shapes() -> dict[str, tuple[int, ...]]:
    from types import SimpleNamespace

    from toolgrad_edge.convert.plan import LAYER_SHAPES

    d, p = DIMS, "model.language_model."
    hp = SimpleNamespace(n_embd=d["hidden"], n_head=d["heads"], n_head_kv=d["kv_heads"],
                         head_dim=d["head_dim"], n_ff=d["ff"])
    shapes = {p + "embed_tokens.weight": (d["vocab"], d["hidden"]), p + "norm.weight": (d["hidden"],)}
    for i in range(d["layers"]):
        shapes.update({f"{p}layers.{i}.{suffix}": shape(hp) for suffix, shape in LAYER_SHAPES.items()})
    # A token vision tower: the converter must skip it and say so.
    shapes["model.vision_tower.vision_model.post_layernorm.weight"] = (1152,)
    shapes["model.multi_modal_projector.mm_input_projection_weight"] = (1152, DIMS["hidden"])
    return shapes


def write_shard(path: Path, shapes: dict[str, tuple[int, ...]], pool: np.ndarray, rng) -> None:
    """Header first, then each tensor streamed from a pool of random bf16 values."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            left = math.prod(shape)
            while left:
                start = int(rng.integers(0, len(pool) // 2))
                n = min(left, len(pool) - start)
                f.write(pool[start:start + n].tobytes())
                left -= n


def make_checkpoint(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02)
    pool = (values.view(np.uint32) >> 16).astype("<u2")  # bf16 bits
    shapes = text_tensor_shapes()
    names = list(shapes)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    split, acc = len(names), 0
    for i, n in enumerate(names):  # two shards of about equal size
        acc += math.prod(shapes[n]) * 2
        if acc >= total / 2:
            split = i + 1
            break
    parts = [names[:split], names[split:]]
    weight_map = {}
    for k, part in enumerate(parts, 1):
        file = f"model-{k:05d}-of-00002.safetensors"
        write_shard(folder / file, {n: shapes[n] for n in part}, pool, rng)
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=1))
    (folder / "README.md").write_text("---\nlicense: gemma\n---\nrandom weights, Gemma-3-4B text dimensions\n")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from make_270m_checkpoint import write_tokenizer_files

    write_tokenizer_files(folder, tokenizer_json=False)
    return {"checkpoint_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")), "tensors": len(shapes)}


def run_child(code: str) -> dict:
    """Run Python code in a fresh process; its wall time, peak RSS and stdout (JSON if any)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed ({status}):\n{code}")
    result = {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}  # ru_maxrss is KiB on Linux
    last = out.strip().splitlines()[-1] if out.strip() else ""
    if last.startswith("{"):
        result.update(json.loads(last))
    return result


CONVERT = """
from toolgrad_edge.convert import convert_checkpoint
convert_checkpoint({src!r}, outdir={out!r}, quants=["BF16"], progress=False)
"""

QUANTIZE = """
from toolgrad_edge.convert import quantize_gguf
quantize_gguf({src!r}, {dst!r}, "Q4_K_M")
"""

DECODE = """
import json, time, statistics, numpy as np, llama_cpp
from toolgrad_edge.engines.kernel_guard import load_llama
llm = load_llama({path!r}, n_ctx=512, n_threads={threads}, n_batch=64, verbose=False)
prompt = llm.tokenize(b"<start_of_turn>user\\nWhat is the weather in Paris?<end_of_turn>\\n<start_of_turn>model\\n")
t = time.perf_counter(); llm.eval(prompt); prefill = time.perf_counter() - t
n_vocab = llm.n_vocab()
def last_logits():
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
times, token = [], int(np.argmax(last_logits()))
for i in range({warmup} + {tokens}):
    t = time.perf_counter(); llm.eval([token]); dt = time.perf_counter() - t
    token = int(np.argmax(last_logits()))
    if i >= {warmup}:
        times.append(dt)
print(json.dumps({{"prompt_tokens": len(prompt), "prefill_s": round(prefill, 2), "decoded_tokens": len(times),
                  "decode_tok_s_median": round(1 / statistics.median(times), 2),
                  "decode_tok_s_mean": round(len(times) / sum(times), 2)}}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Converter scale benchmark (Gemma-3-4B text dimensions).")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/toolgrad-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the multi-GB files")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="llama.cpp thread counts to decode with (one run each)")
    args = parser.parse_args(argv)

    work = args.workdir
    ckpt, out = work / "toolgrad-4b-random", work / "gguf"
    results: dict = {"dims": DIMS, "cpu_count": os.cpu_count()}
    try:
        t = time.perf_counter()
        results["checkpoint"] = make_checkpoint(ckpt)
        results["checkpoint"]["write_s"] = round(time.perf_counter() - t, 1)
        print("checkpoint:", results["checkpoint"], flush=True)

        bf16 = out / "toolgrad-4b-random-BF16.gguf"
        results["to_bf16"] = run_child(CONVERT.format(src=str(ckpt), out=str(out)))
        results["to_bf16"]["bytes"] = bf16.stat().st_size
        print("safetensors -> BF16:", results["to_bf16"], flush=True)

        q4 = out / "toolgrad-4b-random-Q4_K_M.gguf"
        results["to_q4_k_m"] = run_child(QUANTIZE.format(src=str(bf16), dst=str(q4)))
        results["to_q4_k_m"]["bytes"] = q4.stat().st_size
        print("BF16 -> Q4_K_M:", results["to_q4_k_m"], flush=True)

        for threads in args.threads:
            key = f"decode_q4_k_m_{threads}_threads"
            results[key] = run_child(DECODE.format(path=str(q4), threads=threads, warmup=4, tokens=args.decode_tokens))
            print(f"Q4_K_M decode, {threads} thread(s):", results[key], flush=True)
        results["load_average_after"] = os.getloadavg()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    target = REPO / "benchmarks" / "out" / "convert_scale.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
