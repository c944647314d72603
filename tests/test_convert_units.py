"""Converter unit tests: hand-made checkpoints, no transformers, no model run (seconds)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from convert_fixtures import fake_gemma_checkpoint, fake_sentencepiece, write_safetensors
from toolgrad_edge.cli import main as cli
from toolgrad_edge.convert import convert_checkpoint, quantize_gguf
from toolgrad_edge.convert import output as output_mod
from toolgrad_edge.convert.gguf_header import read_gguf_header
from toolgrad_edge.convert.output import atomic_output, output_name
from toolgrad_edge.convert.plan import build_plan, hparams_from_config
from toolgrad_edge.convert.safetensors_reader import (
    SafetensorsCheckpoint, float32_to_bf16_bits, read_header, to_float32,
)
from toolgrad_edge.convert.tokenizer import read_sentencepiece, read_vocabulary
from toolgrad_edge.convert.writer import StreamedTensor
from toolgrad_edge.errors import ConversionError

TokenType = gguf.TokenType


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


# --- dtypes --------------------------------------------------------------------


def test_bf16_round_trip_and_rounding():
    values = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, 65536.0, 2.0**-100], dtype=np.float32)
    bits = float32_to_bf16_bits(values)
    assert np.array_equal(to_float32(bits, "BF16"), values)  # all exactly representable
    # 1 + 2^-8 lies halfway between two bf16 values: ties go to even (1.0).
    assert float32_to_bf16_bits(np.array([1.0 + 2**-8], np.float32))[0] == 0x3F80
    assert float32_to_bf16_bits(np.array([1.0 + 3 * 2**-8], np.float32))[0] == 0x3F82
    assert np.isnan(to_float32(float32_to_bf16_bits(np.array([np.nan], np.float32)), "BF16"))[0]


# --- safetensors ---------------------------------------------------------------


def test_header_and_chunks(tmp_path):
    data = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
    path = write_safetensors(tmp_path / "a.safetensors", {"w": ("F32", (40, 6), data.tobytes())})
    info = read_header(path)["w"]
    assert (info.dtype, info.shape, info.nbytes) == ("F32", (40, 6), data.nbytes)
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        chunks = list(ckpt.iter_chunks(info, chunk_bytes=100))  # 4 rows of 24 bytes per chunk
        assert len(chunks) == 10 and all(c.shape == (4, 6) for c in chunks)
        assert np.array_equal(np.concatenate(chunks), data)
        assert np.array_equal(ckpt.read(info), data)


def test_truncated_shard_names_file_and_tensor(tmp_path):
    path = write_safetensors(tmp_path / "model.safetensors", {
        "a": ("F32", (4,), b"\0" * 16), "b": ("F32", (1000,), b"\0" * 4000)})
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(ConversionError, match=r"model\.safetensors: truncated: tensor 'b'"):
        read_header(path)
    path.write_bytes(b"\x05")
    with pytest.raises(ConversionError, match="incomplete"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ConversionError, match="not a safetensors file, or truncated"):
        read_header(path)


def test_unsupported_dtype_and_size_mismatch(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", {"q": ("I8", (4,), b"\0" * 4)})
    with pytest.raises(ConversionError, match=r"tensor 'q' has dtype I8; supported: BF16, F16, F32"):
        read_header(path)
    path = write_safetensors(tmp_path / "y.safetensors", {"w": ("F32", (4,), b"\0" * 12)})
    with pytest.raises(ConversionError, match=r"tensor 'w' of shape \[4\] F32 needs 16 bytes"):
        read_header(path)


@pytest.mark.parametrize("offsets, message", [
    # b starts inside a: the GGUF would get a's bytes in b
    ({"a": [0, 16], "b": [8, 24]}, r"x\.safetensors: tensor 'b' \(bytes \[8, 24\)\) overlaps tensor 'a' \(bytes \[0, 16\)\)"),
    # both tensors on the same bytes
    ({"a": [0, 16], "b": [0, 16]}, r"x\.safetensors: tensor '[ab]' .* overlaps tensor '[ab]'"),
    # header order does not matter, byte order does
    ({"b": [4, 20], "a": [16, 32]}, r"tensor 'a' \(bytes \[16, 32\)\) overlaps tensor 'b'"),
    # reversed range
    ({"a": [16, 0], "b": [16, 32]}, r"tensor 'a' of shape \[4\] F32 needs 16 bytes, header gives range \[16, 0\)"),
    # past the end of the data
    ({"a": [0, 16], "b": [32, 48]}, r"truncated: tensor 'b' ends at byte"),
])
def test_data_offsets_in_range_ordered_and_disjoint(tmp_path, offsets, message):
    raw = np.arange(8, dtype=np.float32).tobytes()  # 32 bytes of data
    header = {name: {"dtype": "F32", "shape": [4], "data_offsets": span} for name, span in offsets.items()}
    path = write_safetensors(tmp_path / "x.safetensors", {}, header_extra=header)
    with open(path, "ab") as f:
        f.write(raw)
    with pytest.raises(ConversionError, match=message):
        read_header(path)


def test_adjacent_tensors_are_fine(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", {"a": ("F32", (4,), b"\0" * 16), "b": ("F32", (4,), b"\1" * 16),
                                                          "e": ("F32", (0,), b"")})
    assert sorted(read_header(path)) == ["a", "b", "e"]


def test_index_naming_missing_shard(tmp_path):
    ckpt = fake_gemma_checkpoint(tmp_path / "m", shards=2)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"names 1 shard\(s\) missing .*model-00002-of-00002\.safetensors"):
        SafetensorsCheckpoint(ckpt)


def test_pickle_checkpoints_are_refused_by_name(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin: pickle files are never loaded"):
        SafetensorsCheckpoint(tmp_path)


# --- config and tensor plan ----------------------------------------------------

# What google/gemma-3-4b-it's config.json says (text_config omits defaults).
GEMMA3_4B_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152},
}


def test_hparams_of_gemma3_4b_fill_defaults():
    hp = hparams_from_config(GEMMA3_4B_CONFIG)
    assert (hp.n_vocab, hp.n_embd, hp.n_ff, hp.n_layer) == (262208, 2560, 10240, 34)
    assert (hp.n_head, hp.n_head_kv, hp.head_dim, hp.sliding_window) == (8, 4, 256, 1024)
    assert (hp.rope_freq_base, hp.rope_freq_base_swa, hp.rope_scaling_factor) == (1e6, 1e4, 8.0)


def test_hparams_transformers5_rope_parameters():
    text = dict(GEMMA3_4B_CONFIG["text_config"])
    del text["rope_scaling"]
    text["rope_parameters"] = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    hp = hparams_from_config({**GEMMA3_4B_CONFIG, "text_config": text})
    assert (hp.rope_freq_base, hp.rope_freq_base_swa, hp.rope_scaling_factor) == (1e6, 1e4, 8.0)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"]}, "architecture LlamaForCausalLM is not supported"),
    ({"architectures": []}, "architecture none is not supported"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is set"),
    ({"query_pre_attn_scalar": 224}, r"query_pre_attn_scalar=224 .* 1/sqrt\(256\)"),
    ({"layer_types": ["full_attention"] * 26}, "first at layer 0"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"use_bidirectional_attention": True}, "llama.cpp's gemma3 graph is causal"),
])
def test_hparams_refusals(change, message):
    config = {"architectures": ["Gemma3ForCausalLM"], "hidden_size": 1152, "intermediate_size": 6912,
              "num_hidden_layers": 26, **change}
    with pytest.raises(ConversionError, match=message):
        hparams_from_config(config)


@pytest.mark.parametrize("layout", ["causal", "cg", "cg-old"])
def test_plan_maps_every_layout_and_skips_vision(tmp_path, layout):
    folder = fake_gemma_checkpoint(tmp_path / layout, layout=layout)
    hp = hparams_from_config(json.loads((folder / "config.json").read_text()))
    with SafetensorsCheckpoint(folder) as ckpt:
        plan = build_plan(ckpt, hp)
    targets = [t.target for t in plan.tensors]
    assert targets[:2] == ["token_embd.weight", "output_norm.weight"]
    assert "output.weight" not in targets  # tied embeddings
    assert {"blk.1.attn_q.weight", "blk.1.ffn_norm.weight", "blk.1.post_ffw_norm.weight",
            "blk.1.post_attention_norm.weight", "blk.0.attn_k_norm.weight"} <= set(targets)
    assert len(targets) == 2 + 13 * 2
    assert {t.target for t in plan.tensors if t.is_norm} == {n for n in targets if n.endswith("norm.weight")}
    assert len(plan.skipped_vision) == (0 if layout == "causal" else 2)


def test_plan_untied_head_and_padded_vocabulary(tmp_path):
    rows = 310  # 10 padding rows past vocab_size: cut, as llama.cpp does
    head = ("BF16", (rows, 32), b"\0" * rows * 32 * 2)
    folder = fake_gemma_checkpoint(tmp_path / "m", extra={"lm_head.weight": head})
    hp = hparams_from_config(json.loads((folder / "config.json").read_text()))
    with SafetensorsCheckpoint(folder) as ckpt:
        plan = build_plan(ckpt, hp)
    out = next(t for t in plan.tensors if t.target == "output.weight")
    assert out.shape == (300, 32)


def test_plan_lists_unknown_tensors(tmp_path):
    extra = {f"model.layers.0.mystery_{i}.weight": ("F32", (2,), b"\0" * 8) for i in range(3)}
    extra["model.layers.5.input_layernorm.weight"] = ("F32", (32,), b"\0" * 128)  # beyond num_hidden_layers
    folder = fake_gemma_checkpoint(tmp_path / "m", extra=extra)
    hp = hparams_from_config(json.loads((folder / "config.json").read_text()))
    with SafetensorsCheckpoint(folder) as ckpt, pytest.raises(ConversionError) as err:
        build_plan(ckpt, hp)
    message = str(err.value)
    assert "4 tensor(s) not part of a Gemma 3 text model with 2 layers" in message
    assert "model.layers.0.mystery_0.weight" in message and "model.layers.5.input_layernorm.weight" in message


def test_plan_shape_mismatch_names_tensor_and_file(tmp_path):
    folder = fake_gemma_checkpoint(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48
    with SafetensorsCheckpoint(folder) as ckpt, pytest.raises(ConversionError) as err:
        build_plan(ckpt, hparams_from_config(config))
    assert "model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape [64, 32], config.json implies [48, 32]" in str(err.value)


def test_plan_missing_tensor(tmp_path):
    folder = fake_gemma_checkpoint(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    with SafetensorsCheckpoint(folder) as ckpt, pytest.raises(ConversionError, match=r"13 expected tensor\(s\) missing: model\.layers\.2\."):
        build_plan(ckpt, hparams_from_config(config))


# --- tokenizer -----------------------------------------------------------------


def test_sentencepiece_reader_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    path = fake_sentencepiece(tmp_path / "tokenizer.model")
    pieces = read_sentencepiece(path)
    proc = spm.SentencePieceProcessor(model_file=str(path))
    assert len(pieces) == proc.get_piece_size()
    for i, (piece, score, _kind) in enumerate(pieces):
        assert piece.decode() == proc.id_to_piece(i) and score == proc.get_score(i)
    assert pieces[3][2] == TokenType.UNKNOWN and pieces[0][2] == TokenType.CONTROL
    assert len(pieces[200][0]) > 127  # multi-byte length took the general path


def test_vocabulary_pads_applies_added_tokens_and_controls(tmp_path):
    folder = fake_gemma_checkpoint(tmp_path / "m")
    vocab = read_vocabulary(folder, 300)
    assert len(vocab) == 300 and vocab.tokens[295] == b"[PAD295]" and vocab.types[295] == TokenType.UNUSED
    assert vocab.types[105] == vocab.types[106] == TokenType.CONTROL  # <start_of_turn>, <end_of_turn>
    assert (vocab.tokens[5], vocab.types[5]) == (b"<mask>", TokenType.CONTROL)  # special in tokenizer_config
    assert (vocab.tokens[6], vocab.types[6]) == (b"[multimodal]", TokenType.USER_DEFINED)


def test_missing_tokenizer_says_what_and_where(tmp_path):
    folder = fake_gemma_checkpoint(tmp_path / "m")
    (folder / "tokenizer.model").unlink()
    with pytest.raises(ConversionError, match=r"expected tokenizer\.model \(SentencePiece\) or tokenizer\.json.*google/gemma-3-4b-it"):
        convert_checkpoint(folder, outdir=tmp_path / "out", quants=["F32"], progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_config(tmp_path):
    folder = fake_gemma_checkpoint(tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ConversionError, match="config.json is missing"):
        convert_checkpoint(folder, outdir=tmp_path / "out", quants=["F32"], progress=False)


# --- end to end without llama.cpp ----------------------------------------------


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_f32_output_is_exact_with_norms_plus_one(tmp_path, dtype):
    folder = fake_gemma_checkpoint(tmp_path / "m", layout="cg", dtype=dtype, shards=3)
    [path] = convert_checkpoint(folder, outdir=tmp_path / "out", quants=["F32"], progress=False)
    assert path == tmp_path / "out" / "m-F32.gguf"
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    with SafetensorsCheckpoint(folder) as ckpt:
        src = {n: to_float32(ckpt.read(ckpt[n]), ckpt[n].dtype) for n in ckpt.tensors}
    norm = src["model.language_model.layers.1.post_feedforward_layernorm.weight"]
    assert np.abs(norm).min() < 1.0  # far from 1: a missing +1 would show
    assert np.array_equal(np.asarray(tensors["blk.1.post_ffw_norm.weight"].data), norm + np.float32(1))
    assert np.array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data),
                          src["model.language_model.layers.0.self_attn.q_proj.weight"])
    assert _field(reader, "gemma3.rope.scaling.factor") == 8.0
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32


def test_bf16_output_metadata_is_complete(tmp_path):
    folder = fake_gemma_checkpoint(tmp_path / "m")
    [path] = convert_checkpoint(folder, outdir=tmp_path, quants=["bf16"], progress=False)
    reader = gguf.GGUFReader(path)
    expected = {
        "general.architecture": "gemma3", "general.name": "m", "general.license": "gemma",
        "general.file_type": gguf.LlamaFileType.MOSTLY_BF16, "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "gemma3.context_length": 512, "gemma3.embedding_length": 32, "gemma3.block_count": 2,
        "gemma3.feed_forward_length": 64, "gemma3.attention.head_count": 2, "gemma3.attention.head_count_kv": 1,
        "gemma3.attention.key_length": 16, "gemma3.attention.value_length": 16,
        "gemma3.attention.sliding_window": 8, "gemma3.rope.freq_base": 1e6, "gemma3.rope.freq_base_swa": 1e4,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": "{{ bos_token }}{{ messages }}",
    }
    for key, value in expected.items():
        got = _field(reader, key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key
    assert len(_field(reader, "tokenizer.ggml.tokens")) == 300
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32"


def test_interrupted_conversion_leaves_no_file(tmp_path, monkeypatch):
    folder = fake_gemma_checkpoint(tmp_path / "m")
    calls = {"n": 0}
    real = StreamedTensor.tofile

    def interrupt_third(self, fout):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(self, fout)

    monkeypatch.setattr(StreamedTensor, "tofile", interrupt_third)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(folder, outdir=out, quants=["BF16", "Q8_0"], progress=False)
    assert list(out.iterdir()) == []


def test_atomic_output_cleans_up_and_renames(tmp_path):
    final = tmp_path / "a.gguf"
    with pytest.raises(RuntimeError):
        with atomic_output(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(final) as tmp:
        tmp.write_bytes(b"done")
    assert final.read_bytes() == b"done" and list(tmp_path.iterdir()) == [final]


def test_disk_space_checked_before_writing(tmp_path, monkeypatch):
    folder = fake_gemma_checkpoint(tmp_path / "m")

    class Tiny:
        free = 1000

    monkeypatch.setattr(output_mod.shutil, "disk_usage", lambda p: Tiny)
    with pytest.raises(ConversionError, match=r"needs about .* GB free, has 0\.00 GB"):
        convert_checkpoint(folder, outdir=tmp_path / "out", quants=["BF16"], progress=False)
    assert not (tmp_path / "out").exists()


def test_output_folder_that_cannot_be_created_says_so(tmp_path):
    folder = fake_gemma_checkpoint(tmp_path / "m")
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    with pytest.raises(ConversionError, match=r"afile: cannot create the output folder: .*afile is a file, not a folder"):
        convert_checkpoint(folder, outfile=afile / "x.gguf", quants=["BF16"], progress=False)
    with pytest.raises(ConversionError, match=r"cannot create the output folder: .*afile is a file"):
        convert_checkpoint(folder, outfile=afile / "sub" / "x.gguf", quants=["BF16"], progress=False)
    if Path("/proc/self").is_dir():  # /proc refuses new folders, even to root
        with pytest.raises(ConversionError, match=r"/proc/nope: cannot create the output folder \(No such file"):
            convert_checkpoint(folder, outfile="/proc/nope/x.gguf", quants=["BF16"], progress=False)
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(folder), "-q", "BF16", "-o", str(afile / "x.gguf"), "--quiet"])
    assert result.exit_code == 1 and "is a file, not a folder" in result.output, result.output
    assert "Traceback" not in result.output and "GB free" not in result.output
    assert afile.read_text() == "a file, not a folder"


def test_nonfinite_weights_are_converted_with_a_warning(tmp_path, caplog):
    norm = np.full(32, 0.5, np.float32)
    norm[[1, 5]] = [np.nan, -np.inf]  # replaces the final norm: same name and shape, so the plan holds
    extra = {"model.norm.weight": ("BF16", (32,), float32_to_bf16_bits(norm).astype("<u2").tobytes())}
    folder = fake_gemma_checkpoint(tmp_path / "m2", extra=extra)
    with caplog.at_level("WARNING", logger="toolgrad_edge.convert"):
        [path] = convert_checkpoint(folder, outdir=tmp_path / "o", quants=["BF16"], progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "2 NaN/Inf weights in model.norm.weight (2)" in warnings[0], warnings
    assert path.is_file()
    caplog.clear()
    with caplog.at_level("WARNING", logger="toolgrad_edge.convert"):
        convert_checkpoint(fake_gemma_checkpoint(tmp_path / "m"), outdir=tmp_path / "o2", quants=["BF16"], progress=False)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_one_quantization_table():
    from toolgrad_edge.bench import compare as bench_compare
    from toolgrad_edge.cli import convert_cmd
    from toolgrad_edge.convert.quantize import BITS_PER_WEIGHT, QUANT_TYPES

    assert set(QUANT_TYPES) <= set(BITS_PER_WEIGHT)
    assert convert_cmd._QUANTS == tuple(QUANT_TYPES)
    assert convert_cmd._TYPES == ("F32", "F16", "BF16", *QUANT_TYPES)
    for name, bits in BITS_PER_WEIGHT.items():
        assert bench_compare.precision_bits(name) == bits
    assert [QUANT_TYPES[q].bits_per_weight for q in QUANT_TYPES] == sorted(
        (QUANT_TYPES[q].bits_per_weight for q in QUANT_TYPES), reverse=True)
    files = [{"quant": q, "file_size_bytes": 1} for q in ("F16", "BF16", "Q8_0")]
    assert bench_compare.pick_reference(files) == 1  # BF16 over F16 at equal size: Gemma 3 overflows F16


def test_argument_errors(tmp_path):
    folder = fake_gemma_checkpoint(tmp_path / "m")
    with pytest.raises(ConversionError, match="unknown output type 'Q3_K'"):
        convert_checkpoint(folder, quants=["Q3_K"], progress=False)
    with pytest.raises(ConversionError, match="outfile names one file but 2 types"):
        convert_checkpoint(folder, outfile=tmp_path / "x.gguf", quants=["BF16", "Q8_0"], progress=False)
    with pytest.raises(ConversionError, match="no such folder, and not a hub repo id"):
        convert_checkpoint(str(tmp_path / "nope"), progress=False)


def test_hub_id_offline_without_cache_is_a_clear_error():
    # conftest sets HF_HUB_OFFLINE=1 and an empty HF_HOME
    with pytest.raises(ConversionError, match="not in the local Hugging Face cache"):
        convert_checkpoint("zhongyi-zhou/toolgrad-4b", progress=False)


def test_default_names_and_cache_dir(tmp_path):
    from toolgrad_edge.paths import models_dir

    folder = fake_gemma_checkpoint(tmp_path / "toolgrad-4b")
    [path] = convert_checkpoint(folder, quants=["BF16"], progress=False)
    assert path == models_dir() / "toolgrad-4b-BF16.gguf" and output_name("x", "Q4_K_M") == "x-Q4_K_M.gguf"


# --- quantize input checks (llama.cpp not needed to refuse) ---------------------


def test_quantize_refuses_quantized_input(gemma_270m_gguf, tmp_path):
    with pytest.raises(ConversionError, match="already quantized"):
        quantize_gguf(gemma_270m_gguf, tmp_path / "q.gguf", "Q4_0")
    assert list(tmp_path.iterdir()) == []


def test_quantize_input_errors(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all, just some text" * 4)
    with pytest.raises(ConversionError, match="not a readable GGUF file .*expected the GGUF magic"):
        quantize_gguf(junk, tmp_path / "o.gguf", "Q8_0")
    with pytest.raises(ConversionError, match="unknown quantization 'Q2'"):
        quantize_gguf(junk, tmp_path / "o.gguf", "Q2")
    with pytest.raises(ConversionError, match="no such file"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "o.gguf", "Q8_0")


# --- CLI -------------------------------------------------------------------------


def test_cli_convert_json_and_errors(tmp_path):
    folder = fake_gemma_checkpoint(tmp_path / "m")
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(folder), "-q", "F16", "--outdir", str(tmp_path / "o"), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.output)["files"]
    assert [Path(f["path"]).name for f in files] == ["m-F16.gguf"] and files[0]["bytes"] > 0
    result = runner.invoke(cli, ["convert", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "no such folder" in result.output and "Traceback" not in result.output
    assert "Examples:" in runner.invoke(cli, ["convert", "--help"]).output
    assert "Examples:" in runner.invoke(cli, ["quantize", "--help"]).output


def test_hub_id_resolves_from_the_offline_cache(tmp_path):
    """A repo id already in the HF cache converts offline, named after the repo, with its source recorded."""
    from huggingface_hub import constants

    # huggingface_hub fixes its cache path at import; put the snapshot where it looks.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(constants.HF_HUB_CACHE) / "models--zhongyi-zhou--toolgrad-1b"
    fake_gemma_checkpoint(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    [path] = convert_checkpoint("zhongyi-zhou/toolgrad-1b", outdir=tmp_path, quants=["BF16"], progress=False)
    assert path.name == "toolgrad-1b-BF16.gguf"
    meta = read_gguf_header(path).metadata
    assert meta["general.source.repo_url"] == "https://huggingface.co/zhongyi-zhou/toolgrad-1b"
    assert meta["general.name"] == "toolgrad-1b"
