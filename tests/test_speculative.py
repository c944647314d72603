"""Multi-token steps against one-token decoding, with a deterministic stand-in for the model.

The stand-in's logits are a pure function of the token prefix, so a batched
pass and one-token passes agree bit for bit: any difference between the
speculative and the stepwise output is a bug in the acceptance logic, not
floating-point noise.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from toolgrad_edge.decoding import PromptLookupDrafter, SamplingParams, StepDecoder, TokenChooser
from toolgrad_edge.errors import GenerationError

V = 40
EOS = 0


def model_logits(prefix) -> np.ndarray:
    """A small 'language': mostly follows t -> (3t + 1) % V, with noise that depends on the whole prefix."""
    rng = np.random.default_rng(zlib.crc32(np.asarray(prefix, dtype=np.int32).tobytes()))
    logits = rng.normal(size=V).astype(np.float32)
    logits[(3 * prefix[-1] + 1) % V] += 2.5
    logits[EOS] -= 2.0
    return logits


class FakeSession:
    """A KV cache of tokens with model_logits; fails on demand like a real decode would."""

    def __init__(self):
        self.tokens: list[int] = []
        self.passes = 0
        self.fail_at_pass = None

    def decode(self, tokens, n_logits=1):
        start = len(self.tokens)
        self.passes += 1
        self.tokens += list(tokens)
        if self.fail_at_pass == self.passes:
            del self.tokens[start:]  # what LlamaSession.decode does on failure
            raise GenerationError("decode failed (test)")
        n = len(self.tokens)
        return np.stack([model_logits(self.tokens[:n - n_logits + 1 + i]) for i in range(n_logits)])

    def decode_at(self, tokens, rows):
        """LlamaSession.decode_at: rows only where asked (the others are never looked at)."""
        assert list(rows) == sorted(set(rows))
        out = self.decode(tokens, len(tokens))
        self.rows_asked = getattr(self, "rows_asked", 0) + len(rows)
        self.calls_at = getattr(self, "calls_at", 0) + 1
        return out[list(rows)]

    def rewind(self, n_keep):
        del self.tokens[n_keep:]

    def is_eog(self, token):
        return token == EOS


class ToyGrammar:
    """Bans multiples of 3 (bar EOS); after 5 forces 7 then 8; EOS only after 6 tokens; done after 30."""

    def __init__(self):
        self.accepted: list[int] = []
        self.full_masks = 0

    def _allowed_after(self, history, token):
        if len(history) >= 30:
            return token == EOS
        if history and history[-1] == 5:
            return token == 7
        if len(history) >= 2 and history[-2:] == [5, 7]:
            return token == 8
        if token == EOS:
            return len(history) >= 6
        return token % 3 != 0

    def allows(self, token):
        return self._allowed_after(self.accepted, token)

    def validate(self, tokens):
        history = list(self.accepted)
        for i, token in enumerate(tokens):
            if token == EOS or not self._allowed_after(history, token):
                return i
            history.append(token)
        return len(tokens)

    def best_of(self, logits):
        return None

    def mask(self, logits):
        self.full_masks += 1
        out = np.full_like(logits, -np.inf)
        for t in range(V):
            if self.allows(t):
                out[t] = logits[t]
        return out

    def accept(self, token):
        assert self.allows(token), (self.accepted, token)
        self.accepted.append(token)

    def forced_tokens(self):
        forced = []
        if self.accepted and self.accepted[-1] == 5:
            forced = [7, 8]
        elif len(self.accepted) >= 2 and self.accepted[-2:] == [5, 7]:
            forced = [8]
        return forced[: self.validate(forced)]

    def is_finished(self):
        return len(self.accepted) >= 30

    def rollback(self, n):
        del self.accepted[len(self.accepted) - n:]


PROMPT = [1, 4, 13, 5, 7, 8, 25, 2, 7, 22, 28, 4, 13, 1, 4]


class NarrowSession(FakeSession):
    """decode_narrow as LlamaSession's contract says: decode(tokens, 1)[0][ids], counted."""

    def __init__(self):
        super().__init__()
        self.narrow_passes = 0

    def decode_narrow(self, tokens, ids):
        self.narrow_passes += 1
        return self.decode(tokens, 1)[0][np.asarray(ids)]


