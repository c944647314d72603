"""GGUF header checks run before llama.cpp ever sees a file."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFWriter

from toolgrad_edge.errors import ModelLoadError
from toolgrad_edge.gguf_info import check_supported, read_gguf_info


def test_real_gemma_270m_header(gemma_270m_gguf):
    info = read_gguf_info(gemma_270m_gguf)
    assert info.architecture == "gemma3"
    assert 250e6 < info.n_params < 300e6
    assert info.file_type == "Q4_K_M"
    assert info.vocab_size == 262144
    assert info.context_length == 32768
    check_supported(info)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        read_gguf_info(tmp_path / "nope.gguf")


def test_folder_is_refused_with_a_hint(tmp_path):
    with pytest.raises(ModelLoadError, match="toolgrad-edge convert"):
        read_gguf_info(tmp_path)


def test_not_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_gguf_info(path)


@pytest.mark.parametrize("keep", [0.6, 0.999])
def test_truncated_tensor_data(gemma_270m_gguf, tmp_path, keep):
    data = gemma_270m_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated GGUF"):
        read_gguf_info(path)


def test_truncated_header(gemma_270m_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(gemma_270m_gguf.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="truncated GGUF header"):
        read_gguf_info(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = read_gguf_info(path)
    assert info.architecture == "llama"
    with pytest.raises(ModelLoadError, match="architecture 'llama' is not supported"):
        check_supported(info)
