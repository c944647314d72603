"""Quantize a high-precision GGUF with llama.cpp's own quantizer (no llama-quantize binary).

llama-cpp-python exposes ``llama_model_quantize``; the target type is always
set explicitly because the default ftype has moved between versions.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from ..errors import ConversionError
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

# Tensor types that count as "not yet quantized" input.
FLOAT_QTYPES = frozenset({QType.F32, QType.F16, QType.BF16})


# Byte size of each fixed-size GGUF metadata value type.
_GGUF_SCALAR_SIZES = {
    gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.BOOL: 1,
    gguf.GGUFValueType.UINT16: 2, gguf.GGUFValueType.INT16: 2,
    gguf.GGUFValueType.UINT32: 4, gguf.GGUFValueType.INT32: 4, gguf.GGUFValueType.FLOAT32: 4,
    gguf.GGUFValueType.UINT64: 8, gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8,
}


def inspect_gguf(path: Path) -> tuple[int, bool]:
    """(parameter count, whether any tensor is already quantized); raises on a non-GGUF file.

    Reads only the header and tensor table: gguf.GGUFReader decodes every
    metadata value in Python, which takes many seconds for a 262k vocabulary.
    """
    try:
        with open(path, "rb") as f:
            buf = f.read(64 << 20)
    except FileNotFoundError as exc:
        raise ConversionError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        tensors = _tensor_table(buf)
    except (struct.error, ValueError, IndexError) as exc:
        raise ConversionError(f"{path}: not a readable GGUF file ({exc})") from exc
    n_params = sum(n for _, n in tensors)
    quantized = any(qtype not in FLOAT_QTYPES for qtype, _ in tensors)
    return n_params, quantized


def _tensor_table(buf: bytes) -> list[tuple[int, int]]:
    """(ggml type, element count) of every tensor, from a GGUF file's first bytes."""
    magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
    if magic != gguf.GGUF_MAGIC:
        raise ValueError(f"magic {magic:#x}, expected {gguf.GGUF_MAGIC:#x}")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    pos = 24

    def skip_value(vtype: int, pos: int) -> int:
        if vtype == gguf.GGUFValueType.STRING:
            (n,) = struct.unpack_from("<Q", buf, pos)
            return pos + 8 + n
        if vtype == gguf.GGUFValueType.ARRAY:
            item_type, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            size = _GGUF_SCALAR_SIZES.get(item_type)
            if size is not None:
                return pos + size * count
            for _ in range(count):
                pos = skip_value(item_type, pos)
            return pos
        return pos + _GGUF_SCALAR_SIZES[vtype]

    for _ in range(n_kv):
        (key_len,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + key_len
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos = skip_value(vtype, pos + 4)
    tensors = []
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + name_len
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, _offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        tensors.append((qtype, math.prod(dims)))
    if pos > len(buf):
        raise ValueError("header runs past the end of the file")
    return tensors


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
