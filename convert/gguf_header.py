"""Read a GGUF file's metadata and tensor table quickly.

gguf.GGUFReader decodes every metadata value into Python objects, which takes
tens of seconds for Gemma's 262k-token vocabulary on a small CPU. This reader
parses the same header with bulk numpy reads, for checks that run often
(is this file already quantized? what does its metadata say?).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import ConversionError

VT = gguf.GGUFValueType

# numpy dtype of each fixed-size GGUF value type.
_SCALARS = {
    VT.UINT8: "<u1", VT.INT8: "<i1", VT.BOOL: "?", VT.UINT16: "<u2", VT.INT16: "<i2",
    VT.UINT32: "<u4", VT.INT32: "<i4", VT.FLOAT32: "<f4", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8",
}

# Headers larger than this are not read (Gemma 3's is about 6 MB).
MAX_HEADER_BYTES = 256 << 20


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order (fastest dimension first)
    offset: int  # absolute position of the data in the file

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.n_elements // block * size

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # scalars as Python values, strings as str, arrays as list / numpy array
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError("file ends inside the header (truncated)")
        return data

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))

    def string(self) -> bytes:
        (n,) = self.unpack("<Q")
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"string of {n} bytes")
        return self.read(n)

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            dtype = np.dtype(_SCALARS[vtype])
            return np.frombuffer(self.read(dtype.itemsize), dtype)[0].item()
        if vtype == VT.STRING:
            return self.string().decode("utf-8", "replace")
        if vtype == VT.ARRAY:
            item_type, count = self.unpack("<IQ")
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type])
                return np.frombuffer(self.read(dtype.itemsize * count), dtype)
            if item_type == VT.STRING:
                return [self.string() for _ in range(count)]
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor table; ConversionError if the file is missing, not GGUF or truncated."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            cursor = _Cursor(f, path.stat().st_size)
            magic, version, n_tensors, n_kv = cursor.unpack("<IIQQ")
            if magic != gguf.GGUF_MAGIC:
                raise ValueError(f"starts with {magic:#010x}, expected the GGUF magic {gguf.GGUF_MAGIC:#010x}")
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            metadata = {}
            for _ in range(n_kv):
                key = cursor.string().decode("utf-8", "replace")
                (vtype,) = cursor.unpack("<I")
                metadata[key] = cursor.value(vtype)
            table = []
            for _ in range(n_tensors):
                name = cursor.string().decode("utf-8", "replace")
                (n_dims,) = cursor.unpack("<I")
                dims = cursor.unpack(f"<{n_dims}Q")
                qtype, offset = cursor.unpack("<IQ")
                table.append((name, gguf.GGMLQuantizationType(qtype), tuple(dims), offset))
            alignment = int(metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT))
            data_start = -(-f.tell() // alignment) * alignment
            tensors = [GGUFTensor(n, q, d, data_start + o) for n, q, d, o in table]
    except FileNotFoundError as exc:
        raise ConversionError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (ValueError, struct.error) as exc:
        raise ConversionError(f"{path}: not a readable GGUF file ({exc})") from exc
    return GGUFHeader(version, metadata, tensors)