class FewAllowedGrammar(ToyGrammar):
    """ToyGrammar whose allowed set counts as few after an odd token (free text after an even one)."""

    def few_allowed(self, limit):
        if self.accepted and self.accepted[-1] % 2 == 0:
            return None
        ids = np.array([t for t in range(V) if self.allows(t)])
        return ids if 0 < len(ids) <= limit else None


def run(params, grammar=True, jump_forward=False, drafter=None, max_tokens=40, session=None, narrow=False):
    session = session or FakeSession()
    logits = session.decode(PROMPT, 1)[0]
    session.passes = 0
    gate = (FewAllowedGrammar() if narrow else ToyGrammar()) if grammar else None
    decoder = StepDecoder(session, TokenChooser(params), gate, logits, list(PROMPT),
                          jump_forward=jump_forward, drafter=drafter, narrow=narrow)
    out = []
    while len(out) < max_tokens and not decoder.done:
        out += decoder.step(max_tokens - len(out))
    return out, decoder, session


def test_greedy_speculation_equals_stepwise():
    stepwise, _, s0 = run(SamplingParams())
    spec, dec, s1 = run(SamplingParams(), jump_forward=True, drafter=PromptLookupDrafter(ngram_min=1))
    assert spec == stepwise
    assert dec.stats.accepted_tokens > 0 and dec.stats.forced_tokens > 0
    assert s1.passes < s0.passes


def test_draft_positions_the_grammar_forces_get_no_logits_row():
    stepwise, _, _ = run(SamplingParams())
    spec, dec, session = run(SamplingParams(), jump_forward=True, drafter=PromptLookupDrafter(ngram_min=1))
    assert spec == stepwise
    # Without skipping, each draft pass asks a row per draft token and one after the draft.
    assert session.rows_asked < dec.stats.drafted_tokens + session.calls_at


def test_narrow_passes_choose_what_full_logits_choose():
    stepwise, _, _ = run(SamplingParams())
    spec, dec, session = run(SamplingParams(), jump_forward=True, drafter=PromptLookupDrafter(ngram_min=1),
                             session=NarrowSession(), narrow=True)
    assert spec == stepwise
    assert 0 < session.narrow_passes == dec.stats.narrow_passes < dec.stats.forward_passes
    assert session.tokens == dec.kv_tokens


def test_sampling_keeps_full_logits():
    """Sampled draws come from the full logits, as in one-token decoding, so seeds give the same output."""
    for seed in range(10):
        params = SamplingParams(temperature=1.0, seed=seed)
        spec, dec, session = run(params, jump_forward=True, session=NarrowSession(), narrow=True)
        assert session.narrow_passes == 0
        assert spec == run(params, jump_forward=True)[0]


@pytest.mark.parametrize("grammar", [True, False])
def test_sampled_speculation_equals_stepwise_for_many_seeds(grammar):
    accepted = drafted = 0
    for seed in range(60):
        params = SamplingParams(temperature=1.0, seed=seed)
        # Jump-forward tokens take no random draw, so both sides use it or neither.
        for jump in (False, True):
            stepwise, _, _ = run(params, grammar=grammar, jump_forward=jump)
            spec, dec, _ = run(params, grammar=grammar, jump_forward=jump, drafter=PromptLookupDrafter(ngram_min=1))
            assert spec == stepwise, (seed, jump)
            accepted += dec.stats.accepted_tokens
            drafted += dec.stats.drafted_tokens
    assert 0 < accepted < drafted  # both acceptance and rejection were exercised


def test_top_k_top_p_sampling_is_exact_too():
    for seed in range(20):
        params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=seed)
        assert run(params, drafter=PromptLookupDrafter(ngram_min=1))[0] == run(params)[0]


def test_output_obeys_the_grammar_and_budget():
    for seed in range(20):
        out, dec, _ = run(SamplingParams(temperature=1.0, seed=seed), jump_forward=True,
                          drafter=PromptLookupDrafter(ngram_min=1), max_tokens=17)
        assert len(out) <= 17
        check = ToyGrammar()
        for token in out:
            check.accept(token)


def test_cache_holds_exactly_the_decoded_tokens_after_rejections():
    out, dec, session = run(SamplingParams(temperature=1.0, seed=3), drafter=PromptLookupDrafter(ngram_min=1))
    assert dec.stats.drafted_tokens > dec.stats.accepted_tokens  # some drafts were refused
    assert session.tokens == dec.kv_tokens
    # The logits in hand are those a fresh evaluation of the same tokens gives.
    if not dec.done:
        assert np.array_equal(dec.logits, model_logits(dec.kv_tokens))


