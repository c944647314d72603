"""Grammar engines: which tokens a grammar allows next, behind one small interface.

The decode loop asks a matcher five things: does it allow this token (or
how many of these draft tokens), the mask over the whole vocabulary (only
when the sampled token was refused), accept a token, which tokens the
grammar forces next (jump-forward), and roll back. Two engines implement it:

- ``llguidance`` (the default, the ``llguidance`` extra): masks in tens of
  microseconds, exact forced tokens, cheap rollback;
- ``llama``: llama.cpp's own GBNF sampler, the fallback. It has no forced
  tokens of its own, so it forces only the rest of a tool name (the text
  rule of grammars.lookahead), and it rolls back by replaying.

Never accept a token a matcher has not allowed: llguidance's matcher enters
a permanent error state then.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import struct
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from .errors import GenerationError
from .leftovers import remove_leftovers, temp_prefix

ENGINES = ("llguidance", "llama")
DEFAULT_ENGINE = "llguidance"
# On a rejected greedy pick with the llama engine, the best candidates are
# checked in one small call before masking the whole vocabulary.
PROBE_CANDIDATES = 64


class GrammarMatcher(Protocol):
    full_masks: int

    def allows(self, token: int) -> bool: ...

    def validate(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, in order, the grammar accepts from here (no state change)."""

    def best_of(self, logits: np.ndarray) -> int | None:
        """The highest-logit allowed token, or None if this engine cannot tell cheaply."""

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` with every refused token set to -inf (a new array)."""

    def few_allowed(self, limit: int) -> np.ndarray | None:
        """The allowed tokens here if there are at most `limit` (none: None), or None if this engine cannot tell cheaply."""

    def accept(self, token: int) -> None: ...

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (already checked; not yet accepted)."""

    def is_finished(self) -> bool:
        """True when only end-of-generation can follow."""

    def rollback(self, n: int) -> None: ...

    def close(self) -> None: ...


# -- llguidance ------------------------------------------------------------------

def llguidance_load_error() -> str | None:
    """Why llguidance cannot be used here: "not installed", or what importing it raised; None where it can."""
    import importlib.util

    try:
        if importlib.util.find_spec("llguidance") is None:
            return "not installed"
        import llguidance  # noqa: F401  (its compiled part loads here)
    except Exception as exc:  # ImportError, or OSError from a compiled part built for another machine
        return f"{type(exc).__name__}: {exc}"
    return None


def llguidance_available() -> bool:
    return llguidance_load_error() is None


class LlguidanceTokenizer:
    """llguidance's view of a llama.cpp vocabulary, built once per loaded model.

    Building it reads every token's bytes (cached on disk after the first
    process) and builds llguidance's token trie (about 0.45 s on Gemma's 262k
    vocabulary, with the GIL held), so it starts in a background thread when
    the runtime loads and a request waits for it only if it needs a grammar
    before it is ready.
    """

    def __init__(self, vocab, eos_tokens: list[int], cache_file: Path | None = None):
        self._vocab = vocab
        self._cache_file = cache_file
        self._eos = eos_tokens
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._value = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._build, name="llguidance-tokenizer", daemon=True)
        self._thread.start()

    def _build(self) -> None:
        try:
            self._value = _lltokenizer(self._vocab, self._eos, self._cancel, self._cache_file)
        except BaseException as exc:  # reported to the first request that needs it
            self._error = exc
        finally:
            self._done.set()

    def close(self) -> None:
        """Stop (or wait for) the build: it reads the model's vocabulary, which is about to be freed."""
        self._cancel.set()
        self._done.wait()
        self._value = None

    def get(self):
        self._done.wait()
        if self._error is not None:
            raise GenerationError(f"llguidance could not read the model's vocabulary ({self._error}).")
        return self._value


def _lltokenizer(vocab, eos_tokens: list[int], cancel: threading.Event | None = None,
                 cache_file: Path | None = None):
    """llguidance.llamacpp.lltokenizer_from_vocab, with the token bytes kept in a cache file.

    Reading 262,144 token pieces through ctypes is about half of the cost; the
    cache file (keyed by the model file) skips it in later processes. The
    packaged helper also calls llama_token_get_attr, which warns once per token.
    """
    import llama_cpp
    from llguidance import LLTokenizer

    n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)
    tokens = _read_token_cache(cache_file, n_tokens) if cache_file is not None else None
    if tokens is None:
        tokens = _token_bytes(vocab, n_tokens, cancel)
        if cache_file is not None:
            _write_token_cache(cache_file, tokens)
    # llguidance tokenizes forced text with llama.cpp's own tokenizer, through its C entry point.
    fptr = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    # slices=[]: llguidance's "slices" precompute token sets that speed up masks
    # inside strings (2.6 ms -> 0.1 ms a mask on this vocabulary), but building them
    # costs about 0.5 s with the GIL held, in every new process. Masks are computed
    # only when the sampled token is refused, so they are not worth it here.
    return LLTokenizer.from_llamacpp(tokens=tokens, vocab_ptr=vocab, tokenize_fptr=fptr, eos_token=eos_tokens,
                                     slices=[])


def _token_bytes(vocab, n_tokens: int, cancel: threading.Event | None) -> list[bytes]:
    import llama_cpp

    buf_len = 16 * 1024
    buf = ctypes.create_string_buffer(buf_len + 1)
    control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    user_defined = llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    token_to_piece = llama_cpp.llama_token_to_piece
    get_attr = llama_cpp.llama_vocab_get_attr
    tokens: list[bytes] = []
    for token in range(n_tokens):
        if cancel is not None and token % 4096 == 0 and cancel.is_set():
            raise GenerationError("the runtime was closed while llguidance read the vocabulary.")
        n = token_to_piece(vocab, token, buf, buf_len, 0, True)
        if n < 0:
            raise GenerationError(f"token {token} does not fit in {buf_len} bytes.")
        piece = buf[:n]
        attr = get_attr(vocab, token)
        # Control tokens (and user-defined ones spelled like them) are special to llguidance.
        if attr & control or (attr & user_defined and piece.startswith(b"<") and piece.endswith(b">")):
            piece = b"\xff" + piece
        tokens.append(piece)
    return tokens


# Version 2 carries a sha256 of everything after it, like the prefix cache's entries.
TOKEN_CACHE_MAGIC = b"TGELLGT2"
_OLDER_TOKEN_CACHES = (b"TGELLGT1",)  # older layouts: rebuilt without a warning


def _read_token_cache(path: Path, n_tokens: int) -> list[bytes] | None:
    """The cached token bytes, or None when missing or not matching (never trusted blindly).

    A file that is there but damaged (wrong checksum, lengths or count) is removed
    with one warning; the caller rebuilds it.
    """
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    if blob.startswith(_OLDER_TOKEN_CACHES):
        return None
    head = len(TOKEN_CACHE_MAGIC) + 4 + 32
    problem = None
    if not blob.startswith(TOKEN_CACHE_MAGIC) or len(blob) < head:
        problem = "not a token cache file"
    else:
        (n,) = struct.unpack_from("<I", blob, len(TOKEN_CACHE_MAGIC))
        if hashlib.sha256(memoryview(blob)[head:]).digest() != blob[head - 32:head]:
            problem = "checksum mismatch"
        elif n != n_tokens:
            return None  # another vocabulary: not damaged, just not this model's (rewritten)
        elif len(blob) < head + 4 * n:
            problem = "shorter than its token count"
    if problem is None:
        lengths = np.frombuffer(blob, dtype="<u4", count=n, offset=head)
        if head + 4 * n + int(lengths.sum()) != len(blob):
            problem = "lengths do not match the file size"
    if problem is not None:
        _note(f"warning: {path}: damaged llguidance token cache ({problem}); rebuilding it.")
        path.unlink(missing_ok=True)
        return None
    ends = np.cumsum(lengths) + head + 4 * n
    starts = ends - lengths
    return [blob[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def _write_token_cache(path: Path, tokens: list[bytes]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = np.array([len(t) for t in tokens], dtype="<u4").tobytes() + b"".join(tokens)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix("tmp"))
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(TOKEN_CACHE_MAGIC + struct.pack("<I", len(tokens)) + hashlib.sha256(body).digest() + body)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        remove_leftovers(path.parent)
    except OSError:
        pass  # a read-only cache costs time, never correctness


class LarkGrammar(str):
    """Grammar text in llguidance's Lark dialect (grammars.build_llg_grammar); plain str is GBNF."""


def llg_grammar(grammar: str) -> str:
    """llguidance's grammar definition for Lark text (LarkGrammar) or GBNF (converted, e.g. a user's grammar)."""
    try:
        return _llg_grammar(str(grammar), isinstance(grammar, LarkGrammar))
    except ValueError as exc:
        raise GenerationError(f"llguidance could not read the grammar ({exc}).") from None


@functools.lru_cache(maxsize=64)
def _llg_grammar(text: str, lark: bool) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(text) if lark else llguidance.grammar_from("gbnf", text)


class LlguidanceMatcher:
    def __init__(self, tokenizer, grammar: str, n_vocab: int, probes: Sequence[int] = ()):
        """`probes`: tokens any free text allows (single letters); if one is allowed, few_allowed
        answers None without computing a mask (a string's first mask can take milliseconds)."""
        import llguidance

        self._m = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self._m.is_error():
            raise GenerationError(f"llguidance refused the grammar: {self._m.get_error()}")
        self.n_vocab = n_vocab
        self._eos = frozenset(tokenizer.eos_tokens)
        self._bits = np.zeros(((n_vocab + 31) // 32,), dtype=np.int32)
        self._probes = [int(t) for t in probes]
        self.full_masks = 0

    def allows(self, token: int) -> bool:
        if token in self._eos:  # validate_tokens does not count end tokens
            return self._m.is_accepting()
        return self._m.validate_tokens([token]) == 1

    def validate(self, tokens: Sequence[int]) -> int:
        return self._m.validate_tokens(list(tokens)) if tokens else 0

    def _allowed(self) -> np.ndarray:
        self.full_masks += 1
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.n_vocab].astype(bool)

    def best_of(self, logits: np.ndarray) -> int | None:
        allowed = self._allowed()
        if not allowed.any():
            return None
        return int(np.argmax(np.where(allowed, logits[: self.n_vocab], -np.inf)))

    def mask(self, logits: np.ndarray) -> np.ndarray:
        allowed = self._allowed()
        out = np.full_like(logits, -np.inf)
        out[: self.n_vocab][allowed] = logits[: self.n_vocab][allowed]
        return out

    def few_allowed(self, limit: int) -> np.ndarray | None:
        m = self._m
        if any(m.validate_tokens([t]) for t in self._probes):
            return None  # free text: thousands of tokens
        self.full_masks += 1
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        words = np.flatnonzero(self._bits)
        if not 0 < len(words) <= limit:  # every nonzero word holds at least one allowed token
            return None
        bits = np.unpackbits(self._bits[words].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        rows, cols = np.nonzero(bits)
        ids = words[rows] * 32 + cols
        ids = ids[ids < self.n_vocab]
        return ids if 0 < len(ids) <= limit else None

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise GenerationError(f"the grammar refused token {token}: {self._m.get_error()}")

    def forced_tokens(self) -> list[int]:
        return list(self._m.compute_ff_tokens())

    def is_finished(self) -> bool:
        return self._m.is_stopped()

    def rollback(self, n: int) -> None:
        if n and not self._m.rollback(n):
            raise GenerationError(f"the grammar could not roll back {n} tokens: {self._m.get_error()}")

    def close(self) -> None:
        self._m = None


# -- llama.cpp's GBNF sampler -------------------------------------------------------------

class LlamaGrammarMatcher:
    """llama.cpp's grammar sampler used as a yes/no check on chosen tokens.

    forced_text, when given, returns the text the grammar forces after the
    text so far ('' when none); its tokens are offered as forced tokens.
    """

    def __init__(self, vocab, grammar: str, n_vocab: int, *, tokenize: Callable[[str], list[int]] | None = None,
                 piece: Callable[[int], bytes] | None = None, forced_text: Callable[[str], str] | None = None):
        import llama_cpp

        self._llama = llama_cpp
        self._vocab = vocab
        self._grammar = grammar.encode("utf-8")
        self._smpl = self._new_sampler()
        self.n_vocab = n_vocab
        self._tokenize = tokenize
        self._piece = piece
        self._forced_text = forced_text
        self._accepted: list[int] = []
        self._text = b""
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self._full = None
        self._probe = None
        self.full_masks = 0

    def _new_sampler(self):
        smpl = self._llama.llama_sampler_init_grammar(self._vocab, self._grammar, b"root")
        if not smpl:
            raise GenerationError("llama.cpp rejected the grammar (see its log with --verbose); "
                                  "this is a bug in the grammar compiler.")
        return smpl

    def _allows_in(self, smpl, token: int) -> bool:
        self._one[0].id = token
        self._one[0].logit = 0.0
        self._one[0].p = 0.0
        self._one_array.size = 1
        self._one_array.selected = -1
        self._llama.llama_sampler_apply(smpl, ctypes.byref(self._one_array))
        return self._one[0].logit != -math.inf

    def allows(self, token: int) -> bool:
        return self._allows_in(self._smpl, token)

    def validate(self, tokens: Sequence[int]) -> int:
        if not tokens:
            return 0
        if len(tokens) == 1:
            return int(self.allows(tokens[0]))
        clone = self._llama.llama_sampler_clone(self._smpl)
        try:
            n = 0
            for token in tokens:
                if not self._allows_in(clone, token):
                    break
                self._llama.llama_sampler_accept(clone, token)
                n += 1
            return n
        finally:
            self._llama.llama_sampler_free(clone)

    def best_of(self, logits: np.ndarray, k: int = PROBE_CANDIDATES) -> int | None:
        llama_cpp = self._llama
        if self._probe is None:
            self._probe = (llama_cpp.llama_token_data * k)()
            self._probe_view = np.ctypeslib.as_array(self._probe)
            self._probe_array = llama_cpp.llama_token_data_array(data=self._probe, size=k, selected=-1, sorted=False)
        top = np.argpartition(logits, -k)[-k:]
        top = top[np.argsort(logits[top])[::-1]]
        view = self._probe_view
        view["id"][:k] = top
        view["logit"][:k] = logits[top]
        self._probe_array.size = k
        self._probe_array.selected = -1
        self._probe_array.sorted = False
        llama_cpp.llama_sampler_apply(self._smpl, ctypes.byref(self._probe_array))
        allowed = np.isfinite(view["logit"][:k])
        if not allowed.any():
            return None  # the caller masks the whole vocabulary
        i = int(np.argmax(np.where(allowed, view["logit"][:k], -np.inf)))
        return int(view["id"][i])

    def few_allowed(self, limit: int) -> np.ndarray | None:
        return None  # a mask here checks the whole vocabulary one token at a time: never cheap

    def mask(self, logits: np.ndarray) -> np.ndarray:
        llama_cpp = self._llama
        self.full_masks += 1
        if self._full is None:
            self._full = (llama_cpp.llama_token_data * self.n_vocab)()
            self._full_view = np.ctypeslib.as_array(self._full)
            self._full_array = llama_cpp.llama_token_data_array(data=self._full, size=self.n_vocab, selected=-1,
                                                                sorted=False)
            self._all_ids = np.arange(self.n_vocab, dtype=np.int32)
        view = self._full_view
        view["id"] = self._all_ids
        view["logit"] = logits[: self.n_vocab]
        self._full_array.size = self.n_vocab
        self._full_array.selected = -1
        self._full_array.sorted = False
        llama_cpp.llama_sampler_apply(self._smpl, ctypes.byref(self._full_array))
        out = np.full_like(logits, -np.inf)
        out[view["id"]] = view["logit"]
        return out

    def accept(self, token: int) -> None:
        self._llama.llama_sampler_accept(self._smpl, token)
        self._accepted.append(token)
        if self._piece is not None:
            self._text += self._piece(token)

    def forced_tokens(self) -> list[int]:
        if self._forced_text is None or self._tokenize is None:
            return []
        forced = self._forced_text(self._text.decode("utf-8", errors="ignore"))
        if not forced:
            return []
        tokens = self._tokenize(forced)
        return tokens[: self.validate(tokens)]

    def is_finished(self) -> bool:
        return False  # the GBNF sampler cannot tell cheaply; end-of-turn is sampled

    def rollback(self, n: int) -> None:
        if n <= 0:
            return
        keep = self._accepted[:-n] if n < len(self._accepted) else []
        self._llama.llama_sampler_free(self._smpl)
        self._smpl = self._new_sampler()
        self._accepted, self._text = [], b""
        for token in keep:
            self.accept(token)

    def close(self) -> None:
        if self._smpl:
            self._llama.llama_sampler_free(self._smpl)
            self._smpl = None

    def __del__(self):
        self.close()


def resolve_engine(name: str | None, warn: Callable[[str], None] | None = None) -> str:
    """The engine to use: `name`, with llguidance falling back to llama (one note) when not installed."""
    name = name or DEFAULT_ENGINE
    if name not in ENGINES:
        raise GenerationError(f"grammar engine must be one of {', '.join(ENGINES)}, got {name!r}.")
    if name == "llguidance" and not llguidance_available():
        why = llguidance_load_error()
        (warn or _note)(f"note: llguidance could not be loaded ({why}); using llama.cpp's grammar engine "
                        f"(pip install --force-reinstall llguidance)." if why not in (None, "not installed") else
                        "note: llguidance is not installed (pip install 'toolgrad-edge[llguidance]'); "
                        "using llama.cpp's grammar engine.")
        return "llama"
    return name


def _note(message: str) -> None:
    print(message, file=sys.stderr)
