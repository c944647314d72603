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
engine calls it under its context lock (``piece`` and ``tokenize``, which
every request's thread calls, are: they take the session's own lock).

Narrow rows: a slice may ask for the logits of a few token ids only (where
its grammar allows few tokens). When every logits row of a pass is narrow,
the pass stops after the final norm, as ``LlamaSession.decode_narrow`` does
for one sequence, and the output head computes each row's few logits from
its hidden state: the 262k-row output layer is skipped for the whole pass.
A pass with any full row computes the output layer for all its rows (llama.cpp
cannot compute it for some rows only); its narrow rows still take the head's
values, from the final norm's rows copied on the way, so what a narrow row
gets does not depend on whether a neighbour needed the whole layer. The first
pass with narrow rows runs whole and checks the head against llama.cpp's
logits on each of them; a head that does not match is off from then on.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Mapping, Sequence

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
        self.hidden_passes = 0  # passes that stopped after the final norm (every row narrow)
        self._vocab_lock = threading.Lock()

    # -- vocabulary, from every request's thread ---------------------------------------------
    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        with self._vocab_lock:  # one shared piece buffer
            return super().piece(token)

    def tokenize(self, text: str | bytes, special: bool = False) -> list[int]:
        with self._vocab_lock:
            return super().tokenize(text, special)

    def run(self, plan: Sequence[Slice], narrow: Mapping[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
        """Evaluate one pass; return, per slice index with rows, the logits rows (copies, in row order).

        ``narrow`` maps slice indices whose one logits row needs only some token ids to those ids; such a
        slice gets a 1-D array of their logits instead. When every slice with rows is narrow and the head is
        on, the output layer is skipped for the whole pass.
        """
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
        narrow = narrow or {}
        for k in narrow:
            if len(plan[k].rows) != 1:
                raise GenerationError(f"a narrow slice has one logits row, slice {k} has {len(plan[k].rows)}.")
        want = bool(narrow) and self._head is not None  # narrow rows take the head's values, in every pass
        hidden_only = want and all(k in narrow for k, _ in wanted) and not self._verify_head
        batch.n_tokens = n
        self._hidden = None
        self._want_hidden, self._keep_going, self._hidden_rows_expected = want, not hidden_only, len(wanted)
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
        finally:
            self._want_hidden, self._keep_going, self._hidden_rows_expected = False, False, 1
        self.evaluated_tokens += n
        self.pass_sizes.append(n)
        del self.pass_sizes[:-10000]
        hidden = self._hidden_rows(len(wanted)) if want else None
        if hidden_only and hidden is not None:
            self.hidden_passes += 1
            return {k: self._head.logits(hidden[j], narrow[k]) for j, (k, _) in enumerate(wanted)}
        # The pass ran whole (a full row, the head's check, or no hidden rows): llama.cpp's logits are valid.
        out: dict[int, list[np.ndarray]] = {}
        for k, i in wanted:
            ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
            out.setdefault(k, []).append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        if hidden is not None and self._verify_head:
            rows = [j for j, (k, _) in enumerate(wanted) if k in narrow]
            self._check_rows(hidden[rows], [out[wanted[j][0]][0] for j in rows], [narrow[wanted[j][0]] for j in rows])
        result = {}
        for j, (k, _) in enumerate(wanted):
            if k not in narrow:
                continue
            # The head's values wherever it is on, so a narrow row's values do not depend on its neighbours.
            result[k] = self._head.logits(hidden[j], narrow[k]) if hidden is not None and self._head is not None \
                else out[k][0][narrow[k]]
        return {k: result[k] if k in narrow else np.stack(rows) for k, rows in out.items()}

    def _hidden_rows(self, n_rows: int) -> np.ndarray | None:
        """The final norm's rows of the last pass (one per logits row, in batch order), or None."""
        if self._hidden is None or self._head is None:
            self._scan_names = self._head is not None  # the norm was not where expected: look it up by name
            return None
        return self._hidden.reshape(n_rows, self._head.n_embd)  # the callback took exactly n_rows rows

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
