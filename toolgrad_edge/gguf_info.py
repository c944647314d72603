"""Read and check a GGUF file's header before llama.cpp sees it.

llama.cpp aborts or crashes on some malformed files, so the runtime validates
here first: magic, version, every key/value, every tensor's extent against the
file size (a truncated download is caught), and the architecture.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType

from .errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Architectures whose chat format and tool prompt this runtime implements.
SUPPORTED_ARCHITECTURES = ("gemma3",)
# Guard against absurd counts in a corrupt header before allocating anything.
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_ARRAY = 1 << 24
MAX_STRING = 1 << 26

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
# Arrays longer than this are skipped (their length is kept), e.g. the vocabulary.
_KEEP_ARRAY = 64


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int
    n_bytes: int


@dataclass
class GGUFInfo:
    path: Path
    file_size: int
    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get(Keys.General.ARCHITECTURE, ""))

    def arch_value(self, key_template: str, default: Any = None) -> Any:
        """A `{arch}.…` key such as gguf.Keys.LLM.CONTEXT_LENGTH."""
        return self.metadata.get(key_template.format(arch=self.architecture), default)

    @property
    def context_length(self) -> int | None:
        value = self.arch_value(Keys.LLM.CONTEXT_LENGTH)
        return int(value) if value is not None else None

    @property
    def n_params(self) -> int:
        total = 0
        for tensor in self.tensors:
            n = 1
            for dim in tensor.shape:
                n *= dim
            total += n
        return total

    @property
    def file_type(self) -> str:
        """The file's declared type (Q4_K_M, BF16, ...) or the dominant tensor type."""
        ftype = self.metadata.get(Keys.General.FILE_TYPE)
        if ftype is not None:
            try:
                return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_")
            except ValueError:
                pass
        counts: dict[str, int] = {}
        for tensor in self.tensors:
            counts[tensor.qtype.name] = counts.get(tensor.qtype.name, 0) + tensor.n_bytes
        return max(counts, key=counts.get) if counts else "unknown"

    @property
    def has_chat_template(self) -> bool:
        return Keys.Tokenizer.CHAT_TEMPLATE in self.metadata

    @property
    def vocab_size(self) -> int:
        return self.array_lengths.get(Keys.Tokenizer.LIST, 0)


class _Reader:
    def __init__(self, fh: BinaryIO, path: Path, size: int):
        self.fh, self.path, self.size = fh, path, size

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise ModelLoadError(
                f"{self.path}: truncated GGUF header (wanted {n} bytes at offset "
                f"{self.fh.tell() - len(data)}, file is {self.size} bytes). Re-download or re-convert the file."
            )
        return data

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > MAX_STRING:
            raise ModelLoadError(f"{self.path}: corrupt GGUF header (string of {n} bytes).")
        return self.read(n).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        if self.fh.tell() + n > self.size:
            self.read(self.size - self.fh.tell() + 1)  # raises "truncated"
        self.fh.seek(n, os.SEEK_CUR)

    def value(self, vtype: int, key: str) -> tuple[Any, int | None]:
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise ModelLoadError(f"{self.path}: corrupt GGUF header (key {key!r} has unknown type {vtype}).") from None
        if vtype == GGUFValueType.STRING:
            return self.string(), None
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype]), None
        # array
        etype = self.scalar("<I")
        count = self.scalar("<Q")
        if count > MAX_ARRAY:
            raise ModelLoadError(f"{self.path}: corrupt GGUF header (array {key!r} of {count} items).")
        if count <= _KEEP_ARRAY:
            return [self.value(etype, key)[0] for _ in range(count)], count
        try:
            etype_enum = GGUFValueType(etype)
        except ValueError:
            raise ModelLoadError(f"{self.path}: corrupt GGUF header (array {key!r} of unknown type {etype}).") from None
        if etype_enum in _SCALARS:
            self.skip(count * struct.calcsize(_SCALARS[etype_enum]))
        elif etype_enum == GGUFValueType.STRING:
            for _ in range(count):
                n = self.scalar("<Q")
                if n > MAX_STRING:
                    raise ModelLoadError(f"{self.path}: corrupt GGUF header (string in {key!r}).")
                self.skip(n)
        else:
            for _ in range(count):
                self.value(etype, key)
        return None, count


def read_gguf_info(path: str | os.PathLike) -> GGUFInfo:
    """Parse the header of a GGUF file and check it is complete.

    Raises ModelLoadError naming the file and the problem for a missing file,
    a file that is not GGUF, an unknown version, a corrupt header or tensor
    data that extends past the end of the file (truncated download).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: model file not found.")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder; expected a .gguf file (convert a checkpoint folder with `toolgrad-edge convert`).")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise ModelLoadError(
                f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF'). "
                "Safetensors checkpoints must be converted first: toolgrad-edge convert FOLDER."
            )
        r = _Reader(fh, path, size)
        version = r.scalar("<I")
        if version not in SUPPORTED_VERSIONS:
            raise ModelLoadError(f"{path}: GGUF version {version} is not supported (expected one of {SUPPORTED_VERSIONS}).")
        n_tensors = r.scalar("<Q")
        n_kv = r.scalar("<Q")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise ModelLoadError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys).")
        metadata: dict[str, Any] = {}
        array_lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = r.string()
            value, count = r.value(r.scalar("<I"), key)
            if count is not None:
                array_lengths[key] = count
            if value is not None:
                metadata[key] = value
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            if n_dims > 8:
                raise ModelLoadError(f"{path}: corrupt GGUF header (tensor {name!r} has {n_dims} dimensions).")
            shape = tuple(r.scalar("<Q") for _ in range(n_dims))
            raw_type = r.scalar("<I")
            offset = r.scalar("<Q")
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ModelLoadError(f"{path}: tensor {name!r} has unknown type {raw_type}; this llama.cpp build cannot read it.") from None
            n_elements = 1
            for dim in shape:
                n_elements *= dim
            tensors.append(TensorInfo(name, shape, qtype, offset, n_elements // block * type_size))
        alignment = int(metadata.get(Keys.General.ALIGNMENT, 32))
        header_end = fh.tell()
    data_offset = (header_end + alignment - 1) // alignment * alignment
    info = GGUFInfo(path, size, version, metadata, array_lengths, tensors, data_offset)
    needed = max((data_offset + t.offset + t.n_bytes for t in tensors), default=data_offset)
    if needed > size:
        raise ModelLoadError(
            f"{path}: truncated GGUF: tensor data needs {needed:,} bytes but the file has {size:,} "
            f"({needed - size:,} missing). Re-download or re-convert the file."
        )
    return info


def check_supported(info: GGUFInfo) -> None:
    """Refuse, with a clear message, a GGUF this runtime cannot drive."""
    arch = info.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{info.path}: architecture {arch or '(none)'!r} is not supported; toolgrad-edge runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models (ToolGrad 1B/4B/12B, Gemma 3)."
        )
    if not info.tensors:
        raise ModelLoadError(f"{info.path}: GGUF holds no tensors (a vocabulary-only file?).")
    if info.vocab_size == 0:
        raise ModelLoadError(f"{info.path}: GGUF has no tokenizer ({Keys.Tokenizer.LIST} is missing); re-convert with its tokenizer files.")
