"""Read safetensors checkpoints without loading them: headers first, tensors in chunks.

A safetensors file is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, byte range) and the raw tensor bytes. Every header is
checked against the file size before any tensor is touched, so a truncated
shard fails with its name instead of a SIGBUS halfway through a conversion.
Tensor bytes are read through a memory map in bounded chunks, and each chunk's
pages are dropped from the process once used: peak memory tracks the chunk,
not the shard. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype -> numpy dtype holding its bits. bfloat16 has no numpy
# type: it is carried as uint16 bit patterns and widened by hand.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
}

# A header larger than this is not a safetensors header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000

# Bytes handed out per chunk; also the granularity at which pages are released.
DEFAULT_CHUNK_BYTES = 64 << 20

_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live."""

    name: str
    dtype: str  # safetensors spelling: "BF16", "F16", "F32"
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def storage_dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.dtype]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header against its size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ConversionError(
                    f"{path}: expected a safetensors file (8-byte header length), found {size} bytes; "
                    "the download is incomplete, fetch the shard again"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ConversionError(
                    f"{path}: header claims {header_len} bytes but the file has {size}; "
                    "not a safetensors file, or truncated: fetch the shard again"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: header is not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: header is a JSON {type(header).__name__}, expected an object")

    data_start = 8 + header_len
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"{path}: tensor {name!r} has a malformed header entry: {entry!r}") from exc
        if dtype not in STORAGE_DTYPES:
            raise ConversionError(
                f"{path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(STORAGE_DTYPES)}. "
                "Re-save the checkpoint in bfloat16, float16 or float32"
            )
        expected = math.prod(shape) * STORAGE_DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0:
            raise ConversionError(
                f"{path}: tensor {name!r} of shape {list(shape)} {dtype} needs {expected} bytes, "
                f"header gives range [{begin}, {end}); the file is corrupt"
            )
        if end > data_size:
            raise ConversionError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} "
                f"but the file has {size} bytes; fetch the shard again"
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, expected)
    _check_disjoint(path, tensors, data_start)
    return tensors


def _check_disjoint(path: Path, tensors: dict[str, TensorInfo], data_start: int) -> None:
    """No two tensors may share bytes: a header whose ranges overlap would convert into wrong weights."""
    by_start = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: (t.start, t.nbytes))
    for before, after in zip(by_start, by_start[1:]):
        if after.start < before.start + before.nbytes:
            raise ConversionError(
                f"{path}: tensor {after.name!r} (bytes [{after.start - data_start}, "
                f"{after.start - data_start + after.nbytes})) overlaps tensor {before.name!r} (bytes "
                f"[{before.start - data_start}, {before.start - data_start + before.nbytes})) in data_offsets; "
                "the file is corrupt"
            )


class SafetensorsCheckpoint:
    """All tensors of a folder's safetensors files (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = _shard_files(self.folder)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            for name, info in read_header(path).items():
                if name in self.tensors:
                    raise ConversionError(
                        f"tensor {name!r} appears in both {self.tensors[name].path.name} and {path.name}"
                    )
                self.tensors[name] = info
        self._check_index()
        self._maps: dict[Path, mmap.mmap] = {}

    def _check_index(self) -> None:
        index = self.folder / INDEX_FILE
        if not index.is_file():
            return
        weight_map = _read_index(index)
        for name, shard in weight_map.items():
            info = self.tensors.get(name)
            if info is None:
                raise ConversionError(
                    f"{index}: lists tensor {name!r} in {shard}, but {shard} has no such tensor"
                )
            if info.path.name != shard:
                raise ConversionError(
                    f"{index}: lists tensor {name!r} in {shard}, but it is in {info.path.name}"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def _map(self, path: Path) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = mm
        return mm

    def iter_chunks(self, info: TensorInfo, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[np.ndarray]:
        """Yield the tensor as consecutive row blocks of its storage dtype.

        Each block is a view on the memory map; its pages are released when
        the consumer asks for the next block, so the block must not be kept.
        """
        mm = self._map(info.path)
        rows = info.shape[0] if info.shape else 1
        row_shape = info.shape[1:]
        row_elems = math.prod(row_shape)
        row_bytes = row_elems * info.storage_dtype.itemsize
        step = max(1, chunk_bytes // max(row_bytes, 1))
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            start = info.start + r0 * row_bytes
            block = np.frombuffer(mm, dtype=info.storage_dtype, count=n * row_elems, offset=start)
            try:
                yield block.reshape((n, *row_shape) if info.shape else ())
            finally:  # also when the consumer stops early
                del block
                _release(mm, start, n * row_bytes)

    def read(self, info: TensorInfo) -> np.ndarray:
        """The whole tensor as an owned array (for small tensors such as norms)."""
        parts = [chunk.copy() for chunk in self.iter_chunks(info)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # a caller still holds a view; the map goes with it
        self._maps.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _release(mm: mmap.mmap, start: int, length: int) -> None:
    # Drop used pages from this process: they stay in the page cache, but no
    # longer count towards its resident memory.
    if not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    lo = (start // _PAGE) * _PAGE
    hi = min(len(mm), start + length)
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"{index}: expected JSON with a 'weight_map' object ({exc})") from exc
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index}: 'weight_map' is a {type(weight_map).__name__}, expected an object")
    return weight_map


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        shards = sorted(set(_read_index(index).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ConversionError(
                f"{index} names {len(missing)} shard(s) missing from {folder}: {', '.join(missing)}; "
                "download them (or re-run convert with the hub id to fetch them)"
            )
        return [folder / s for s in shards]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = (
        f" Found {', '.join(pickles)}: pickle files are never loaded; re-save with "
        "save_pretrained(..., safe_serialization=True)." if pickles else ""
    )
    raise ConversionError(f"{folder}: no *.safetensors files and no {INDEX_FILE}.{hint}")


# --- dtype conversions on chunks (numpy has no bfloat16) ---------------------


def to_float32(chunk: np.ndarray, dtype: str) -> np.ndarray:
    """Widen a chunk of ``dtype`` storage to float32 exactly."""
    if dtype == "BF16":
        return (chunk.astype(np.uint32) << 16).view(np.float32)
    return chunk.astype(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the uint16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaN a quiet NaN
    return rounded
