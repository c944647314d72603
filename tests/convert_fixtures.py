"""Checkpoints the converter tests build themselves (no hub, no multi-GB weights).

- ``write_safetensors``: a minimal safetensors writer for hand-made (and broken) files.
- ``build_tiny_causal`` / ``build_tiny_conditional``: random Gemma 3 models with the
  real 262k tokenizer, saved by transformers as sharded bf16 safetensors, with
  norm weights far from zero so that a missing +1 would show.
- ``reference_logits`` / ``llama_logits``: float32 transformers vs llama.cpp, every position.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# A prompt that exercises the real tokenizer and runs past the tiny models' sliding window.
PROMPT = (
    "<start_of_turn>user\nYou can call get_weather(location: str, unit: str). "
    "What's the weather in Paris, in celsius? Answer with a call list.<end_of_turn>\n"
    "<start_of_turn>model\n[get_weather(location='Paris', unit='celsius')]"
)


def load_270m_builder():
    """benchmarks/make_270m_checkpoint.py as a module (benchmarks/ is not a package)."""
    path = REPO / "benchmarks" / "make_270m_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_270m_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]],
                      header_extra: dict | None = None) -> Path:
    """name -> (dtype, shape, raw bytes); written as is, so tests can make broken files."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    header.update(header_extra or {})
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, raw in tensors.values():
            f.write(raw)
    return path


def tiny_text_config(**overrides) -> dict:
    """Small enough for seconds, big enough for llama.cpp's K-quants (rows of 256)."""
    config = dict(
        vocab_size=262144,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=7,  # layers 0-4 and 6 sliding-window, layer 5 global
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        query_pre_attn_scalar=128,  # llama.cpp scales queries by 1/sqrt(head_dim)
        sliding_window=16,
        max_position_embeddings=1024,
        initializer_range=0.05,
        rms_norm_eps=1e-6,
    )
    config.update(overrides)
    return config


def _spread_norms(model, seed: int) -> None:
    """Move every RMSNorm weight far from zero, so storing w instead of 1 + w would show.

    Gemma initialises them at 0 (scale 1 + w = 1). Input-side norms get
    w in [-0.25, 1.25]; the post-attention/post-FFN norms get w in [-0.8, -0.4]
    (scale 0.2..0.6), which keeps each layer's update smaller than the
    residual so the tiny model makes confident predictions, as trained
    models do, and top-1 agreement under quantization means something.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                lo, hi = (-0.8, -0.4) if ".post_" in name else (-0.25, 1.25)
                param.copy_(torch.rand(param.shape, generator=gen) * (hi - lo) + lo)


def copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    for p in tokenizer_dir.iterdir():
        if p.is_file():
            shutil.copy(p, dest / p.name)


def build_tiny_causal(dest: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(**tiny_text_config())
    config.architectures = ["Gemma3ForCausalLM"]
    model = Gemma3ForCausalLM(config).eval()
    _spread_norms(model, seed)
    model.to(torch.bfloat16).save_pretrained(str(dest), max_shard_size="40MB")
    copy_tokenizer(tokenizer_dir, dest)
    (dest / "README.md").write_text("---\nlicense: gemma\n---\ntiny test model\n")
    return dest


def build_tiny_conditional(dest: Path, tokenizer_dir: Path, seed: int = 1) -> Path:
    """4B-like: multimodal wrapper, 262208-entry vocabulary, linear RoPE scaling on global layers."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    text = tiny_text_config(
        vocab_size=262208,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    model = Gemma3ForConditionalGeneration(config).eval()
    _spread_norms(model, seed)
    model.to(torch.bfloat16).save_pretrained(str(dest), max_shard_size="40MB")
    copy_tokenizer(tokenizer_dir, dest)
    (dest / "README.md").write_text("---\nlicense: gemma\n---\ntiny test model\n")
    return dest


def reference_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    """transformers, float32, every position."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3ForConditionalGeneration

    config = AutoConfig.from_pretrained(str(folder))
    cls = Gemma3ForConditionalGeneration if "Gemma3ForConditionalGeneration" in config.architectures else AutoModelForCausalLM
    model = cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def gguf_vocabulary(path: Path) -> list[tuple[bytes, float, int]]:
    """(text, score, type) of every token of a GGUF, for token-by-token comparisons."""
    import gguf

    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    return [(t.encode("utf-8"), float(s), int(k)) for t, s, k in zip(tokens, scores, types)]


def llama_tokens(gguf_path: Path, text: str) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=True)
    finally:
        llm.close()


def llama_logits(gguf_path: Path, tokens: list[int]) -> np.ndarray:
    from toolgrad_edge.engines.kernel_guard import load_llama

    # With the kernel plan: llama.cpp's AMX kernels crash where they are selected.
    llm = load_llama(gguf_path, n_ctx=max(64, len(tokens) + 8), n_batch=512, logits_all=True,
                     n_threads=2, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


# --- hand-made checkpoints (no transformers): for fast unit tests -------------

FAKE_DIMS = dict(vocab=300, hidden=32, ff=64, layers=2, heads=2, kv_heads=1, head_dim=16)


def fake_sentencepiece(path: Path, n_pieces: int = 290) -> Path:
    """A small SentencePiece model: Gemma's first special pieces, then plain ones."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    model = spm_pb.ModelProto()
    specials = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2)]
    for i in range(n_pieces):
        entry = model.pieces.add()
        if i < len(specials):
            entry.piece, entry.type, entry.score = specials[i][0], specials[i][1], 0.0
        elif i == 105:
            entry.piece, entry.type, entry.score = "<start_of_turn>", 4, 0.0  # USER_DEFINED: must end up CONTROL
        elif i == 106:
            entry.piece, entry.type, entry.score = "<end_of_turn>", 4, 0.0
        elif i in (138, 139):  # Gemma's whitespace runs: user-defined, spaces spelled U+2581, score 0
            entry.piece, entry.type, entry.score = "\u2581" * (i - 136), 4, 0.0
        elif i == 200:
            entry.piece, entry.score = "\u2581" + "x" * 150, -float(i)  # a piece longer than 127 bytes
        else:
            entry.piece, entry.score = f"\u2581p{i}", -float(i)
    path.write_bytes(model.SerializeToString())
    return path


