"""A llama.cpp model and context in this process, driven through the public low-level API.

``LlamaSession`` owns the model, the context and one batch buffer. It keeps
the list of tokens the KV cache holds (sequence 0), appends tokens with
logits requested only where the caller needs them, and rewinds with
``llama_memory_seq_rm``. A decode that fails or is interrupted removes
whatever it may have written, so the cache and the token list never disagree.
No attribute of llama-cpp-python's ``Llama`` class is touched.

A saved prefix comes back in another cell layout than the one decoding left:
llama.cpp saves only the sliding-window cache's cells inside the window and
restores them packed from cell 0, and later passes over those cells round
differently. ``evaluate_prefix`` therefore evaluates a prefix in an empty
cache, saves it and loads the saved state back, so that an evaluated and a
restored prefix decode the same tokens bit for bit; ``restored_prefix`` tells
whether the cache still holds a prefix in that layout (rewinding to its end keeps it).

Given an ``OutputHead``, ``decode_narrow`` runs a pass that stops after the
final norm (llama.cpp's eval callback: the scheduler stops computing once the
callback says so) and computes the logits of a few tokens from the hidden
state, skipping the 262k-row output layer.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ContextLengthError, GenerationError, ModelLoadError
from .kernel_guard import apply_kernel_plan

SEQ = 0  # the one sequence this session uses
KV_TYPES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0"}  # KV cache types -> ggml's type constants


@contextmanager
def quiet_stderr(enabled: bool):
    """Silence llama.cpp's C-level logging on fd 2 (e.g. while loading), unless verbose."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


logger = logging.getLogger(__name__)
_backend_ready = False


def _init_backend(verbose: bool) -> None:
    global _backend_ready
    import llama_cpp

    # llama-cpp-python routes llama.cpp's log through this logger.
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not _backend_ready:
        with quiet_stderr(not verbose):
            llama_cpp.llama_backend_init()
        _backend_ready = True


