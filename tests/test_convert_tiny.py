"""Converted tiny random Gemma 3 models compute what transformers computes.

Two checkpoints built here with transformers (bf16, sharded, real Gemma 3
tokenizer, norm weights far from zero): a Gemma3ForCausalLM and a 4B-shaped
Gemma3ForConditionalGeneration (262208-entry vocabulary, linear RoPE scaling
on global layers, vision tower). Each is converted once to F32, BF16, Q8_0 and
Q4_K_M; llama.cpp's logits are compared with transformers' float32 logits at
every position of a prompt longer than the sliding window.
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")

from convert_fixtures import (  # noqa: E402
    PROMPT, llama_logits, llama_tokens, reference_logits,
)
from toolgrad_edge.convert import convert_checkpoint, quantize_gguf  # noqa: E402
from toolgrad_edge.convert.gguf_header import read_gguf_header  # noqa: E402
from toolgrad_edge.errors import ConversionError  # noqa: E402

pytestmark = pytest.mark.slow

BUILDERS = ("causal", "conditional")  # the kinds tests/conftest.py's tiny_ggufs builds


@pytest.fixture(scope="session", params=sorted(BUILDERS))
def tiny(request, tiny_ggufs):
    """(name, checkpoint folder, {type: gguf}, prompt tokens, reference logits)."""
    folder, ggufs = tiny_ggufs(request.param)
    tokens = llama_tokens(ggufs["F32"], PROMPT * 2)
    return request.param, folder, ggufs, tokens, reference_logits(folder, tokens)


_LLAMA_LOGITS: dict = {}


def _logits(path, tokens) -> np.ndarray:
    if path not in _LLAMA_LOGITS:
        _LLAMA_LOGITS[path] = llama_logits(path, tokens)
    return _LLAMA_LOGITS[path]


@pytest.fixture(scope="session")
def figures():
    """Measured figures, printed at the end (pytest -s) for the notes."""
    found: dict[str, dict] = {}
    yield found
    print("\nconverter figures:", json.dumps(found, indent=1))


def _compare(logits: np.ndarray, reference: np.ndarray) -> dict:
    return {
        "max_abs_diff": float(np.abs(logits - reference).max()),
        "logit_scale": float(np.abs(reference).max()),
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
    }


def test_checkpoint_is_what_the_issue_asks_for(tiny):
    name, folder, _, tokens, reference = tiny
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) >= 2  # sharded
    config = json.loads((folder / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert len(tokens) > 2 * 16  # well past the sliding window
    assert reference.shape == (len(tokens), 262208 if name == "conditional" else 262144)


def test_f32_matches_transformers_at_every_position(tiny, figures):
    name, _, ggufs, tokens, reference = tiny
    result = _compare(_logits(ggufs["F32"], tokens), reference)
    figures[f"{name}/F32"] = result
    assert result["top1_agreement"] == 1.0
    assert result["max_abs_diff"] < 5e-3 * result["logit_scale"], result


def test_bf16_close_to_f32(tiny, figures):
    name, _, ggufs, tokens, reference = tiny
    bf16 = _logits(ggufs["BF16"], tokens)
    result = _compare(bf16, reference)
    result["max_abs_diff_vs_f32_gguf"] = float(np.abs(bf16 - _logits(ggufs["F32"], tokens)).max())
    figures[f"{name}/BF16"] = result
    assert result["top1_agreement"] >= 0.99
    assert result["max_abs_diff"] < 3e-2 * result["logit_scale"], result


def test_q8_0_top1_agreement(tiny, figures):
    name, _, ggufs, tokens, reference = tiny
    result = _compare(_logits(ggufs["Q8_0"], tokens), reference)
    figures[f"{name}/Q8_0"] = result
    assert result["top1_agreement"] >= 0.99, result


def test_q4_k_m_reported(tiny, figures):
    name, _, ggufs, tokens, reference = tiny
    result = _compare(_logits(ggufs["Q4_K_M"], tokens), reference)
    figures[f"{name}/Q4_K_M"] = result
    assert result["top1_agreement"] >= 0.8, result  # a sanity bound; the figure is the point


def test_files_load_with_complete_metadata(tiny):
    name, _, ggufs, _, _ = tiny
    file_types = {"F32": 0, "BF16": 32, "Q8_0": 7, "Q4_K_M": 15}
    for kind, path in ggufs.items():
        assert path.name == f"tiny-{name}-{kind}.gguf"
        # Same header as gguf.GGUFReader reads, in a fraction of the time (see below).
        meta = read_gguf_header(path).metadata
        assert meta["general.file_type"] == file_types[kind]
        assert meta["general.architecture"] == "gemma3"
        for key in ("general.name", "general.license", "general.quantization_version", "gemma3.context_length",
                    "gemma3.attention.sliding_window", "gemma3.rope.freq_base", "gemma3.rope.freq_base_swa",
                    "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
                    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.chat_template"):
            assert key in meta, (kind, key)
        types = meta["tokenizer.ggml.token_type"]
        assert types[105] == types[106] == gguf.TokenType.CONTROL
        if name == "conditional":
            assert meta["gemma3.rope.scaling.factor"] == 8.0
            assert len(meta["tokenizer.ggml.tokens"]) == 262208
    if name != "conditional":
        return
    # gguf's own reader (slow on a 262k vocabulary: once) sees the same file.
    reader = gguf.GGUFReader(ggufs["BF16"])
    assert reader.fields["general.file_type"].contents() == 32
    names = {t.name for t in reader.tensors}
    assert len(names) == 2 + 13 * 7
    assert "output.weight" not in names and not any("vision" in n or "mm" in n for n in names)


def test_old_multimodal_prefix_converts_identically(tiny, tmp_path):
    """language_model.model.* (older saves) gives the same GGUF as model.language_model.*."""
    name, folder, _, _, _ = tiny
    if name != "conditional":
        pytest.skip("multimodal layout only")
    from safetensors.torch import load_file, save_file

    old = tmp_path / "tiny-conditional"
    old.mkdir()
    for p in folder.iterdir():
        if p.suffix != ".safetensors" and p.name != "model.safetensors.index.json":
            shutil.copy(p, old / p.name)
    renamed = {}
    for shard in folder.glob("*.safetensors"):
        for key, value in load_file(shard).items():
            key = key.replace("model.language_model.", "language_model.model.")
            key = key.replace("model.vision_tower.", "vision_tower.").replace("model.multi_modal_projector.", "multi_modal_projector.")
            renamed[key] = value
    save_file(renamed, old / "model.safetensors")
    [new_bf16] = convert_checkpoint(folder, outdir=tmp_path / "a", quants=["BF16"], progress=False)
    [old_bf16] = convert_checkpoint(old, outdir=tmp_path / "b", quants=["BF16"], progress=False)
    assert new_bf16.read_bytes() == old_bf16.read_bytes()


def test_quantize_refuses_quantized_unless_asked(tiny, tmp_path):
    name, _, ggufs, _, _ = tiny
    if name != "causal":
        pytest.skip("once is enough")
    with pytest.raises(ConversionError, match="already quantized"):
        quantize_gguf(ggufs["Q8_0"], tmp_path / "q.gguf", "Q4_0")
    out = quantize_gguf(ggufs["Q8_0"], tmp_path / "q.gguf", "Q4_0", allow_requantize=True)
    assert read_gguf_header(out).metadata["general.file_type"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]


def test_cli_quantize(tiny, tmp_path):
    from click.testing import CliRunner

    from toolgrad_edge.cli import main as cli

    name, _, ggufs, _, _ = tiny
    if name != "causal":
        pytest.skip("once is enough")
    out = tmp_path / "cli-Q4_0.gguf"
    result = CliRunner().invoke(cli, ["quantize", str(ggufs["BF16"]), str(out), "--quant", "q4_0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["files"][0]["path"] == str(out)
    result = CliRunner().invoke(cli, ["quantize", str(out), str(tmp_path / "again.gguf"), "-q", "Q8_0"])
    assert result.exit_code == 1 and "already quantized" in result.output
