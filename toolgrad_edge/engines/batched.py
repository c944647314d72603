"""The batched in-process engine: up to N requests decode together in one llama.cpp context.

``BatchedEngine`` is the in-process engine (engines/inprocess.py: model load,
tokens, the grammar engine's matchers, the prefix cache) with a
``MultiSession`` (engines/multi_session.py) whose unified KV cache holds N
request sequences and one for the shared tool prefix. Its ``concurrency`` is
N, so the server's queue runs N requests at once, each on its own thread
calling ``execute``.

Each request decodes with its own ``StepDecoder`` (decoding.py: its own
matcher, sample-then-check, forced tokens, prompt-lookup drafts), stop
test, budget and cancellation, on its own thread. Where a one-request
engine would run a forward pass, the request's sequence hands its tokens to
one scheduler thread and waits: the scheduler gathers what every active
sequence asks for, fills one pass (engines/scheduler.py: decode rows first,
prompts in chunks, logits only where read), runs it and hands each sequence
its logits rows. Requests join and leave between passes. Where a request's
grammar allows few tokens, it asks for their logits only; a pass in which
every sequence does so skips the output layer (MultiSession's narrow rows).

The tool prefix is evaluated once into its own sequence (or restored from the
prefix cache on disk) and each request's sequence starts as a copy of it
(``llama_memory_seq_cp``: shared cells, nothing evaluated again). Admission:
at most N requests hold a sequence; a request whose cells do not fit the
cache beside the others waits until they do. A request that is cancelled or
whose consumer goes away frees its sequence at once.

Not exact across neighbours: a request's logits come from passes whose size
and cell layout depend on what else is decoding, and llama.cpp's kernels
round differently by batch size, so its greedy tokens can differ from a
request alone at near-ties (docs/server.md measures how often).
"""

from __future__ import annotations

import codecs
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from ..decoding import MAX_DRAFT, PromptLookupDrafter, StepDecoder, TokenChooser
from ..errors import GenerationError, ModelLoadError
from ..prefix_cache import prefix_key
from ..results import Timings, Usage
from .base import EngineRequest, Generation
from .inprocess import OUTPUT_ROWS, InProcessEngine
from .multi_session import MultiSession
from .scheduler import Submission, check_fits, plan_pass

PREFILL_CHUNK = 64  # prompt tokens per pass while other sequences decode (a pass of 64 costs about 3 one-row passes)
# How long a pass waits for active sequences that have not yet asked for their next rows: at least GATHER_S, and up
# to half the last pass's time (a busy machine may leave a woken thread off the CPU for a while; a pass that leaves
# it out costs it a whole pass, and the sequences fall into turns that never merge again).
GATHER_S = 0.004
GATHER_SHARE = 0.5


class _Cancelled(Exception):
    """The request's should_stop said so while its rows waited for a pass."""


@dataclass(eq=False)
class _Ticket(Submission):
    """A submission and the request thread waiting for its logits."""

    should_stop: Callable[[], bool] | None = None
    narrow_ids: np.ndarray | None = field(default=None, repr=False)  # only these tokens' logits are read
    event: threading.Event = field(default_factory=threading.Event, repr=False)
    error: BaseException | None = None


