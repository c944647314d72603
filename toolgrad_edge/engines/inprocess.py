"""A llama.cpp model and context in this process, driven through the public low-level API.

``LlamaSession`` owns the model, the context and one batch buffer. It keeps
the list of tokens the KV cache holds (sequence 0), appends tokens with
logits requested only where the caller needs them, and rewinds with
``llama_memory_seq_rm``. A decode that fails or is interrupted removes
whatever it may have written, so the cache and the token list never disagree.
No attribute of llama-cpp-python's ``Llama`` class is touched.
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

SEQ = 0  # the one sequence this session uses


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
                 n_batch: int = 512, verbose: bool = False):
        import llama_cpp

        self._llama = llama_cpp
        self.model_path = Path(model_path)
        self.n_batch = n_batch
        self._model = None
        self._ctx = None
        self._batch = None
        _init_backend(verbose)
        with quiet_stderr(not verbose):
            mparams = llama_cpp.llama_model_default_params()
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
            cparams.n_seq_max = 1
            cparams.n_threads = n_threads
            cparams.n_threads_batch = n_threads
            # The full-size sliding-window cache lets a saved prefix be restored
            # and a rejected draft be removed; the default would drop old positions.
            cparams.swa_full = True
            ctx = llama_cpp.llama_init_from_model(model, cparams)
            if not ctx:
                self.close()
                raise ModelLoadError(f"{self.model_path}: llama.cpp could not create a context of {n_ctx} tokens "
                                     "(too little memory? try a smaller n_ctx).")
            self._ctx = ctx
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.bos = llama_cpp.llama_vocab_bos(self._vocab)
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._tokens: list[int] = []
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
        if self._ctx is None:
            raise GenerationError("this model session is closed.")
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise GenerationError("decode needs at least one token.")
        n_logits = max(1, min(n_logits, len(tokens)))
        if n_logits > self.n_batch:
            raise GenerationError(f"at most {self.n_batch} logits rows per decode, asked for {n_logits}.")
        start = len(self._tokens)
        if start + len(tokens) > self.n_ctx:
            raise ContextLengthError(f"{start + len(tokens)} tokens exceed the context of {self.n_ctx} tokens.")
        llama_cpp = self._llama
        batch = self._batch
        tail = len(tokens) - n_logits
        # Chunks: whole n_batch pieces, then a last one that holds every logits row.
        cuts = list(range(0, len(tokens), self.n_batch))
        if len(tokens) - cuts[-1] < n_logits:
            cuts[-1] = len(tokens) - n_logits
            if len(cuts) > 1 and cuts[-1] <= cuts[-2]:
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
                    batch.logits[j] = i >= tail or i == b - 1
                rc = llama_cpp.llama_decode(self._ctx, batch)
                self._forward_passes += 1
                if rc != 0:
                    raise GenerationError(f"llama_decode failed (code {rc}) at position {start + a}.")
                self._tokens.extend(tokens[a:b])
            first = (cuts[-1] - cuts[-2]) - n_logits
            out = np.empty((n_logits, self.n_vocab), dtype=np.float32)
            for r in range(n_logits):
                ptr = llama_cpp.llama_get_logits_ith(self._ctx, first + r)
                out[r] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            return out
        except BaseException:
            # A failed or interrupted decode may have written part of a batch.
            self.rewind(start)
            raise

    def rewind(self, n_keep: int) -> None:
        n_keep = max(0, n_keep)
        if self._ctx is None:
            return
        if not self._llama.llama_memory_seq_rm(self._mem, SEQ, n_keep, -1):
            # A partial removal can fail on some caches: start over from empty.
            self._llama.llama_memory_clear(self._mem, True)
            del self._tokens[:]
            return
        del self._tokens[n_keep:]

    def clear(self) -> None:
        if self._ctx is not None:
            self._llama.llama_memory_clear(self._mem, True)
        del self._tokens[:]

    def sync(self, tokens: Sequence[int]) -> int:
        """Make the cache hold exactly `tokens`; return how many were already there."""
        common = common_prefix(self._tokens, tokens)
        self.rewind(common)
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
        return True


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