class LlamaSession:
    """One model, one context, and the tokens its KV cache holds."""

    def __init__(self, model_path: str | os.PathLike, n_ctx: int, n_threads: int, n_gpu_layers: int = 0,
                 n_batch: int = 512, verbose: bool = False, output_head=None, kv_type: str = "f16",
                 swa_full: bool = True, n_outputs_max: int | None = None, n_seq_max: int = 1,
                 kv_unified: bool = False):
        import llama_cpp

        self._llama = llama_cpp
        self.model_path = Path(model_path)
        self.n_batch = n_batch
        if kv_type not in KV_TYPES:
            raise ModelLoadError(f"KV cache type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}.")
        self.kv_type = kv_type
        self.swa_full = swa_full
        # The logits rows one batch may ask for; llama.cpp reserves them all (n_batch x vocabulary by default).
        self.n_outputs = min(n_batch, n_outputs_max or n_batch)
        self._model = None
        self._ctx = None
        self._batch = None
        # The output layer is skipped only on the CPU back-end, where it is a large part of a pass.
        self._head = output_head if n_gpu_layers == 0 else None
        if self._head is not None:
            try:
                ggml_tensor_api()
            except (ImportError, OSError, AttributeError) as exc:  # a llama-cpp-python without ggml's symbols
                # Said here and by doctor's "off" lines: every pass then computes the whole output layer.
                logger.warning("narrow output head off: llama_cpp._ggml could not be loaded (%s)", exc)
                self._head = None
        self._eval_cb = None
        self._want_hidden = False
        self._keep_going = False  # copy the final norm's rows but compute the output layer too
        self._hidden_rows_expected = 1  # rows the final norm holds in a pass that asks for them
        self._verify_head = self._head is not None  # the first narrow pass also runs whole, to check the head
        self.head_check: dict | None = None  # that check's figures (max_abs_difference, ok, ...)
        self._hidden: np.ndarray | None = None
        self._norm_nodes: set[int] = set()  # addresses at which llama.cpp's graphs held "result_norm"
        self._scan_names = True
        _init_backend(verbose)
        with quiet_stderr(not verbose):
            mparams = apply_kernel_plan(llama_cpp.llama_model_default_params())  # AMX avoided where it crashes
            mparams.n_gpu_layers = n_gpu_layers
            model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), mparams)
            if not model:
                raise ModelLoadError(f"{self.model_path}: llama.cpp could not load the model "
                                     "(run with --verbose to see its log).")
            self._model = model
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = n_batch
            cparams.n_ubatch = n_batch
            cparams.n_seq_max = n_seq_max  # several only for the batched engine (engines/multi_session.py)
            if kv_unified:
                cparams.kv_unified = True  # one cache for all sequences, so they can share a prefix's cells
            cparams.n_threads = n_threads
            cparams.n_threads_batch = n_threads
            # The full-size sliding-window cache keeps every position, so the cache can be rewound to any
            # point (a common prefix with the next request); without it older positions are dropped and
            # rewind() starts over where they would be needed.
            cparams.swa_full = swa_full
            cparams.n_outputs_max = self.n_outputs
            cparams.type_k = cparams.type_v = getattr(llama_cpp, KV_TYPES[kv_type])
            if kv_type != "f16":  # a quantized V cache needs flash attention
                cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if self._head is not None:
                self._eval_cb = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)
                cparams.cb_eval = self._eval_cb
            ctx = llama_cpp.llama_init_from_model(model, cparams)
            if not ctx:
                self.close()
                raise ModelLoadError(f"{self.model_path}: llama.cpp could not create a context of {n_ctx} tokens "
                                     "(too little memory? try a smaller n_ctx).")
            self._ctx = ctx
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self.n_swa = int(llama_cpp.llama_model_n_swa(model)) if not swa_full else 0
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.bos = llama_cpp.llama_vocab_bos(self._vocab)
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._tokens: list[int] = []
        self._restored = 0  # leading tokens the cache holds as loaded from a saved state, in its layout
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._forward_passes = 0

    # -- lifecycle ----------------------------------------------------------
    def close(self) -> None:
        llama_cpp = self._llama
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        self._eval_cb = None  # llama.cpp held it until the context was freed
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def closed(self) -> bool:
        return self._ctx is None

    @property
    def vocab(self):
        """The llama.cpp vocabulary handle (for grammar engines)."""
        return self._vocab

    # -- vocabulary -----------------------------------------------------------
    def tokenize(self, text: str | bytes, special: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        if not data:
            return []
        n_max = len(data) + 8
        buf = (self._llama.llama_token * n_max)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        if n < 0:  # cannot happen with one token per byte at most, but be exact
            n_max = -n
            buf = (self._llama.llama_token * n_max)()
            n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            n = self._llama.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
            piece = self._piece_buf[:n] if n > 0 else b""
            self._pieces[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        return bool(self._llama.llama_vocab_is_eog(self._vocab, token))

    # -- the KV cache ---------------------------------------------------------
    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    @property
    def n_tokens(self) -> int:
        return len(self._tokens)

    @property
    def forward_passes(self) -> int:
        return self._forward_passes

    def decode(self, tokens: Sequence[int], n_logits: int = 1) -> np.ndarray:
        """Append `tokens` to the cache; return the logits of its last `n_logits` tokens.

        Rows are copies in token order (row i predicts the token after
        tokens[len(tokens) - n_logits + i]). Long inputs go in chunks of
        n_batch; all requested logits must fall in the last chunk.
        """
        tokens, n_logits = self._check(tokens, n_logits)
        rows = list(range(len(tokens) - n_logits, len(tokens)))
        first = self._append(tokens, rows)
        return self._logits_rows([r - first for r in rows])

    def decode_at(self, tokens: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        """Append `tokens`; return the logits after each of tokens[i] for i in `rows` (increasing), one row each.

        Draft verification asks only for the positions where the grammar leaves a
        choice: each logits row costs a pass over the 262k-row output layer.
        """
        rows = [int(r) for r in rows]
        tokens, _ = self._check(tokens, max(1, len(rows) + (bool(rows) and rows[-1] != len(tokens) - 1)))
        if not rows or rows != sorted(set(rows)) or rows[0] < 0 or rows[-1] >= len(tokens):
            raise GenerationError(f"logits rows must be increasing positions in the batch of {len(tokens)}, "
                                  f"got {rows}.")
        if len(tokens) - rows[0] > self.n_batch:
            raise GenerationError(f"the logits rows and the tokens after them must fit one batch of {self.n_batch}; "
                                  f"the first row is {len(tokens) - rows[0]} tokens from the end.")
        first = self._append(tokens, rows)
        return self._logits_rows([r - first for r in rows])

    @property
    def narrow(self) -> bool:
        """Whether decode_narrow can skip the output layer (CPU back-end, a handled weight type, and the
        head matched llama.cpp's logits on the first narrow pass, or has not been checked yet)."""
        return self._head is not None

    def decode_narrow(self, tokens: Sequence[int], ids: np.ndarray) -> np.ndarray:
        """Append `tokens`; return the logits of the tokens `ids` only, for the token after the last one.

        The pass stops after the final norm and the output head computes these
        rows (within about 1e-5 of llama.cpp's own). If the pass could not be
        stopped there, it ran whole and the rows come from llama.cpp's logits.
        """
        ids = np.asarray(ids, dtype=np.int64)
        tokens, _ = self._check(tokens, 1)
        last = [len(tokens) - 1]
        self._hidden = None
        self._want_hidden = self._head is not None
        try:
            first = self._append(tokens, last)
        finally:
            self._want_hidden = False
        if self._hidden is None:
            if self._head is not None:
                # The graph's final norm was not where the callback expected it: this pass
                # computed every logit; look the node up by name next time.
                self._scan_names = True
            return self._logits_rows([last[0] - first])[0][ids]
        if self._verify_head:
            return self._check_head(ids, self._logits_rows([last[0] - first])[0])
        return self._head.logits(self._hidden[-self._head.n_embd:], ids)

    HEAD_TOLERANCE = 1e-3  # the head's logits against llama.cpp's: about 1e-5 where it rounds as the kernels do

    def _check_head(self, ids: np.ndarray, full: np.ndarray) -> np.ndarray:
        """The first narrow pass ran whole: check the head on its row (_check_rows); return llama.cpp's values."""
        self._check_rows(self._hidden[None, -self._head.n_embd:], [full], [ids])
        return full[ids]

    def _check_rows(self, hidden: np.ndarray, full: Sequence[np.ndarray], ids: Sequence[np.ndarray]) -> None:
        """A pass ran whole: compare the head with llama.cpp's logits on each row, and keep it only if exact.

        Each row is probed at its asked ``ids`` and its 32 largest logits. The head copies the CPU kernels'
        rounding of the activations for the output weight's type; another kernel path (AMX, repacked weights,
        ARM's dot products) may round otherwise, and then the head is off.
        """
        self._verify_head = False
        worst, probed = 0.0, 0
        for h, row, few in zip(hidden, full, ids):
            probe = np.unique(np.concatenate([np.asarray(few, dtype=np.int64), np.argsort(row)[-32:]]))
            worst = max(worst, float(np.max(np.abs(self._head.logits(h, probe) - row[probe]))))
            probed += len(probe)
        ok = worst <= self.HEAD_TOLERANCE
        self.head_check = {"max_abs_difference": worst, "tolerance": self.HEAD_TOLERANCE, "ok": ok,
                           "weight_type": self._head.qtype.name, "rows": probed, "sequences": len(full)}
        if not ok:
            # Not exact on this kernel path: every later pass computes the output layer (narrow passes off).
            self._head = None

    def _on_tensor(self, tensor, ask, _user_data) -> bool:
        """llama.cpp's eval callback: stop the pass after "result_norm" when only its hidden state is wanted.

        Asked about each node in order, it claims the final norm; told that node
        is computed, it copies the hidden state and returns False, which ends the
        graph's computation there (the output layer is the only node after it).
        On any error it lets the pass run whole, so llama.cpp's logits stay valid.
        """
        if not self._want_hidden or not tensor:
            return False
        try:
            lib = ggml_tensor_api()
            if ask:
                # Names are read only at addresses seen before (graphs of other shapes may put
                # another node there) or while looking the node up: a name per node costs 0.4 ms.
                if (tensor in self._norm_nodes or self._scan_names) and lib.ggml_get_name(tensor) == b"result_norm":
                    self._norm_nodes.add(tensor)
                    self._scan_names = False
                    return True
                return False
            n = lib.ggml_nbytes(tensor)
            row = 4 * self._head.n_embd
            if n != row * self._hidden_rows_expected:
                raise GenerationError(f"result_norm holds {n} bytes, not {self._hidden_rows_expected} rows of {row}")
            hidden = np.empty(n // 4, dtype=np.float32)
            lib.ggml_backend_tensor_get(tensor, hidden.ctypes.data, 0, n)
            self._hidden = hidden
            # Stop here, unless this pass checks the head against the whole pass or others need their logits.
            return self._verify_head or self._keep_going
        except Exception:
            self._hidden = None
            # Asked: claim nothing. Told: compute the rest, so llama.cpp's own logits are valid.
            return not ask

    def _check(self, tokens: Sequence[int], n_logits: int) -> tuple[list[int], int]:
        if self._ctx is None:
            raise GenerationError("this model session is closed.")
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise GenerationError("decode needs at least one token.")
        n_logits = max(1, min(n_logits, len(tokens)))
        if n_logits > self.n_outputs:
            # llama.cpp reserved this many rows and aborts the process past them.
            raise GenerationError(f"at most {self.n_outputs} logits rows per decode (n_outputs_max), "
                                  f"asked for {n_logits}.")
        if len(self._tokens) + len(tokens) > self.n_ctx:
            raise ContextLengthError(f"{len(self._tokens) + len(tokens)} tokens exceed the context of "
                                     f"{self.n_ctx} tokens.")
        return tokens, n_logits

    def _append(self, tokens: list[int], rows: list[int]) -> int:
        """Run `tokens` through llama_decode with logits at `rows`; return where the last batch starts."""
        start = len(self._tokens)
        llama_cpp = self._llama
        batch = self._batch
        wanted = set(rows)
        # Chunks: whole n_batch pieces, then a last one that holds every logits row.
        cuts = list(range(0, len(tokens), self.n_batch))
        if cuts[-1] > rows[0]:
            cuts[-1] = rows[0]
            while len(cuts) > 1 and cuts[-1] <= cuts[-2]:
                cuts.pop(-2)
        cuts.append(len(tokens))
        try:
            for a, b in zip(cuts, cuts[1:]):
                batch.n_tokens = b - a
                for j, i in enumerate(range(a, b)):
                    batch.token[j] = tokens[i]
                    batch.pos[j] = start + i
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = SEQ
                    batch.logits[j] = i in wanted or i == b - 1
                rc = llama_cpp.llama_decode(self._ctx, batch)
                self._forward_passes += 1
                if rc != 0:
                    raise GenerationError(f"llama_decode failed (code {rc}) at position {start + a}.")
                self._tokens.extend(tokens[a:b])
            return cuts[-2]
        except BaseException:
            # A failed or interrupted decode may have written part of a batch.
            self.rewind(start)
            raise

    def _logits_rows(self, indices: Sequence[int]) -> np.ndarray:
        """Copies of the logits at these indices of the last batch."""
        out = np.empty((len(indices), self.n_vocab), dtype=np.float32)
        for r, i in enumerate(indices):
            ptr = self._llama.llama_get_logits_ith(self._ctx, i)
            out[r] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def rewind(self, n_keep: int) -> None:
        n_keep = max(0, n_keep)
        if self._ctx is None:
            return
        if n_keep < self._restored:
            self._restored = 0  # a shorter prefix than was restored: not the layout its own restore gives
        # Removed even at the end of the token list: a failed decode may have written past it.
        if not self._llama.llama_memory_seq_rm(self._mem, SEQ, n_keep, -1) or not self._window_kept(n_keep):
            # A partial removal can fail on some caches, and a sliding-window cache that is not full-size
            # has dropped positions the next token would attend to: start over from empty.
            self._llama.llama_memory_clear(self._mem, True)
            del self._tokens[:]
            self._restored = 0
            return
        del self._tokens[n_keep:]

    def _window_kept(self, n_keep: int) -> bool:
        """Whether the cache still holds the window of positions before n_keep (always, with swa_full)."""
        if not self.n_swa or n_keep == 0:
            return True
        pos_min = self._llama.llama_memory_seq_pos_min(self._mem, SEQ)  # -1: nothing left of the window
        return 0 <= pos_min <= max(0, n_keep - self.n_swa)

    def clear(self) -> None:
        if self._ctx is not None:
            self._llama.llama_memory_clear(self._mem, True)
        del self._tokens[:]
        self._restored = 0

    def sync(self, tokens: Sequence[int]) -> int:
        """Make the cache hold exactly `tokens`; return how many were already there."""
        common = common_prefix(self._tokens, tokens)
        self.rewind(common)
        common = len(self._tokens)  # less where the rewind had to start over (a window-only SWA cache)
        rest = list(tokens[common:])
        if rest:
            self.decode(rest, 1)
        return common

    # -- saved states (the prefix cache) ---------------------------------------
    def save_state(self) -> bytes:
        llama_cpp = self._llama
        size = llama_cpp.llama_state_seq_get_size(self._ctx, SEQ)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, SEQ)
        return bytes(buf)[:n] if n > 0 else b""

    def load_state(self, state: bytes, tokens: Sequence[int]) -> bool:
        """Replace the cache by a saved state holding `tokens`; False (and an empty cache) if refused."""
        llama_cpp = self._llama
        self.clear()
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(state), SEQ) != len(state):
            self.clear()
            return False
        self._tokens = [int(t) for t in tokens]
        self._restored = len(self._tokens)
        return True

    def evaluate_prefix(self, tokens: Sequence[int]) -> bytes:
        """Evaluate `tokens` from an empty cache and leave them as a restore would; return the saved state.

        Decoding leaves the sliding-window layers' cells where the positions
        put them; a restore packs the window's cells from cell 0. Passes after
        each read the same keys and values at other cells and round
        differently, so the next tokens could differ between a first request
        and a later one. Loading the state just saved gives this request the
        layout every later restore gives (about 15 ms for a 950-token prefix
        on the 270M model). Starting from an empty cache keeps the state the
        same whatever the cache held before.
        """
        tokens = [int(t) for t in tokens]
        self.clear()
        self.decode(tokens, 1)
        state = self.save_state()
        if not state or not self.load_state(state, tokens):
            raise GenerationError(f"llama.cpp could not restore the state of {len(tokens)} tokens it had just "
                                  f"saved ({len(state)} bytes).")
        return state

    def restored_prefix(self, tokens: Sequence[int]) -> bool:
        """Whether the cache begins with exactly `tokens` in the layout their restore gives.

        Rewinding to the end of a restored prefix frees the cells after it and
        leaves the layout as the restore left it (checked bit for bit on the
        logits of the passes that follow), so such a prefix is reused as is.
        """
        n = len(tokens)
        return 0 < n == self._restored and self._tokens[:n] == [int(t) for t in tokens]


_GGML = None


def ggml_tensor_api():
    """ggml's C API (tensor name, size and data), loaded once from llama-cpp-python's libraries."""
    global _GGML
    if _GGML is None:
        from llama_cpp._ggml import libggml

        libggml.ggml_get_name.restype = ctypes.c_char_p
        libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
        libggml.ggml_nbytes.restype = ctypes.c_size_t
        libggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
        libggml.ggml_backend_tensor_get.restype = None
        libggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                                    ctypes.c_size_t]
        _GGML = libggml
    return _GGML


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
