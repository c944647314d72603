"""Write a high-precision (F32 / F16 / BF16) Gemma 3 GGUF, one tensor chunk at a time.

gguf's GGUFWriter lays out the header, metadata and tensor table; the tensor
bytes are streamed from the memory-mapped shards in bounded chunks, so peak
memory follows the chunk size and not the model (the 4B embedding alone is
1.3 GB in bf16 and is never widened whole).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np

from .plan import ARCH, Gemma3HParams, PlannedTensor, TensorPlan
from .safetensors_reader import SafetensorsCheckpoint, float32_to_bf16_bits, to_float32
from .tokenizer import Vocabulary

QType = gguf.GGMLQuantizationType

# Output types written directly (no llama.cpp quantizer): name -> (weight type, file type).
FLOAT_TYPES: dict[str, tuple[QType, gguf.LlamaFileType]] = {
    "F32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}

# numpy dtype carrying each written type's bits.
_NP_DTYPE = {QType.F32: np.dtype("<f4"), QType.F16: np.dtype("<f2"), QType.BF16: np.dtype("<u2")}
# safetensors dtype that is the same bits as a written type (raw copy possible).
_SAME_BITS = {QType.F32: "F32", QType.F16: "F16", QType.BF16: "BF16"}


@dataclass(frozen=True)
class ModelMetadata:
    """The ``general.*`` facts about where a model came from."""

    name: str
    source_repo: str | None = None  # hub id, e.g. "zhongyi-zhou/toolgrad-4b"
    license: str | None = None


def tensor_type(tensor: PlannedTensor, weight_type: QType) -> QType:
    # Norms (1 + w, computed in F32) and any other 1-D tensor stay F32, as in llama.cpp's files.
    return QType.F32 if tensor.is_norm or len(tensor.shape) == 1 else weight_type


def file_bytes(plan: TensorPlan, weight_type: QType) -> int:
    """Tensor bytes of the output (metadata adds a few MB for the vocabulary)."""
    return sum(t.n_elements * _NP_DTYPE[tensor_type(t, weight_type)].itemsize for t in plan.tensors)


class StreamedTensor:
    """What GGUFWriter.write_tensor_data needs (``nbytes``, ``tofile``), produced chunk by chunk."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, tensor: PlannedTensor, out: QType,
                 on_bytes: Callable[[int], None]):
        self.checkpoint, self.tensor, self.out, self.on_bytes = checkpoint, tensor, out, on_bytes
        self.dtype = _NP_DTYPE[out]
        self.nbytes = tensor.n_elements * self.dtype.itemsize
        self.nonfinite = 0  # NaN/Inf values met in the source, counted as they stream by

    def tofile(self, fout: BinaryIO) -> None:
        info = self.checkpoint[self.tensor.source]
        rows_left = self.tensor.shape[0] if self.tensor.shape else 1  # cuts padded vocabulary rows
        written = 0
        chunks = self.checkpoint.iter_chunks(info)
        try:
            for chunk in chunks:
                if chunk.ndim and rows_left < len(chunk):
                    chunk = chunk[:rows_left]
                rows_left -= len(chunk) if chunk.ndim else 1
                self.nonfinite += count_nonfinite(chunk, info.dtype)
                data = self._convert(chunk, info.dtype)
                fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                written += data.nbytes
                self.on_bytes(data.nbytes)
                del chunk, data
                if rows_left <= 0:
                    break
        finally:
            chunks.close()  # releases the last chunk's pages now, not at garbage collection
        if written != self.nbytes:  # guards the chunking arithmetic, not the input
            raise AssertionError(f"{self.tensor.target}: wrote {written} bytes, expected {self.nbytes}")

    def _convert(self, chunk: np.ndarray, src: str) -> np.ndarray:
        if self.tensor.is_norm:
            # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's multiplies by w.
            return to_float32(chunk, src) + np.float32(1.0)
        if _SAME_BITS[self.out] == src:
            return chunk
        if self.out == QType.F32:
            return to_float32(chunk, src)
        if self.out == QType.F16:
            return to_float32(chunk, src).astype(np.float16)
        return float32_to_bf16_bits(to_float32(chunk, src))