class _SequenceView:
    """One request's sequence, as StepDecoder's session: each decode is a submission to the scheduler."""

    def __init__(self, engine: "BatchedEngine", seq: int, n_tokens: int, should_stop):
        self.engine = engine
        self.seq = seq
        self.n_tokens = n_tokens  # positions the sequence holds
        self.should_stop = should_stop

    def decode(self, tokens: Sequence[int], n_logits: int = 1) -> np.ndarray:
        n_logits = max(1, min(n_logits, len(tokens)))
        return self.decode_at(tokens, range(len(tokens) - n_logits, len(tokens)))

    def decode_at(self, tokens: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        return self._evaluate(tokens, rows)

    @property
    def narrow(self) -> bool:
        """Whether a step may ask for a few tokens' logits only (the session's output head is on)."""
        session = self.engine._session
        return session is not None and session.narrow

    def decode_narrow(self, tokens: Sequence[int], ids: np.ndarray) -> np.ndarray:
        """The logits of tokens ``ids`` after ``tokens``, from the output head (MultiSession's narrow rows:
        the pass skips the output layer when every sequence in it asks for few tokens)."""
        return self._evaluate(tokens, [len(tokens) - 1], np.asarray(ids, dtype=np.int64))

    def _evaluate(self, tokens: Sequence[int], rows: Sequence[int], narrow_ids: np.ndarray | None = None):
        """Hand ``tokens`` to the scheduler, wait for their pass, and advance the sequence past them."""
        tokens = [int(t) for t in tokens]
        logits = self.engine._submit(self.seq, tokens, self.n_tokens, [int(r) for r in rows], self.should_stop,
                                     narrow_ids=narrow_ids)
        self.n_tokens += len(tokens)
        return logits

    def rewind(self, n_keep: int) -> None:
        if n_keep < self.n_tokens:
            with self.engine._ctx_lock:
                self.engine._session.remove(self.seq, n_keep)
            self.n_tokens = n_keep

    def is_eog(self, token: int) -> bool:
        return self.engine._session.is_eog(token)


class BatchedEngine(InProcessEngine):
    """The in-process engine serving up to ``parallel`` requests at once in one context.

    ``n_ctx`` is the context of one request; the KV cache is planned for
    ``parallel`` of them (with n_ctx="auto", the longest that fits the RAM,
    divided among them). A draft model is not supported here (one draft
    context per sequence would be needed); prompt lookup and jump-forward are.
    """

    def __init__(self, model=None, parallel: int = 2, n_ctx: int | str | None = None, draft_model=None,
                 prefill_chunk: int = PREFILL_CHUNK, **options):
        if int(parallel) < 2:
            raise ModelLoadError(f"the batched engine serves at least 2 requests at once, got parallel={parallel};"
                                 " use the in-process engine (--parallel 1) for one.")
        if draft_model is not None:
            raise ModelLoadError("a draft model is not supported with --parallel above 1 (each sequence would "
                                 "need its own draft context); drop --draft-model or use --parallel 1.")
        self.parallel = int(parallel)
        self.prefix_seq = self.parallel  # sequence ids 0..N-1 serve requests; N holds the shared tool prefix
        self.output_rows = max(OUTPUT_ROWS, 4 * self.parallel)
        self.context_cap = self.context_cap * self.parallel
        self.prefill_chunk = int(prefill_chunk)
        asked = None if n_ctx in (None, "auto") else int(n_ctx)
        self._cond = threading.Condition()
        self._ctx_lock = threading.Lock()
        self._thread = None
        self._closing = False
        super().__init__(model, n_ctx=asked * self.parallel if asked else None, **options)
        self.kv_cells = self.n_ctx  # the unified cache, all sequences together
        self.n_ctx = asked or max(64, self.kv_cells // self.parallel)
        self.context_note = f" per request ({self.parallel} requests share {self.kv_cells})"
        self._cache_settings += f";unified;seqs={self.parallel + 1}"
        self._pending: list[_Ticket] = []
        self._order = itertools.count()
        self._active: set[int] = set()  # request sequences inside their decode loop (a pass waits for them)
        self._free = list(range(self.parallel))
        self._reserved = 0  # cells promised to admitted requests
        self._prefix_lock = threading.Lock()
        self._prefix_tokens: list[int] | None = None  # what the prefix sequence holds
        self.prefix_evaluations = 0  # times a tool prefix was evaluated (not copied or restored)
        self.prefix_copies = 0
        self._thread = threading.Thread(target=self._run_passes, name="toolgrad-edge-batch", daemon=True)
        self._thread.start()

    def _open_session(self, model_path, **options) -> MultiSession:
        return MultiSession(model_path, n_seq_max=self.parallel + 1, **options)

    # -- the engine's facts ------------------------------------------------------------
    @property
    def concurrency(self) -> int:
        return self.parallel

    @property
    def session(self):
        raise GenerationError("the batched engine shares one context among several sequences and has no "
                              "single-sequence session; measure with --parallel 1.")

    @property
    def stats(self) -> dict:
        """Counters for tests and benchmarks: tokens evaluated, passes, prefix evaluations and copies."""
        session = self._require_open()
        sizes = session.pass_sizes
        return {"evaluated_tokens": session.evaluated_tokens, "forward_passes": session.forward_passes,
                "hidden_passes": session.hidden_passes, "head_check": session.head_check,
                "mean_tokens_per_pass": (sum(sizes) / len(sizes)) if sizes else None,
                "prefix_evaluations": self.prefix_evaluations, "prefix_copies": self.prefix_copies}

    def clear_kv_cache(self) -> None:
        with self._prefix_lock, self._ctx_lock:
            self._require_open().remove(self.prefix_seq)
            self._prefix_tokens = None

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._ctx_lock:
            super().close()

    # -- the scheduler thread --------------------------------------------------------------
    def _submit(self, seq: int, tokens: list[int], pos0: int, rows: list[int], should_stop,
                narrow_ids: np.ndarray | None = None) -> np.ndarray:
        """Have ``tokens`` evaluated on sequence ``seq`` at ``pos0``...; wait; return the logits at ``rows``
        (with ``narrow_ids``: the logits of those tokens only, at the one row)."""
        ticket = _Ticket(seq=seq, tokens=tokens, pos0=pos0, rows=rows, order=next(self._order),
                         should_stop=should_stop, narrow_ids=narrow_ids)
        try:
            check_fits(ticket, self._session.n_batch, self._session.n_outputs)
        except ValueError as e:
            raise GenerationError(f"sequence {seq}: {e}.") from None
        with self._cond:
            if self._closing:
                raise GenerationError("this ToolRuntime was closed during the request.")
            self._pending.append(ticket)
            self._cond.notify_all()
        ticket.event.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def _run_passes(self) -> None:
        session = self._session
        last_pass_s = 0.0
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    for ticket in self._pending:
                        self._finish(ticket, error=GenerationError("this ToolRuntime was closed during the "
                                                                   "request."))
                    return
                # Give the sequences still choosing their next token a moment to join this pass.
                deadline = time.monotonic() + max(GATHER_S, GATHER_SHARE * last_pass_s)
                while not self._active <= {t.seq for t in self._pending} and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                for ticket in list(self._pending):
                    if ticket.should_stop is not None and ticket.should_stop():
                        self._finish(ticket, error=_Cancelled())
                plan = plan_pass(self._pending, session.n_batch, session.n_outputs, self.prefill_chunk)
            if not plan:
                continue
            started = time.monotonic()
            try:
                narrow = {k: part.submission.narrow_ids for k, part in enumerate(plan)
                          if part.finishes and part.submission.narrow_ids is not None}
                with self._ctx_lock:
                    out = session.run(plan, narrow)
                last_pass_s = time.monotonic() - started
            except BaseException as e:  # noqa: BLE001 (handed to the requests in the pass)
                with self._cond:
                    for part in plan:
                        self._finish(part.submission, error=e)
                continue
            with self._cond:
                for k, part in enumerate(plan):
                    ticket = part.submission
                    ticket.done = part.end
                    if part.finishes:
                        ticket.result = out[k]
                        self._finish(ticket)

    def _finish(self, ticket: _Ticket, error: BaseException | None = None) -> None:
        """Take a ticket out of the queue and wake its request (called under the condition)."""
        if ticket in self._pending:
            self._pending.remove(ticket)
        ticket.error = error
        ticket.event.set()

    # -- admission and the shared prefix ----------------------------------------------------------
    def _admit(self, need: int, should_stop) -> int:
        """A free sequence id once one is free and ``need`` cells fit beside the admitted requests."""
        with self._cond:
            while True:
                if self._closing or self._session is None:
                    raise GenerationError("this ToolRuntime is closed.")
                room = self.kv_cells - len(self._prefix_tokens or ()) - self._reserved
                if self._free and need <= room:
                    self._reserved += need
                    return self._free.pop(0)
                if should_stop is not None and should_stop():
                    raise _Cancelled()
                self._cond.wait(0.05)

    def _release(self, seq: int, need: int) -> None:
        with self._cond:
            self._active.discard(seq)
        with self._ctx_lock:
            if self._session is not None:
                self._session.remove(seq)
        with self._cond:
            self._free.append(seq)
            self._reserved -= need
            self._cond.notify_all()

    def _share_prefix(self, prefix: list[int], seq: int, should_stop) -> int:
        """Start ``seq`` as a copy of the evaluated tool prefix; return the prefix tokens reused (not evaluated)."""
        if not prefix:
            return 0
        session = self._session
        reused = len(prefix)
        with self._prefix_lock:
            if self._prefix_tokens != prefix:
                self._prefix_tokens = None
                key = prefix_key(self._model_id, prefix, self._cache_settings)
                state = self.prefix_cache.get(key)
                loaded = False
                if state is not None:
                    with self._ctx_lock:
                        loaded = session.load_sequence(state, self.prefix_seq)
                    if not loaded:
                        self.prefix_cache.discard(key)
                if not loaded:
                    reused = 0
                    with self._ctx_lock:
                        session.remove(self.prefix_seq)
                    self._submit(self.prefix_seq, prefix, 0, [len(prefix) - 1], should_stop)
                    self.prefix_evaluations += 1
                    # Saved and loaded back, as LlamaSession.evaluate_prefix does: an evaluated and a restored
                    # prefix then leave the same cell layout, so the first request decodes as later ones do.
                    with self._ctx_lock:
                        state = session.save_sequence(self.prefix_seq)
                        if not state or not session.load_sequence(state, self.prefix_seq):
                            raise GenerationError(f"llama.cpp could not restore the {len(prefix)}-token tool "
                                                  f"prefix it had just saved ({len(state)} bytes).")
                    if self.prefix_cache.enabled:
                        self.prefix_cache.put(key, state)
                self._prefix_tokens = list(prefix)
            with self._ctx_lock:
                session.copy_sequence(self.prefix_seq, seq, len(prefix))
            self.prefix_copies += 1
        return reused

    # -- one request --------------------------------------------------------------------
    def execute(self, request: EngineRequest) -> Iterator[str | Generation]:
        self._require_open()
        max_tokens, should_stop = request.max_tokens, request.should_stop
        speculative = self.speculative if request.speculative is None else request.speculative
        t0 = time.perf_counter()
        prefix, prompt = self._request_tokens(request)
        need = len(prompt) + max_tokens + MAX_DRAFT + 1
        try:
            seq = self._admit(need, should_stop)
        except _Cancelled:
            yield self._cancelled(prompt, t0)
            return
        gate = None
        finish, text, generated, reused, ttft, decoder = "cancelled", "", [], 0, 0.0, None
        try:
            try:
                reused = self._share_prefix(prefix, seq, should_stop)
                with self._cond:
                    self._active.add(seq)
                view = _SequenceView(self, seq, len(prefix), should_stop)
                rest = prompt[len(prefix):]
                if not rest:  # nothing after the prefix: evaluate its last token again for the logits
                    view.rewind(len(prompt) - 1)
                    rest = prompt[-1:]
                logits = view.decode(rest, 1)[0]
                if request.grammar:
                    gate = self._matcher(request.grammar, request.forced_text)
                ttft = time.perf_counter() - t0
                decoder = StepDecoder(view, TokenChooser(request.params), gate, logits, list(prompt),
                                      jump_forward=speculative and self.fast_forward,
                                      drafter=PromptLookupDrafter(start=len(prefix)) if speculative else None,
                                      narrow=speculative and view.narrow)
                finish, text, generated = yield from self._decode(decoder, request, view)
            except _Cancelled:
                finish = "cancelled"
        finally:
            if gate is not None:
                gate.close()
            self._release(seq, need)
        t_end = time.perf_counter()
        stats = decoder.stats if decoder is not None else None
        if stats is not None and gate is not None:
            stats.full_masks = gate.full_masks
        yield Generation(
            text=text, finish=finish, tokens=generated,
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=len(generated), cached_tokens=reused),
            timings=Timings(ttft_s=ttft, decode_s=t_end - t0 - ttft, total_s=t_end - t0),
            stats={**(stats.to_dict(len(generated)) if stats is not None else {}), "speculative": bool(speculative),
                   "grammar_engine": self.grammar_engine if request.grammar else None,
                   "parallel": self.parallel})

    def _decode(self, decoder: StepDecoder, request: EngineRequest, view: _SequenceView):
        """Step one request to its end, yielding text pieces; return (finish, text, generated tokens).

        The stop test, budget and cancellation are this request's own; between
        steps its sequence waits for nothing but its own next pass.
        """
        session, stops, max_tokens = self._session, request.stop, request.max_tokens
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, emitted, generated, finish = "", 0, [], "length"
        while len(generated) < max_tokens:
            if request.should_stop is not None and request.should_stop():
                finish = "cancelled"
                break
            if self._session is None:
                raise GenerationError("this ToolRuntime was closed during the request.")
            tokens = decoder.step(max_tokens - len(generated))
            generated += tokens
            text += "".join(utf8.decode(session.piece(t)) for t in tokens)
            if decoder.done:
                finish = "stop"
            cut = stops.find(text, emitted)
            if cut is not None:
                text = text[:cut]
                if len(text) > emitted:
                    yield text[emitted:]
                return "stop", text, generated
            safe = len(text) - stops.hold(text)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if decoder.done:
                break
        text += utf8.decode(b"", final=True)
        if len(text) > emitted:
            yield text[emitted:]
        return finish, text, generated

    def _cancelled(self, prompt: list[int], t0: float) -> Generation:
        total = time.perf_counter() - t0
        return Generation(text="", finish="cancelled", usage=Usage(prompt_tokens=len(prompt)),
                          timings=Timings(ttft_s=total, decode_s=0.0, total_s=total),
                          stats={"parallel": self.parallel})


def default_parallel(info, plan) -> tuple[int, str]:
    """serve's ``--parallel auto`` for a GGUF (``info``, gguf_info) under the one-request engine's plan
    (``InProcessEngine.plan``: threads, context, RAM), and why. ``open_batched``, ``doctor`` and ``info``
    all ask this one function."""
    from ..gguf_info import model_shape
    from ..hardware import choose_parallel

    return choose_parallel(model_shape(info), plan.threads, plan.context, plan.ram_available)


def open_batched(model=None, parallel: int | str = "auto", **options) -> InProcessEngine:
    """The in-process engine for ``parallel`` requests at once: "auto" chooses from this machine
    (``default_parallel``); 1 is the one-request engine, unchanged. ``engine.parallel_reason`` says why."""
    if parallel == "auto":
        from ..gguf_info import read_gguf_info
        from ..model_resolution import resolve_gpu_layers, resolve_model

        info = read_gguf_info(resolve_model(model))
        plan = InProcessEngine.plan(info, n_gpu_layers=resolve_gpu_layers(options.get("n_gpu_layers", "auto")),
                                    n_threads=options.get("n_threads"), n_ctx=options.get("n_ctx"),
                                    kv_type=options.get("kv_type", "auto"), swa_full=options.get("swa_full", "auto"))
        n, why = default_parallel(info, plan)
    else:
        try:
            n = int(parallel)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise ModelLoadError(f"parallel must be 'auto' or a whole number of requests >= 1, got {parallel!r}.")
        why = "as asked"
    engine = BatchedEngine(model, parallel=n, **options) if n > 1 else InProcessEngine(model, **options)
    engine.parallel_reason = why
    return engine
