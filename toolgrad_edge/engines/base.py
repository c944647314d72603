"""What the decode loop needs from a model: a sequence of tokens in a KV cache.

The loop (runtime.py) appends tokens, asks for logits at chosen positions of
the last batch, and rewinds the cache after a rejected draft. Keeping the
tokens held by the cache explicit lets a caller check whether someone else
used the session in between and bring it back (``sync``).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class DecodeSession(Protocol):
    n_vocab: int
    n_ctx: int

    @property
    def tokens(self) -> list[int]:
        """The tokens the KV cache holds, in position order (a copy)."""

    @property
    def n_tokens(self) -> int: ...

    @property
    def forward_passes(self) -> int:
        """llama_decode calls so far (one per batch)."""

    def tokenize(self, text: str, special: bool = False) -> list[int]: ...

    def piece(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def decode(self, tokens: Sequence[int], n_logits: int = 1) -> np.ndarray:
        """Append tokens; return the logits of the last ``n_logits`` of them (rows, a copy)."""

    def decode_at(self, tokens: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        """Append tokens; return the logits after tokens[i] for each i in ``rows`` (increasing positions)."""

    def decode_narrow(self, tokens: Sequence[int], ids: np.ndarray) -> np.ndarray:
        """Append tokens; return the logits of the tokens ``ids`` for the next position (decode(...)[0][ids]),
        skipping the output layer where the session can."""

    def rewind(self, n_keep: int) -> None:
        """Drop every cached token from position ``n_keep`` on."""

    def sync(self, tokens: Sequence[int]) -> int:
        """Make the cache hold exactly ``tokens`` (reusing the common prefix); return the reused count."""

    def save_state(self) -> bytes: ...

    def load_state(self, state: bytes, tokens: Sequence[int]) -> bool: ...

    def close(self) -> None: ...
