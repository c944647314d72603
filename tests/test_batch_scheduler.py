"""The batch-filling scheduler (engines/scheduler.py), table-tested with scripted sequences; no model."""

import pytest

from toolgrad_edge.engines.scheduler import Submission, check_fits, plan_pass


def decode_step(seq, order, n=1, rows=None):
    """A decoding sequence's step: n tokens (a sampled one, forced or draft ones), logits where asked."""
    return Submission(seq=seq, tokens=list(range(100, 100 + n)), pos0=50, rows=rows or [n - 1], order=order)


def prompt(seq, order, n):
    """A new request's prompt: n tokens, logits after the last."""
    return Submission(seq=seq, tokens=list(range(n)), pos0=0, rows=[n - 1], order=order)


def shape(plan):
    """(seq, start, end, logits rows) per slice, in batch order."""
    return [(s.submission.seq, s.start, s.end, s.rows) for s in plan]


def run_passes(pending, n_batch, n_outputs, chunk, max_passes=50):
    """Plan passes until every submission is evaluated; each pass as shape(); submissions leave when done."""
    passes = []
    pending = list(pending)
    while pending and len(passes) < max_passes:
        plan = plan_pass(pending, n_batch, n_outputs, chunk)
        assert plan, "a pass with work pending must take something"
        passes.append(shape(plan))
        for s in plan:
            s.submission.done = s.end
        pending = [s for s in pending if s.done < len(s.tokens)]
    return passes


@pytest.mark.parametrize("pending, n_batch, n_outputs, chunk, expected", [
    # Eight decoding sequences, one sampled row each: one pass, eight rows.
    ([decode_step(i, i) for i in range(8)], 512, 32, 64,
     [[(i, 0, 1, (0,)) for i in range(8)]]),
    # Forced tokens ride along with logits only after the last one (tokens before a sequence's first logits
    # row are a head: they may go in any pass, so such a step follows the one-row steps in the batch).
    ([decode_step(0, 0, n=5), decode_step(1, 1)], 512, 32, 64,
     [[(1, 0, 1, (0,)), (0, 0, 5, (4,))]]),
    # A draft asks rows only where a choice is left; its tail starts at the first of them.
    ([Submission(seq=3, tokens=[1, 2, 3, 4, 5], pos0=9, rows=[1, 3, 4])], 512, 32, 64,
     [[(3, 0, 5, (1, 3, 4))]]),
    # A long prompt joins two decoders: it goes in chunks, and they decode in every pass.
    ([decode_step(0, 0), decode_step(1, 1), prompt(2, 2, 150)], 512, 32, 64,
     [[(0, 0, 1, (0,)), (1, 0, 1, (0,)), (2, 0, 64, ())]]),
    # Alone, a prompt fills whole batches: 600 tokens in a 256-token batch take three passes.
    ([prompt(0, 0, 600)], 256, 16, 64,
     [[(0, 0, 256, ())], [(0, 256, 512, ())], [(0, 512, 600, (599,))]]),
    # The logits-row budget: three sequences of 4 rows with room for 8 rows; the third waits a pass.
    ([decode_step(i, i, n=4, rows=[0, 1, 2, 3]) for i in range(3)], 512, 8, 64,
     [[(0, 0, 4, (0, 1, 2, 3)), (1, 0, 4, (0, 1, 2, 3))], [(2, 0, 4, (0, 1, 2, 3))]]),
    # The token budget: 3 steps of 5 tokens in a batch of 12, in arrival order; the third gets its first 2
    # tokens in, the rest with its logits row next pass.
    ([decode_step(2, 0, n=5), decode_step(0, 1, n=5), decode_step(1, 2, n=5)], 12, 32, 64,
     [[(2, 0, 5, (4,)), (0, 0, 5, (4,)), (1, 0, 2, ())], [(1, 2, 5, (4,))]]),
    # Steps whose every token is read (a draft checked at each position) go whole or wait.
    ([decode_step(i, i, n=5, rows=[0, 1, 2, 3, 4]) for i in range(3)], 12, 32, 64,
     [[(0, 0, 5, (0, 1, 2, 3, 4)), (1, 0, 5, (0, 1, 2, 3, 4))], [(2, 0, 5, (0, 1, 2, 3, 4))]]),
    # Two prompts share the leftover tokens in arrival order.
    ([prompt(5, 1, 100), prompt(4, 0, 100)], 128, 16, 64,
     [[(4, 0, 100, (99,)), (5, 0, 28, ())], [(5, 28, 100, (99,))]]),
])
def test_first_pass(pending, n_batch, n_outputs, chunk, expected):
    assert [shape(plan_pass(pending, n_batch, n_outputs, chunk))] == expected[:1]
    assert run_passes(pending, n_batch, n_outputs, chunk)[: len(expected)] == expected


def test_chunked_prefill_while_others_decode():
    """A 150-token prompt beside a decoder: chunks of 64, 64, then the last 22 with its logits row; each pass
    carries the decoder's row too (its next step is resubmitted after each pass, as the engine does)."""
    new = prompt(1, 1, 150)
    passes = []
    for order in range(2, 6):
        step = decode_step(0, order)
        plan = plan_pass([step, new] if new.done < 150 else [step], 512, 16, 64)
        passes.append(shape(plan))
        for s in plan:
            s.submission.done = s.end
    assert passes == [
        [(0, 0, 1, (0,)), (1, 0, 64, ())],
        [(0, 0, 1, (0,)), (1, 64, 128, ())],
        [(0, 0, 1, (0,)), (1, 128, 150, (149,))],
        [(0, 0, 1, (0,))],
    ]


def test_every_submission_ends_with_its_rows_in_one_pass():
    """Whatever the mix, each submission's logits rows all land in the pass that ends it, and every token of
    every submission is evaluated exactly once, in order."""
    pending = [prompt(0, 0, 700), decode_step(1, 1, n=9, rows=[3, 5, 8]), prompt(2, 2, 33), decode_step(3, 3)]
    seen = {s.seq: [] for s in pending}
    for p in run_passes(pending, 128, 4, 32):
        assert sum(end - start for _, start, end, _ in p) <= 128
        assert sum(len(rows) for *_, rows in p) <= 4
        for seq, start, end, rows in p:
            seen[seq].append((start, end))
            sub = next(s for s in pending if s.seq == seq)
            if rows:
                assert end == len(sub.tokens) and rows == tuple(sub.rows)
    for s in pending:
        spans = seen[s.seq]
        assert spans[0][0] == 0 and spans[-1][1] == len(s.tokens)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(tokens=[1], pos0=0, rows=[]), "increasing"),
    (dict(tokens=[1, 2], pos0=0, rows=[1, 0]), "increasing"),
    (dict(tokens=[1, 2], pos0=0, rows=[2]), "increasing"),
    (dict(tokens=[], pos0=0, rows=[0]), "at least one token"),
])
def test_bad_submissions(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Submission(seq=0, **kwargs)


def test_a_tail_too_big_for_one_pass_is_refused_at_submission():
    with pytest.raises(ValueError, match="exceed one batch of 8"):
        check_fits(Submission(seq=0, tokens=list(range(10)), pos0=0, rows=[0, 9]), 8, 16)
    with pytest.raises(ValueError, match="at most 2"):
        check_fits(Submission(seq=0, tokens=[1, 2, 3], pos0=0, rows=[0, 1, 2]), 8, 2)
    check_fits(Submission(seq=0, tokens=list(range(600)), pos0=0, rows=[599]), 8, 2)  # a long head is fine
