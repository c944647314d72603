"""Read and check a GGUF file's header before llama.cpp sees it.

llama.cpp aborts or crashes on some malformed files, so the runtime validates
here first: magic, version, every key/value, every tensor's extent against the
file size (a truncated download is caught), and the architecture. Parsing is
the converter's fast header reader; this module adds the runtime's checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import Keys, LlamaFileType

from .convert.gguf_header import GGUFTensor, read_gguf_header
from .errors import ConversionError, ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Architectures whose chat format and tool prompt this runtime implements.
SUPPORTED_ARCHITECTURES = ("gemma3",)
# Arrays longer than this are dropped after reading (their length is kept), e.g. the vocabulary.
_KEEP_ARRAY = 64


@dataclass
class GGUFInfo:
    path: Path
    file_size: int
    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[GGUFTensor] = field(default_factory=list)

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
        return sum(tensor.n_elements for tensor in self.tensors)

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
            counts[tensor.qtype.name] = counts.get(tensor.qtype.name, 0) + tensor.nbytes
        return max(counts, key=counts.get) if counts else "unknown"

    @property
    def has_chat_template(self) -> bool:
        return Keys.Tokenizer.CHAT_TEMPLATE in self.metadata

    @property
    def vocab_size(self) -> int:
        return self.array_lengths.get(Keys.Tokenizer.LIST, 0)


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
    try:
        header = read_gguf_header(path)
    except ConversionError as exc:
        kind = "truncated GGUF header" if "truncated" in str(exc) else "corrupt GGUF header"
        raise ModelLoadError(f"{path}: {kind} ({exc}). Re-download or re-convert the file.") from None
    if header.version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(f"{path}: GGUF version {header.version} is not supported (expected one of {SUPPORTED_VERSIONS}).")
    metadata: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    for key, value in header.metadata.items():
        if isinstance(value, str) or not hasattr(value, "__len__"):
            metadata[key] = value
            continue
        array_lengths[key] = len(value)
        if len(value) <= _KEEP_ARRAY:
            metadata[key] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in list(value)]
    needed = max((t.offset + t.nbytes for t in header.tensors), default=0)
    if needed > size:
        raise ModelLoadError(
            f"{path}: truncated GGUF: tensor data needs {needed:,} bytes but the file has {size:,} "
            f"({needed - size:,} missing). Re-download or re-convert the file."
        )
    return GGUFInfo(path, size, header.version, metadata, array_lengths, header.tensors)


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


# Gemma 3 puts one global-attention layer after every five sliding-window ones (llama.cpp's swa pattern 6).
GEMMA3_SWA_PATTERN = 6


def model_shape(info: GGUFInfo):
    """The figures that size a context for this model (hardware.ModelShape), from its header."""
    from .hardware import ModelShape

    def need(key_template: str) -> int:
        value = info.arch_value(key_template)
        if value is None:
            raise ModelLoadError(f"{info.path}: the GGUF header lacks {key_template.format(arch=info.architecture)}; "
                                 "re-convert the model.")
        return int(value)

    n_layer = need(Keys.LLM.BLOCK_COUNT)
    n_head = need(Keys.Attention.HEAD_COUNT)
    n_embd = need(Keys.LLM.EMBEDDING_LENGTH)
    head_dim = int(info.arch_value(Keys.Attention.KEY_LENGTH) or n_embd // n_head)
    n_swa = int(info.arch_value(Keys.Attention.SLIDING_WINDOW) or 0)
    return ModelShape(
        n_layer=n_layer, n_head=n_head, n_head_kv=int(info.arch_value(Keys.Attention.HEAD_COUNT_KV) or n_head),
        head_dim=head_dim, n_embd=n_embd, n_ff=need(Keys.LLM.FEED_FORWARD_LENGTH), n_vocab=info.vocab_size,
        n_swa=n_swa, swa_layers=(n_layer - n_layer // GEMMA3_SWA_PATTERN) if n_swa else 0,
        weights_bytes=sum(t.nbytes for t in info.tensors), trained_ctx=info.context_length or 0)
