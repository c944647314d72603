"""Which rows go into the next forward pass, when several sequences share one llama.cpp context.

Pure: plain data in, a plan out, no model. The batched engine (engines/batched.py)
collects what each active sequence asks to have evaluated (a ``Submission``:
tokens at positions of one sequence, logits at some of them) and asks
``plan_pass`` how to fill one ``llama_decode`` batch.

A submission has two parts. Its *head*, the tokens before the first logits row,
may be split over several passes (chunked prefill: a long prompt goes in pieces
of ``prefill_chunk`` tokens while other sequences keep decoding). Its *tail*,
from the first logits row to the end, goes into one pass whole, because the
logits of a pass are only readable until the next one. So a one-token decode
step is all tail; a prompt is a long head and a one-token tail; a step with
forced and draft tokens asks logits only where a choice is left, and its tail
starts there.

Filling order: submissions that are only a tail (decoding sequences: one
sampled row, forced or draft rows) first, in arrival order, so a sequence
that decodes is never held up by a prompt; then heads, in arrival order, in
chunks. Everything must fit the batch's token budget (``n_batch``) and its
logits-row budget (``n_outputs``, what llama.cpp reserved); what does not fit
waits for the next pass, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Submission:
    """Tokens one sequence wants evaluated: positions ``pos0``, ``pos0 + 1``, ...; logits after ``rows``."""

    seq: int
    tokens: list[int]
    pos0: int
    rows: list[int]  # increasing indices into tokens whose logits are read (at least one: the last, for a prompt)
    done: int = 0  # tokens already evaluated in earlier passes (a chunked head)
    order: int = 0  # arrival order (smaller first)
    result: object = field(default=None, repr=False)  # filled by the engine once the tail is evaluated

    def __post_init__(self):
        if not self.tokens:
            raise ValueError("a submission needs at least one token")
        if not self.rows or self.rows != sorted(set(self.rows)) or self.rows[0] < 0 \
                or self.rows[-1] >= len(self.tokens):
            raise ValueError(f"logits rows must be increasing indices into {len(self.tokens)} tokens, "
                             f"got {self.rows}")

    @property
    def tail_start(self) -> int:
        return self.rows[0]

    @property
    def head_left(self) -> int:
        """Head tokens not yet evaluated."""
        return max(0, self.tail_start - self.done)

    @property
    def tail_len(self) -> int:
        return len(self.tokens) - self.tail_start


@dataclass(frozen=True)
class Slice:
    """A part of one submission in a pass: tokens[start:end], with logits at ``rows`` (indices into tokens)."""

    submission: Submission
    start: int
    end: int
    rows: tuple[int, ...]

    @property
    def finishes(self) -> bool:
        return self.end == len(self.submission.tokens)


def check_fits(submission: Submission, n_batch: int, n_outputs: int) -> None:
    """A tail must fit one pass; say so at submission rather than never scheduling it."""
    if submission.tail_len > n_batch:
        raise ValueError(f"the tokens from the first logits row on ({submission.tail_len}) exceed one batch "
                         f"of {n_batch}")
    if len(submission.rows) > n_outputs:
        raise ValueError(f"{len(submission.rows)} logits rows asked; one pass holds at most {n_outputs}")


def plan_pass(pending: Sequence[Submission], n_batch: int, n_outputs: int, prefill_chunk: int) -> list[Slice]:
    """The slices of the next pass (in batch order), within ``n_batch`` tokens and ``n_outputs`` logits rows.

    Tail-only submissions first, in arrival order; then heads in chunks. A head
    is cut to ``prefill_chunk`` tokens per pass when any tail-only submission is
    waiting (someone is decoding), else it may fill the batch. A head that ends
    in this pass takes its tail along if that fits too. The caller advances
    ``done`` by the slices' lengths once the pass has run.
    """
    tokens_left, rows_left = n_batch, n_outputs
    decoding = [s for s in pending if s.head_left == 0]
    prefilling = [s for s in pending if s.head_left > 0]
    chunk = prefill_chunk if decoding else n_batch
    plan: list[Slice] = []
    for s in sorted(decoding, key=lambda s: s.order):
        if s.tail_len <= tokens_left and len(s.rows) <= rows_left:
            plan.append(Slice(s, s.done, len(s.tokens), tuple(s.rows)))
            tokens_left -= s.tail_len
            rows_left -= len(s.rows)
    for s in sorted(prefilling, key=lambda s: s.order):
        take = min(s.head_left, chunk, tokens_left)
        if take <= 0:
            continue
        end = s.done + take
        if end == s.tail_start and s.tail_len <= tokens_left - take and len(s.rows) <= rows_left:
            plan.append(Slice(s, s.done, len(s.tokens), tuple(s.rows)))
            tokens_left -= take + s.tail_len
            rows_left -= len(s.rows)
        else:
            plan.append(Slice(s, s.done, end, ()))
            tokens_left -= take
    return plan
