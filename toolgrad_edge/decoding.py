"""Token choice for grammar-constrained decoding at free-decoding speed.

llama-cpp-python's grammar path masks the whole vocabulary (262k tokens for
Gemma 3) at every step. Here the token is chosen first from the raw logits,
then only that one token is checked against the grammar; the full mask is
computed only when the grammar rejects it, as llama.cpp's own server does.

Sampling stays exact: drawing from p and, on rejection, redrawing from p
restricted to the allowed set gives every allowed token p(t) / P(allowed),
which is the constrained distribution.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import llama_cpp
import numpy as np

from .errors import GenerationError

# On a rejected greedy pick, the best candidates are checked in one small call
# before falling back to masking the whole vocabulary: if any of them is
# allowed, the best allowed one is the argmax of the fully masked logits.
PROBE_CANDIDATES = 64
# top_p is computed over this many best candidates (a full sort of 262k logits
# per token would cost more than the forward pass of a small model).
TOP_P_CANDIDATES = 1024


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature!r}.")
        if not (0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class TokenChooser:
    """Greedy or seeded temperature/top-k/top-p choice over a logits vector."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def choose(self, logits: np.ndarray) -> int:
        if self.params.greedy:
            return int(np.argmax(logits))
        p = self.params
        scaled = logits.astype(np.float64) / p.temperature
        k = p.top_k if p.top_k > 0 else (TOP_P_CANDIDATES if p.top_p < 1 else 0)
        if k:
            k = min(k, scaled.size)
            idx = np.argpartition(scaled, -k)[-k:] if k < scaled.size else np.arange(scaled.size)
            idx = idx[np.argsort(scaled[idx])[::-1]]
            cand = scaled[idx]
        else:
            idx = None
            cand = scaled
        finite = np.isfinite(cand)
        if not finite.any():
            raise GenerationError("no token is allowed at this step (all logits are -inf).")
        cand = np.where(finite, cand, -np.inf)
        probs = np.exp(cand - cand[finite].max())
        if p.top_p < 1 and idx is not None:
            order_probs = probs / probs.sum()
            keep = int(np.searchsorted(np.cumsum(order_probs), p.top_p) + 1)
            probs = probs[:keep]
            idx = idx[:keep]
        cdf = np.cumsum(probs)
        pick = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        pick = min(pick, len(cdf) - 1)
        return int(idx[pick]) if idx is not None else pick


class GrammarGate:
    """A llama.cpp grammar sampler used as a yes/no check on chosen tokens."""

    def __init__(self, vocab, grammar: str, n_vocab: int):
        self._smpl = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not self._smpl:
            raise GenerationError("llama.cpp rejected the grammar (see its log above); this is a bug in the grammar compiler.")
        self.n_vocab = n_vocab
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self._full = None
        self._probe = None
        self.full_masks = 0  # how often the slow path ran (reported by benchmarks)

    def allows(self, token: int) -> bool:
        self._one[0].id = token
        self._one[0].logit = 0.0
        self._one[0].p = 0.0
        self._one_array.size = 1
        self._one_array.selected = -1
        llama_cpp.llama_sampler_apply(self._smpl, ctypes.byref(self._one_array))
        return self._one[0].logit != -math.inf

    def best_of(self, logits: np.ndarray, k: int = PROBE_CANDIDATES) -> int | None:
        """The highest-logit allowed token among the k best, or None if none is allowed."""
        if self._probe is None or len(self._probe) < k:
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
            return None
        i = int(np.argmax(np.where(allowed, view["logit"][:k], -np.inf)))
        return int(view["id"][i])

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """Return logits with every token the grammar rejects set to -inf."""
        self.full_masks += 1
        if self._full is None:
            self._full = (llama_cpp.llama_token_data * self.n_vocab)()
            self._full_view = np.ctypeslib.as_array(self._full)
            self._full_array = llama_cpp.llama_token_data_array(data=self._full, size=self.n_vocab, selected=-1, sorted=False)
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
        llama_cpp.llama_sampler_accept(self._smpl, token)

    def close(self) -> None:
        if self._smpl:
            llama_cpp.llama_sampler_free(self._smpl)
            self._smpl = None

    def __del__(self):
        self.close()


def choose_constrained(chooser: TokenChooser, logits: np.ndarray, gate: GrammarGate | None) -> int:
    """Pick a token; consult the full grammar mask only if the grammar rejects it."""
    token = chooser.choose(logits)
    if gate is None or gate.allows(token):
        return token
    if chooser.params.greedy:
        best = gate.best_of(logits)
        if best is not None:
            return best
    masked = gate.mask(logits)
    if not np.isfinite(masked).any():
        raise GenerationError("the grammar allows no token here; the grammar is unsatisfiable at this point.")
    return chooser.choose(masked)
