"""Several sequences in one llama.cpp context: the batched engine's model session.

``MultiSession`` is a ``LlamaSession`` (engines/llama_session.py: model load, the
kernel-guard plan, KV types, the SWA cache, tokenizer and pieces) whose context
holds ``n_seq_max`` sequences in one unified KV cache (``kv_unified``), so one
sequence's cells can be shared by another: ``copy_sequence`` is
``llama_memory_seq_cp``, which tags the prefix's cells with the new sequence
id instead of evaluating or storing the prefix again.

``run`` evaluates one planned pass (engines/scheduler.py): each slice's
tokens at its sequence's positions, logits only at the rows someone reads,
and returns copies of those rows. A pass that fails removes what it may
have written from every sequence in it. It is not thread-safe: the batched
engine calls it under its context lock.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import numpy as np

from ..errors import GenerationError
from .llama_session import LlamaSession
from .scheduler import Slice


class MultiSession(LlamaSession):
    """One model and context whose KV cache holds several sequences, addressed by sequence id."""

    def __init__(self, model_path, n_seq_max: int, **options):
        super().__init__(model_path, n_seq_max=n_seq_max, kv_unified=True, **options)
        self.n_seq_max = n_seq_max
        self.evaluated_tokens = 0  # tokens run through llama_decode, all sequences together
        self.pass_sizes: list[int] = []  # tokens per pass, in order (measurements; trimmed to the last 10,000)

    def run(self, plan: Sequence[Slice]) -> dict[int, np.ndarray]:
        """Evaluate one pass; return, per slice index with rows, the logits rows (copies, in row order)."""
        if self._ctx is None:
            raise GenerationError("this model session is closed.")
        llama_cpp = self._llama
        batch = self._batch
        n = 0
        wanted: list[tuple[int, int]] = []  # (slice index, batch index) per logits row
        for k, part in enumerate(plan):
            sub = part.submission
            rows = set(part.rows)
            for i in range(part.start, part.end):
                if n >= self.n_batch:
                    raise GenerationError(f"a planned pass holds more than {self.n_batch} tokens.")
                batch.token[n] = sub.tokens[i]
                batch.pos[n] = sub.pos0 + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = sub.seq
                batch.logits[n] = i in rows
                if i in rows:
                    wanted.append((k, n))
                n += 1
        if len(wanted) > self.n_outputs:
            raise GenerationError(f"a planned pass asks {len(wanted)} logits rows; at most {self.n_outputs}.")
        batch.n_tokens = n
        try:
            rc = llama_cpp.llama_decode(self._ctx, batch)
            self._forward_passes += 1
            if rc != 0:
                raise GenerationError(f"llama_decode failed (code {rc}) on a pass of {n} tokens "
                                      f"over {len(plan)} sequences.")
        except BaseException:
            for part in plan:  # a failed pass may have written part of its cells
                self.remove(part.submission.seq, part.submission.pos0 + part.start)
            raise
        self.evaluated_tokens += n
        self.pass_sizes.append(n)
        del self.pass_sizes[:-10000]
        out: dict[int, list[np.ndarray]] = {}
        for k, i in wanted:
            ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
            out.setdefault(k, []).append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return {k: np.stack(rows) for k, rows in out.items()}

    # -- sequences ------------------------------------------------------------------
    def remove(self, seq: int, p0: int = 0) -> None:
        """Free sequence ``seq``'s cells from position ``p0`` on (cells other sequences share stay theirs)."""
        if self._ctx is not None:
            self._llama.llama_memory_seq_rm(self._mem, seq, max(0, p0), -1)

    def copy_sequence(self, src: int, dst: int, n_tokens: int) -> None:
        """Make ``dst`` hold ``src``'s first ``n_tokens`` positions, sharing their cells (nothing evaluated)."""
        self.remove(dst)
        self._llama.llama_memory_seq_cp(self._mem, src, dst, 0, n_tokens)

    def sequence_length(self, seq: int) -> int:
        """Positions the cache holds for ``seq`` (its highest position + 1; 0 when empty)."""
        return int(self._llama.llama_memory_seq_pos_max(self._mem, seq)) + 1

    def save_sequence(self, seq: int) -> bytes:
        llama_cpp = self._llama
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, seq)
        return bytes(buf)[:n] if n > 0 else b""

    def load_sequence(self, state: bytes, seq: int) -> bool:
        """Replace sequence ``seq`` by a saved state; False (and the sequence empty) if llama.cpp refuses it."""
        self.remove(seq)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if self._llama.llama_state_seq_set_data(self._ctx, buf, len(state), seq) != len(state):
            self.remove(seq)
            return False
        return True
