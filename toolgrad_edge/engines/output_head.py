"""The output layer's logits for a few tokens, computed from the final hidden state.

llama.cpp computes every logit at every pass: on Gemma 3 that is a 262,144-row
matrix product, about 60 % of a one-token pass of the 270M on a CPU. Where the
grammar allows only a few tokens (a tool name's first token, a parameter name,
``,`` or ``)``), the session stops the pass after the final norm and this module
computes the logits of just those tokens.

It follows llama.cpp's CPU kernels: the hidden state is first rounded to the
format the weight type's dot product takes (Q8_0 blocks of 32 for Q8_0, Q4_0,
Q5_0, Q4_1 and Q5_1 weights; Q8_K blocks of 256 for k-quants and i-quants; F16
or BF16 for those weights), then multiplied with the dequantized rows, which is
the same sum. Only the order of the float additions differs (measured on the
270M: at most about 1e-5 against llama.cpp's own logits, far below the
batched-versus-one-token noise of 0.4-0.9).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize

_CACHE_BYTES = 16 << 20  # dequantized rows kept: 6,553 of the 270M's (2.5 KiB each), 1,638 of the 4B's


def _q8_blocks(x: np.ndarray, block: int, half_scale: bool) -> np.ndarray:
    """x rounded as llama.cpp quantizes activations: per block, scale max|x| to 127 and round to integers."""
    b = x.reshape(-1, block).astype(np.float32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(amax > 0, np.rint(b * (np.float32(127) / amax)), 0).astype(np.float32)
    if half_scale:  # block_q8_0 stores its scale as F16
        d = d.astype(np.float16).astype(np.float32)
    return (q * d).reshape(-1)


def _q8_k(x: np.ndarray) -> np.ndarray:
    """Q8_K (the k-quants' activation format): blocks of 256, the largest-magnitude value maps to -127, F32 scale."""
    b = x.reshape(-1, 256).astype(np.float32)
    idx = np.abs(b).argmax(axis=1)
    vmax = b[np.arange(b.shape[0]), idx][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(vmax != 0, np.float32(-127) / vmax, 0).astype(np.float32)
        q = np.minimum(np.rint(b * iscale), 127)
        d = np.where(iscale != 0, np.float32(1) / iscale, 0).astype(np.float32)
    return (q * d).astype(np.float32).reshape(-1)


def _bf16(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16  # round to nearest even, as ggml does
    return u.astype(np.uint32).view(np.float32)


_Q8_0 = lambda x: _q8_blocks(x, 32, True)  # noqa: E731
# Weight type -> how the CPU back-end rounds the activations for its dot product (ggml-cpu's vec_dot_type).
_ACTIVATION = {
    Q.F32: lambda x: x.astype(np.float32),
    Q.F16: lambda x: x.astype(np.float16).astype(np.float32),
    Q.BF16: _bf16,
    Q.Q8_0: _Q8_0,
    Q.Q4_0: _Q8_0,
    Q.Q5_0: _Q8_0,
    Q.Q4_1: _Q8_0,  # Q8_1: the same values; its block sum (for the weights' offset) is rounded to F16 there
    Q.Q5_1: _Q8_0,
    Q.Q2_K: _q8_k,
    Q.Q3_K: _q8_k,
    Q.Q4_K: _q8_k,
    Q.Q5_K: _q8_k,
    Q.Q6_K: _q8_k,
}


class OutputHead:
    """The output matrix of a GGUF file (``output.weight``, or the tied ``token_embd.weight``), row by row."""

    def __init__(self, path: str | Path, qtype: Q, shape: tuple[int, ...], offset: int):
        n_embd, n_rows = shape[0], shape[1]
        block, size = GGML_QUANT_SIZES[qtype]
        self.qtype = qtype
        self.n_embd = n_embd
        self._activation = _ACTIVATION[qtype]
        if n_embd % (256 if self._activation is _q8_k else block):
            raise ValueError(f"a row of {n_embd} values does not split into {qtype.name} blocks")
        self._rows = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(n_rows, n_embd // block * size))
        self._cache: dict[int, np.ndarray] = {}
        self._cache_rows = max(1024, _CACHE_BYTES // (4 * n_embd))

    @classmethod
    def from_gguf(cls, path: str | Path, tensors) -> "OutputHead | None":
        """The head of a file whose header lists `tensors` (gguf_header.GGUFTensor), or None if its type is not handled."""
        by_name = {t.name: t for t in tensors}
        t = by_name.get("output.weight") or by_name.get("token_embd.weight")
        if t is None or t.qtype not in _ACTIVATION or len(t.shape) != 2:
            return None
        try:
            return cls(path, t.qtype, tuple(t.shape), t.offset)
        except (ValueError, OSError):
            return None

    def _weights(self, ids: np.ndarray) -> np.ndarray:
        missing = [int(i) for i in ids if int(i) not in self._cache]
        if missing:
            if len(self._cache) + len(missing) > self._cache_rows:
                self._cache.clear()
            rows = dequantize(np.asarray(self._rows[missing]), self.qtype).reshape(len(missing), self.n_embd)
            for i, row in zip(missing, rows.astype(np.float32)):
                self._cache[i] = row
        return np.stack([self._cache[int(i)] for i in ids])

    def logits(self, hidden: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The logits of tokens `ids` given the final (normed) hidden state of one position."""
        x = self._activation(np.asarray(hidden, dtype=np.float32))
        return self._weights(ids) @ x