def fake_gemma_checkpoint(folder: Path, layout: str = "causal", dtype: str = "BF16", seed: int = 0,
                          extra: dict | None = None, shards: int = 1, tokenizer_dir: Path | None = None) -> Path:
    """Random weights for a 2-layer Gemma 3 in one of the save layouts.

    layout: "causal" (model.*), "cg" (model.language_model.*, transformers >= 4.52),
    "cg-old" (language_model.model.*), each "cg" with a few vision tensors.
    tokenizer_dir: tokenizer files to copy (e.g. ``gemma_tokenizer_dir``; the
    vocabulary then takes its size) instead of the small fake SentencePiece model.
    """
    d = dict(FAKE_DIMS)
    if tokenizer_dir is not None:
        d["vocab"] = 262144
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    text = dict(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["ff"],
                num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                head_dim=d["head_dim"], query_pre_attn_scalar=d["head_dim"], sliding_window=8,
                max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
    if layout == "causal":
        config = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **text}
        prefix = "model."
    else:
        config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                  "text_config": {**text, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}}
        prefix = "model.language_model." if layout == "cg" else "language_model.model."
    (folder / "config.json").write_text(json.dumps(config))

    shapes = {"embed_tokens.weight": (d["vocab"], d["hidden"]), "norm.weight": (d["hidden"],)}
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    for i in range(d["layers"]):
        b = f"layers.{i}."
        shapes.update({
            b + "input_layernorm.weight": (d["hidden"],),
            b + "self_attn.q_proj.weight": (q, d["hidden"]),
            b + "self_attn.k_proj.weight": (kv, d["hidden"]),
            b + "self_attn.v_proj.weight": (kv, d["hidden"]),
            b + "self_attn.o_proj.weight": (d["hidden"], q),
            b + "self_attn.q_norm.weight": (d["head_dim"],),
            b + "self_attn.k_norm.weight": (d["head_dim"],),
            b + "post_attention_layernorm.weight": (d["hidden"],),
            b + "pre_feedforward_layernorm.weight": (d["hidden"],),
            b + "post_feedforward_layernorm.weight": (d["hidden"],),
            b + "mlp.gate_proj.weight": (d["ff"], d["hidden"]),
            b + "mlp.up_proj.weight": (d["ff"], d["hidden"]),
            b + "mlp.down_proj.weight": (d["hidden"], d["ff"]),
        })
    np_dtype = {"BF16": np.float32, "F16": np.float16, "F32": np.float32}[dtype]
    tensors = {}
    for name, shape in shapes.items():
        values = rng.normal(0, 0.5 if name.endswith("norm.weight") else 0.05, size=shape).astype(np_dtype)
        raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes() if dtype == "BF16" else values.tobytes()
        tensors[prefix + name] = (dtype, shape, raw)
    if layout != "causal":
        vision = "model.vision_tower." if layout == "cg" else "vision_tower."
        mmp = "model.multi_modal_projector." if layout == "cg" else "multi_modal_projector."
        for name in (vision + "vision_model.embeddings.patch_embedding.weight", mmp + "mm_input_projection_weight"):
            tensors[name] = ("F32", (4, 4), np.zeros((4, 4), np.float32).tobytes())
    tensors.update(extra or {})
    names = list(tensors)
    if shards == 1:
        write_safetensors(folder / "model.safetensors", tensors)
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(folder / file, {n: tensors[n] for n in part})
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, folder)
        (folder / "README.md").write_text("---\nlicense: gemma\n---\n")
        return folder
    fake_sentencepiece(folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": "{{ bos_token }}{{ messages }}",
        "added_tokens_decoder": {"5": {"content": "<mask>", "special": True}, "6": {"content": "[multimodal]", "special": False}},
    }))
    (folder / "README.md").write_text("---\nlicense: gemma\n---\n")
    return folder


def gemma_tokenizer_dir(gguf_path: Path | None = None) -> Path:
    """tokenizer.model + tokenizer_config.json rebuilt from the real 270M GGUF, built once per process.

    The tokenizer.model is written as Google's is (user-defined pieces spell
    spaces as U+2581), so a converter that copies pieces verbatim shows.
    """
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None:
        import atexit
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="gemma3-tokenizer-"))
        atexit.register(shutil.rmtree, folder, True)
        load_270m_builder().write_tokenizer_files(folder, gguf_path, tokenizer_json=False)
        _TOKENIZER_DIR = folder
    return _TOKENIZER_DIR


_TOKENIZER_DIR: Path | None = None
