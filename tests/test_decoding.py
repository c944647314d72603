"""Token choice: greedy, seeded sampling, and the sample-then-check grammar gate (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from toolgrad_edge.decoding import SamplingParams, TokenChooser, choose_constrained
from toolgrad_edge.errors import GenerationError


class FakeGate:
    """Allows a fixed set of token ids; counts how often the slow path runs."""

    def __init__(self, allowed):
        self.allowed = set(allowed)
        self.full_masks = 0
        self.probes = 0

    def allows(self, token):
        return token in self.allowed

    def best_of(self, logits, k=64):
        self.probes += 1
        top = np.argsort(logits)[::-1][:k]
        for t in top:
            if t in self.allowed:
                return int(t)
        return None

    def mask(self, logits):
        self.full_masks += 1
        out = np.full_like(logits, -np.inf)
        idx = list(self.allowed)
        out[idx] = logits[idx]
        return out


def logits_for(n=1000, seed=0):
    return np.random.default_rng(seed).normal(size=n).astype(np.float32)


def test_greedy_is_argmax():
    logits = logits_for()
    assert TokenChooser(SamplingParams()).choose(logits) == int(np.argmax(logits))


def test_seeded_sampling_is_reproducible():
    logits = logits_for()
    a = [TokenChooser(SamplingParams(temperature=1.0, seed=3)).choose(logits) for _ in range(5)]
    b = [TokenChooser(SamplingParams(temperature=1.0, seed=3)).choose(logits) for _ in range(5)]
    assert a == b


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = logits_for()
    best = int(np.argmax(logits))
    assert TokenChooser(SamplingParams(temperature=1.0, top_k=1, seed=1)).choose(logits) == best
    chooser = TokenChooser(SamplingParams(temperature=1.0, top_p=1e-6, seed=1))
    assert {chooser.choose(logits) for _ in range(20)} == {best}


def test_allowed_pick_takes_the_fast_path():
    logits = logits_for()
    gate = FakeGate({int(np.argmax(logits))})
    assert choose_constrained(TokenChooser(SamplingParams()), logits, gate) == int(np.argmax(logits))
    assert gate.full_masks == 0 and gate.probes == 0


def test_rejected_greedy_pick_is_the_masked_argmax():
    logits = logits_for()
    order = np.argsort(logits)[::-1]
    gate = FakeGate({int(order[5]), int(order[500])})
    assert choose_constrained(TokenChooser(SamplingParams()), logits, gate) == int(order[5])
    assert gate.full_masks == 0  # found among the best candidates
    far = FakeGate({int(order[700])})
    assert choose_constrained(TokenChooser(SamplingParams()), logits, far) == int(order[700])
    assert far.full_masks == 1


def test_constrained_sampling_follows_the_renormalised_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float64)).astype(np.float32)
    gate = FakeGate({1, 2})  # p(1 | allowed) = 0.3 / 0.45 = 2/3
    chooser = TokenChooser(SamplingParams(temperature=1.0, seed=0))
    picks = [choose_constrained(chooser, logits, gate) for _ in range(3000)]
    assert set(picks) == {1, 2}
    assert abs(picks.count(1) / len(picks) - 2 / 3) < 0.03


def test_grammar_that_allows_nothing():
    with pytest.raises(GenerationError, match="allows no token"):
        choose_constrained(TokenChooser(SamplingParams()), logits_for(), FakeGate(set()))


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(temperature=float("nan"))])
def test_bad_sampling_params(kwargs):
    with pytest.raises(GenerationError):
        SamplingParams(**kwargs)
