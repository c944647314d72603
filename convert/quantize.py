"""Quantize a high-precision GGUF with llama.cpp's own quantizer (no llama-quantize binary).

llama-cpp-python exposes ``llama_model_quantize``; the target type is always
set explicitly because the default ftype has moved between versions.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gguf

from ..errors import ConversionError
from .gguf_header import read_gguf_header
from .output import atomic_output, check_free_space

QType = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class QuantType:
    name: str
    llama_ftype: str       # constant in llama_cpp
    bits_per_weight: float  # average on Gemma 3 4B, for disk-space estimates


# The types llama.cpp's quantizer makes for us. Bits per weight are measured
# averages (K-quant mixes keep some tensors at higher precision).
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", 8.5),
    QuantType("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K", 6.6),
    QuantType("Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.8),
    QuantType("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M", 5.2),
    QuantType("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", 4.7),
)}

# Rows llama.cpp's quantizer holds in memory at once (where the binding exposes it).
QUANTIZE_BUFFER_BYTES = 128 << 20

# Tensor types that count as "not yet quantized" input.
FLOAT_QTYPES = frozenset({QType.F32, QType.F16, QType.BF16})


def inspect_gguf(path: Path) -> tuple[int, bool]:
    """(parameter count, whether any tensor is already quantized); raises on a non-GGUF file."""
    header = read_gguf_header(path)
    n_params = sum(t.n_elements for t in header.tensors)
    quantized = any(t.qtype not in FLOAT_QTYPES for t in header.tensors)
    return n_params, quantized


def quantize_gguf(infile: str | os.PathLike, outfile: str | os.PathLike, quant: str,
                  allow_requantize: bool = False, *, n_threads: int | None = None, verbose: bool = False) -> Path:
    """Quantize ``infile`` (F32/F16/BF16 GGUF) to ``outfile`` as ``quant`` (e.g. "Q4_K_M").

    ``verbose`` shows llama.cpp's per-tensor log.
    """
    infile, outfile = Path(infile), Path(outfile)
    qtype = QUANT_TYPES.get(quant.upper())
    if qtype is None:
        raise ConversionError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    if infile.resolve() == outfile.resolve():
        raise ConversionError(f"{outfile}: output would overwrite the input; choose another name")
    n_params, quantized = inspect_gguf(infile)
    if quantized and not allow_requantize:
        raise ConversionError(
            f"{infile} is already quantized; quantizing again loses accuracy. Start from the BF16/F16/F32 "
            "GGUF, or pass allow_requantize=True (CLI: --allow-requantize)"
        )
    check_free_space(outfile.parent, int(n_params * qtype.bits_per_weight / 8) + (16 << 20))

    import llama_cpp  # heavy: loads the llama.cpp shared library
    from llama_cpp._logger import logger as llama_logger

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, qtype.llama_ftype)
    params.allow_requantize = allow_requantize
    params.nthread = n_threads or os.cpu_count() or 1
    if hasattr(params, "max_buf_size"):
        # llama.cpp buffers up to 8 GiB of rows by default; a bounded buffer keeps the
        # quantizer's peak memory near one tensor's F32 rows (same output bytes).
        params.max_buf_size = QUANTIZE_BUFFER_BYTES
    level = llama_logger.level
    llama_logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        with atomic_output(outfile) as tmp:
            rc = llama_cpp.llama_model_quantize(str(infile).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise ConversionError(f"llama.cpp failed to quantize {infile} to {quant} (code {rc}); rerun with verbose for its log")
    finally:
        llama_logger.setLevel(level)
    return outfile