def test_a_failed_decode_mid_draft_leaves_the_cache_consistent():
    session = FakeSession()
    session.fail_at_pass = 4
    with pytest.raises(GenerationError):
        run(SamplingParams(), drafter=PromptLookupDrafter(ngram_min=1), session=session)
    assert session.tokens[: len(PROMPT)] == PROMPT
    # Whatever was decoded before the failure is a prefix of the uninterrupted run.
    full, _, _ = run(SamplingParams())
    assert (PROMPT + full)[: len(session.tokens)] == session.tokens


@pytest.mark.parametrize("draft", [False, True])
def test_stop_after_the_grammar_finishes_without_another_pass(draft):
    drafter = PromptLookupDrafter(ngram_min=1) if draft else None
    out, dec, session = run(SamplingParams(), max_tokens=60, jump_forward=True, drafter=drafter)
    assert len(out) == 30 and dec.done  # ToyGrammar is finished after 30 tokens, well within the budget
    assert session.tokens == dec.kv_tokens and session.passes == dec.stats.forward_passes
    if not draft:  # one token a pass: the last one is never decoded, nothing would read its logits
        assert session.tokens == PROMPT + out[:-1]
    assert dec.step(10) == [] and session.passes == dec.stats.forward_passes


def test_prompt_lookup_ignores_what_comes_before_its_start():
    """The runtime starts the index after the tool definitions: their JSON text matched
    the output's structure and drafted what the model did not write (JSON syntax: 8 % accepted)."""
    context = [9, 1, 2, 3, 4, 5, 9, 1, 2, 7, 8, 1, 2]
    assert PromptLookupDrafter(ngram_min=2, start=9).propose(context, 3) == [7, 8, 1]  # copies from 9 on
    assert PromptLookupDrafter(ngram_min=2, start=10).propose(context, 3) == []  # "1 2" -> 7 is before 10
    later = context[:10] + [1, 2, 5, 1, 2]
    assert PromptLookupDrafter(ngram_min=2, start=10).propose(later, 2) == [5, 1]


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    drafter = PromptLookupDrafter(ngram_min=1)
    context = [9, 1, 2, 3, 4, 5, 9, 1, 2, 7, 8, 1, 2]
    assert drafter.propose(context, 3) == [7, 8, 1]  # latest "1 2" was followed by 7 8
    assert drafter.propose(context + [3], 2) == [4, 5]  # "1 2 3" only at the start
    assert drafter.propose([5, 6], 4) == []
    # By default a match needs three tokens: shorter ones are right too rarely to pay for their rows.
    assert PromptLookupDrafter().propose([1, 2, 3, 4, 1, 2], 2) == []
    assert PromptLookupDrafter().propose([1, 2, 3, 4, 1, 2, 3], 2) == [4, 1]


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**64 - 1, 0])
def test_any_64_bit_seed(seed):
    logits = model_logits([1])
    a, b = (TokenChooser(SamplingParams(temperature=1.0, seed=seed)) for _ in range(2))
    picks = [a.choose(logits) for _ in range(8)]
    assert all(0 <= t < V for t in picks) and picks == [b.choose(logits) for _ in range(8)]


def test_negative_seed_is_its_twos_complement():
    a = TokenChooser(SamplingParams(temperature=1.0, seed=-1))
    b = TokenChooser(SamplingParams(temperature=1.0, seed=2**64 - 1))
    logits = model_logits([2])
    assert [a.choose(logits) for _ in range(10)] == [b.choose(logits) for _ in range(10)]


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5, "7", True])
def test_seed_out_of_range_names_the_field(seed):
    with pytest.raises(GenerationError, match="seed"):
        SamplingParams(seed=seed)


def test_llguidance_token_cache_round_trip_and_rejects_a_bad_file(tmp_path):
    from toolgrad_edge.grammar_engines import _read_token_cache, _write_token_cache

    tokens = [b"", b"a", b"\xff<start_of_turn>", "é".encode(), b" " * 31]
    path = tmp_path / "vocab.tokens"
    _write_token_cache(path, tokens)
    assert _read_token_cache(path, len(tokens)) == tokens
    assert _read_token_cache(path, len(tokens) + 1) is None  # another vocabulary size
    path.write_bytes(path.read_bytes()[:-1])  # truncated
    assert _read_token_cache(path, len(tokens)) is None
    assert _read_token_cache(tmp_path / "missing", 3) is None