def count_nonfinite(chunk: np.ndarray, dtype: str) -> int:
    """NaN and Inf values in a chunk of safetensors storage (bfloat16 as its uint16 bits)."""
    if dtype == "BF16":
        return int(np.count_nonzero((chunk & 0x7F80) == 0x7F80))  # exponent bits all ones
    return int(chunk.size - np.count_nonzero(np.isfinite(chunk)))


class _BulkArrayWriter(gguf.GGUFWriter):
    """GGUFWriter that packs long metadata arrays (the 262k-token vocabulary) in bulk.

    gguf packs arrays one element at a time in Python, which costs seconds per
    file for Gemma's vocabulary; the bytes written are the same.
    """

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if vtype != gguf.GGUFValueType.ARRAY or sub_type is not None or not val or isinstance(val, (bytes, str)):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        first = val[0]
        if isinstance(first, (bytes, str)):
            items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
            lengths = np.array([len(v) for v in items], dtype="<u8")
            body = b"".join(l.tobytes() + v for l, v in zip(lengths, items))
            ltype = gguf.GGUFValueType.STRING
        elif isinstance(first, float):
            body, ltype = np.asarray(val, dtype="<f4").tobytes(), gguf.GGUFValueType.FLOAT32
        elif isinstance(first, int) and not isinstance(first, bool):
            body, ltype = np.asarray(val, dtype="<i4").tobytes(), gguf.GGUFValueType.INT32
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", ltype) + self._pack("Q", len(val))
        return head + body


def write_float_gguf(
    path: Path,
    checkpoint: SafetensorsCheckpoint,
    plan: TensorPlan,
    hp: Gemma3HParams,
    vocab: Vocabulary,
    special: gguf.SpecialVocab,
    meta: ModelMetadata,
    out_type: str,
    progress: Callable[[int], None] = lambda n: None,
) -> dict[str, int]:
    """Write ``path`` (the caller's temporary name) as an F32/F16/BF16 GGUF.

    Returns the number of NaN/Inf source values per tensor that has any (written as they are).
    """
    weight_type, file_type = FLOAT_TYPES[out_type]
    writer = _BulkArrayWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[ARCH])
    _add_metadata(writer, hp, meta, file_type)
    _add_vocabulary(writer, vocab, special)
    tensors = []
    for t in plan.tensors:
        qtype = tensor_type(t, weight_type)
        dtype = _NP_DTYPE[qtype]
        writer.add_tensor_info(t.target, t.shape, dtype, t.n_elements * dtype.itemsize, raw_dtype=qtype)
        tensors.append(StreamedTensor(checkpoint, t, qtype, progress))
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for streamed in tensors:
            writer.write_tensor_data(streamed)  # type: ignore[arg-type]  # duck-typed: nbytes + tofile
    finally:
        writer.close()
    return {t.tensor.source: t.nonfinite for t in tensors if t.nonfinite}


def _add_metadata(w: gguf.GGUFWriter, hp: Gemma3HParams, meta: ModelMetadata, file_type: int) -> None:
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(meta.name)
    if meta.source_repo:
        w.add_source_repo_url(f"https://huggingface.co/{meta.source_repo}")
    if meta.license:
        w.add_license(meta.license)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_context_length(hp.context_length)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_key_length(hp.head_dim)
    w.add_value_length(hp.head_dim)
    w.add_layer_norm_rms_eps(hp.rms_norm_eps)
    w.add_rope_freq_base(hp.rope_freq_base)
    w.add_rope_freq_base_swa(hp.rope_freq_base_swa)
    w.add_sliding_window(hp.sliding_window)
    if hp.rope_scaling_factor is not None:
        # Linear scaling applies to the global layers only; llama.cpp knows that for gemma3.
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(hp.rope_scaling_factor)


def _add_vocabulary(w: gguf.GGUFWriter, vocab: Vocabulary, special: gguf.SpecialVocab) -> None:
    w.add_tokenizer_model("llama")  # SentencePiece
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    special.add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(False)  # Gemma 3's normalizer adds no dummy prefix


def expected_file_size(plan: TensorPlan, vocab: Vocabulary, weight_type: QType) -> int:
    # Vocabulary metadata: each token's bytes plus length, score and type.
    vocab_bytes = sum(len(t) + 8 + 4 + 4 for t in vocab.tokens)
    return file_bytes(plan, weight_type) + vocab_bytes + (1 << 20) + 32 * len(plan.tensors)

