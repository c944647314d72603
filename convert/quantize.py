"""Quantize a high-precision GGUF with llama.cpp's own quantizer (no llama-quantize binary).

llama-cpp-python exposes ``llama_model_quantize``; the target type is always
set explicitly because the default ftype has moved between versions.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import gguf

from ..errors import ConversionError
from .gguf_header import read_gguf_header
from .output import atomic_output, check_free_space

QType = gguf.GGMLQuantizationType


# Average bits per weight of llama.cpp's file types, highest precision first:
# the one table for disk-space estimates (here), the CLI's choices and the
# choice of a reference file when comparing quantizations (bench_compare).
# Types this project makes are averages over a Gemma 3 4B file (the K-quant
# mixes and the 262k-row embedding weigh more than the nominal figure); the
# others are llama.cpp's nominal figures. BF16 ranks above F16 at equal size:
# Gemma 3 activations can overflow F16.
BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0,
    "BF16": 16.0,
    "F16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.6,
    "Q5_1": 6.0,
    "Q5_K_M": 5.8,
    "Q5_0": 5.5,
    "Q5_K_S": 5.5,
    "Q4_K_M": 5.2,
    "Q4_1": 5.0,
    "Q4_0": 4.7,
    "Q4_K_S": 4.6,
    "IQ4_NL": 4.5,
    "IQ4_XS": 4.3,
    "Q3_K_L": 4.3,
    "Q3_K_M": 3.9,
    "Q3_K_S": 3.5,
    "Q2_K": 3.4,
}


@dataclass(frozen=True)
class QuantType:
    name: str
    llama_ftype: str  # constant in llama_cpp

    @property
    def bits_per_weight(self) -> float:
        return BITS_PER_WEIGHT[self.name]


# The types llama.cpp's quantizer makes for us, highest precision first.
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"),
    QuantType("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K"),
    QuantType("Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M"),
    QuantType("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    QuantType("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"),
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
            rc = _waited_for(llama_cpp.llama_model_quantize, str(infile).encode(), str(tmp).encode(),
                             ctypes.byref(params))
            if rc != 0:
                raise ConversionError(f"llama.cpp failed to quantize {infile} to {quant} (code {rc}); rerun with verbose for its log")
    finally:
        llama_logger.setLevel(level)
    return outfile


def _waited_for(c_function, *args) -> int:
    """Call ``c_function`` in a thread of its own and wait for it here.

    llama.cpp's quantizer is one C call (minutes on a 4B model) that logs
    through a Python callback. Called from the main thread, a Ctrl-C or
    SIGTERM would wait for it to end, and the exception the signal raises
    would be raised inside that callback, where ctypes prints and drops it:
    the conversion would go on. Waited for here, the wait is interrupted at
    once; the caller removes the half-written file, and the quantizer's
    thread (a daemon) ends with the process.
    """
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(c_function(*args)), name="llama-quantize", daemon=True)
    worker.start()
    worker.join()
    if not result:
        raise ConversionError("llama.cpp's quantizer ended without a result; rerun with verbose for its log")
    return result[0]
