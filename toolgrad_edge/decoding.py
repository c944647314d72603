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

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from .errors import GenerationError

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
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or not -(2**63) <= self.seed < 2**64):
            raise GenerationError(f"seed must be an integer that fits in 64 bits, got {self.seed!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class TokenChooser:
    """Greedy or seeded temperature/top-k/top-p choice over a logits vector."""

    def __init__(self, params: SamplingParams):
        self.params = params
        # Any 64-bit seed, negative ones too (OpenAI clients send -1): its two's-complement bits.
        seed = None if params.seed is None else int(params.seed) & (2**64 - 1)
        self.rng = np.random.default_rng(seed)

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


def choose_constrained(chooser: TokenChooser, logits: np.ndarray, gate) -> int:
    """Pick a token; consult the full grammar mask only if the grammar rejects it.

    `gate` is a grammar_engines.GrammarMatcher (or None for free decoding).
    """
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


# -- several tokens per forward pass ------------------------------------------------------
#
# One step of the decode loop: choose the next token from the logits in hand,
# append whatever the grammar forces after it (jump-forward), append a draft
# the grammar accepts (prompt lookup or a draft model), run all of them in one
# batch with logits only where a draft token must be checked, then keep the
# draft tokens the target itself chooses, one position at a time, with the
# same choice function as one-token decoding. The first refused position's
# choice is emitted as well; the refused tail leaves the KV cache by rewind.
# Greedy: every emitted token is the allowed argmax at its position.
# Sampling: every emitted token is drawn from the target's constrained
# distribution at its position (exact-match verification).

MAX_DRAFT = 8
# At most this many allowed tokens: the pass skips the output layer (their logits come from the hidden state).
NARROW_MAX = 1024


class Session(Protocol):
    """What StepDecoder needs from engines (see engines/base.py)."""

    def decode(self, tokens: Sequence[int], n_logits: int = 1) -> np.ndarray: ...

    def decode_at(self, tokens: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        """Append tokens; the logits after tokens[i] for each i in rows (increasing)."""

    def decode_narrow(self, tokens: Sequence[int], ids: np.ndarray) -> np.ndarray:
        """Like decode(tokens, 1)[0][ids] (only used with StepDecoder(narrow=True))."""

    def rewind(self, n_keep: int) -> None: ...

    def is_eog(self, token: int) -> bool: ...


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k tokens likely to follow `context` (the whole sequence so far)."""


class PromptLookupDrafter:
    """Drafts by n-gram match: the tokens that followed the latest earlier occurrence of the context's tail.

    Tool calls copy the user's words ("Paris"), tool and parameter names and
    enum values from the prompt, so the tail of the output often occurs there.
    """

    # A refused draft token still costs a logits row and a token in the batch
    # (about a third of a one-token pass on the 270M), so drafts need good odds.
    # `start`: only tokens from this position on are copied; the runtime starts
    # after the tool definitions, whose JSON matched the output's own structure
    # and drafted what the model did not write. Matches of two tokens still did
    # in the JSON syntax (`": "` recurs in every call): 11 % of those drafts were
    # accepted on the bench, against 100 % for three-token matches (repeated
    # calls in either syntax), so matches start at three tokens.
    def __init__(self, ngram_max: int = 3, ngram_min: int = 3, start: int = 0):
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min
        self._indexed = start  # n-grams ending before this position are in the index
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> position after its latest occurrence

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """The context only grows between calls (one request's tokens)."""
        if k <= 0 or not context:
            return []
        # Index every n-gram whose next token is known, i.e. ending before the last position.
        for end in range(max(self._indexed, 1), len(context)):
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                self._index[tuple(context[end - n:end])] = end
        self._indexed = max(self._indexed, len(context))
        for n in range(min(self.ngram_max, len(context)), self.ngram_min - 1, -1):
            pos = self._index.get(tuple(context[-n:]))
            if pos is not None:
                return list(context[pos:pos + k])
        return []


@dataclass
class DecodeStats:
    forward_passes: int = 0   # batches run after the prompt
    forced_tokens: int = 0    # jump-forward tokens (no choice involved)
    drafted_tokens: int = 0   # draft tokens sent for verification
    accepted_tokens: int = 0  # draft tokens the target chose too
    full_masks: int = 0       # whole-vocabulary grammar masks
    narrow_passes: int = 0    # passes that skipped the output layer (few tokens allowed)

    def to_dict(self, completion_tokens: int) -> dict:
        d = {k: getattr(self, k) for k in ("forward_passes", "forced_tokens", "drafted_tokens",
                                            "accepted_tokens", "full_masks", "narrow_passes")}
        d["tokens_per_forward"] = (completion_tokens / self.forward_passes) if self.forward_passes else None
        d["draft_acceptance"] = (self.accepted_tokens / self.drafted_tokens) if self.drafted_tokens else None
        return d


@dataclass
class StepDecoder:
    """The decode loop's state for one request: the logits in hand and the tokens in the KV cache.

    `step(budget)` emits at most `budget` tokens and returns them; `done`
    turns True at end of generation (the end token itself is not emitted).
    `kv_tokens` is what the session's cache must hold for the next step
    (callers restore it if someone else used the session in between).
    """

    session: Session
    chooser: TokenChooser
    gate: object | None          # a grammar_engines.GrammarMatcher
    logits: np.ndarray           # predicts the token after kv_tokens
    kv_tokens: list[int]
    jump_forward: bool = True
    drafter: Drafter | None = None
    narrow: bool = False         # passes without the output layer where few tokens are allowed (session.decode_narrow)
    max_draft: int = MAX_DRAFT
    stats: DecodeStats = field(default_factory=DecodeStats)
    done: bool = False
    _pending: list[int] = field(default_factory=list)  # emitted, accepted by the grammar, not yet in the cache

    def step(self, budget: int) -> list[int]:
        if self.done or budget <= 0:
            return []
        gate = self.gate
        emitted: list[int] = []
        if not self._pending:
            # Forced tokens are taken wherever the grammar forces them, whether the
            # previous token was chosen or came from a draft, so speculation never
            # changes which positions involve a choice (or a random draw).
            forced = self._forced(budget)
            if forced:
                self._pending = forced
                emitted += forced
            else:
                token = choose_constrained(self.chooser, self.logits, gate)
                if self.session.is_eog(token):
                    self.done = True
                    return []
                if gate is not None:
                    gate.accept(token)
                self._pending = [token]
                emitted.append(token)
        room = budget - len(emitted)
        if room > 0:
            forced = self._forced(room)
            self._pending += forced
            emitted += forced
            room -= len(forced)
        if gate is not None and gate.is_finished():
            # Only the end token can follow: nothing left to compute.
            self.done = True
            return emitted
        if room <= 0:
            return emitted  # the budget ends here; no forward pass for tokens nobody will see
        draft = self._draft(room)
        if not draft:
            self.logits = self._decode_one(self._pending)
            self.kv_tokens += self._pending
            self._pending = []
            return emitted
        forced_at = self._forced_in(draft)
        need = [j for j, f in enumerate(forced_at) if f is None] + [len(draft)]
        base = len(self._pending) - 1  # the batch index whose logits predict draft[0]
        rows = dict(zip(need, self.session.decode_at(self._pending + draft, [base + j for j in need])))
        self.stats.forward_passes += 1
        self.kv_tokens += self._pending
        self._pending = []
        self.stats.drafted_tokens += len(draft)
        for j, proposed in enumerate(draft):
            forced = forced_at[j] is not None
            token = forced_at[j] if forced else choose_constrained(self.chooser, rows[j], gate)
            if token == proposed:
                if gate is not None:
                    gate.accept(token)
                self.kv_tokens.append(token)
                emitted.append(token)
                self.stats.accepted_tokens += 1
                continue
            self.session.rewind(len(self.kv_tokens))  # drop the refused tail draft[j:]
            room = budget - len(emitted)
            if forced:
                self._pending = self._forced(room)
                emitted += self._pending
            elif self.session.is_eog(token):
                self.done = True
            else:
                if gate is not None:
                    gate.accept(token)
                self._pending = [token]
                emitted.append(token)
            return emitted
        self.logits = rows[len(draft)]
        return emitted

    def _forced_in(self, draft: list[int]) -> list[int | None]:
        """For each draft position, the token the grammar forces there (None: a choice).

        Only choices need logits (a row predicting draft[j]); verification takes
        forced positions from the grammar, as one-token decoding does. Every
        position up to the first refused one is reached in the state walked here.
        """
        gate = self.gate
        if gate is None or not self.jump_forward:
            return [None] * len(draft)
        forced_at: list[int | None] = []
        for token in draft:
            forced = self._forced_here()
            forced_at.append(forced[0] if forced else None)
            gate.accept(token)  # the draft passed validate(): safe to accept, rolled back below
        gate.rollback(len(draft))
        return forced_at

    def _decode_one(self, tokens: list[int]) -> np.ndarray:
        """One pass for the logits after `tokens`; without the output layer where the grammar allows few tokens.

        Greedy only: the narrow logits hold the allowed tokens' values (the rest
        -inf), so the allowed argmax is the one the full logits would give, up
        to the head's rounding (about 1e-5). Sampling keeps full logits, so its
        draws stay those of one-token decoding.
        """
        self.stats.forward_passes += 1
        if self.narrow and self.gate is not None and self.chooser.params.greedy:
            ids = self.gate.few_allowed(NARROW_MAX)
            if ids is not None:
                values = self.session.decode_narrow(tokens, ids)
                logits = np.full_like(self.logits, -np.inf)
                logits[ids] = values
                self.stats.narrow_passes += 1
                return logits
        return self.session.decode(tokens, 1)[0]

    def _forced_here(self) -> list[int]:
        """The tokens the grammar forces at this point (jump-forward only), up to an end token."""
        if self.gate is None or not self.jump_forward:
            return []
        forced = []
        for token in self.gate.forced_tokens():
            if self.session.is_eog(token):
                break
            forced.append(token)
        return forced

    def _forced(self, room: int) -> list[int]:
        """Accept and return the forced tokens from here (at most `room`)."""
        forced: list[int] = []
        while len(forced) < room:
            more = self._forced_here()[: room - len(forced)]
            if not more:
                break
            for token in more:
                self.gate.accept(token)
            forced += more
        self.stats.forced_tokens += len(forced)
        return forced

    def _draft(self, room: int) -> list[int]:
        if self.drafter is None:
            return []
        draft = self.drafter.propose(self.kv_tokens + self._pending, min(self.max_draft, room))
        for i, token in enumerate(draft):
            if self.session.is_eog(token):
                draft = draft[:i]
                break
        if self.gate is not None and draft:
            draft = draft[: self.gate.validate(draft)]
        return draft
