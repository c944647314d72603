"""One model, one worker thread, a fair first-come queue in front of it.

A ``ToolRuntime`` is not thread-safe and a model decodes one request at a
time anyway, so a single worker thread owns the runtime and runs jobs in the
order they arrived, each to completion: no request's tokens interleave with
another's. A runtime that says it serves several requests at once (one over
llama-server, whose slots batch requests together: ``runtime.concurrency``)
gets that many workers, still taking jobs in arrival order. The event loop never blocks on the model; the worker hands each
job's output back to the loop through the job's ``asyncio.Queue``.

A full queue refuses new work at once (the server answers 429 with a
``Retry-After`` estimated from recent service times). A job whose client has
gone is dropped if it is still waiting, or stopped at its next token through
the runtime's ``should_stop`` hook if it is running. A stopped job's last
output (the runtime's final record, with finish reason ``cancelled``) still
comes back, so a stream cut by a shutdown ends properly. ``close()`` (on
SIGTERM) refuses new jobs, stops the running ones and ends the waiting ones
without waiting for anything; ``stop()`` also joins the workers.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from typing import Any, Callable, Iterable

log = logging.getLogger("toolgrad_edge.server")

# A job's work: given the runtime and a should_stop() poll, yield its outputs.
Work = Callable[[Any, Callable[[], bool]], Iterable[Any]]

ITEM, ERROR, DONE = "item", "error", "done"
# After a stop, how many more outputs a job's work may give before its final record (a runtime
# checks should_stop at every token, then hands back the rest of that token's events and its final
# record; one that ignores should_stop is cut off after this many).
FINAL_RECORD_ITEMS = 64


class QueueStopped(Exception):
    """The queue is closing: it takes no more jobs."""


class QueueFull(Exception):
    """No room for another request; try again after ``retry_after`` seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting = waiting
        self.retry_after = retry_after


class Job:
    """One request's work and the channel its events come back on."""

    def __init__(self, work: Work, loop: asyncio.AbstractEventLoop) -> None:
        self.work = work
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()
        self.finished = False  # set by the worker, under the queue's lock

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def should_stop(self) -> bool:
        """Polled by the runtime at every token."""
        return self._cancelled.is_set()

    def _cancel(self) -> None:
        self._cancelled.set()

    def _emit(self, kind: str, value: Any = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:
            pass  # the event loop is closed: the server is shutting down and nobody listens


class RequestQueue:
    """Runs jobs one at a time on a worker thread that owns the runtime."""

    def __init__(self, runtime: Any, max_queue: int, *, owns_runtime: bool = False) -> None:
        """``runtime`` is a runtime object, or a zero-argument factory called on the worker thread."""
        self._runtime_or_factory = runtime
        self._owns_runtime = owns_runtime or not hasattr(runtime, "call")
        self.runtime: Any = runtime if hasattr(runtime, "call") else None
        self.load_error: BaseException | None = None
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: set[Job] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.ready = threading.Event()
        self._service_s = 0.0  # moving average of one job's time, for Retry-After
        self.counts = {"served": 0, "failed": 0, "cancelled": 0, "rejected": 0}

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        self._start_worker(self._first_worker)

    def _start_worker(self, target) -> None:
        thread = threading.Thread(target=target, name=f"toolgrad-edge-worker-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def close(self) -> None:
        """Take no more jobs, stop the running ones at their next token and end the waiting ones; no waiting."""
        with self._cond:
            self._stopping = True
            pending = list(self._waiting)
            self._waiting.clear()
            for job in self._running:
                job._cancel()
            self._cond.notify_all()
        for job in pending:
            job._cancel()
            job._emit(DONE)

    def stop(self, timeout: float = 10.0) -> None:
        """close(), then wait up to ``timeout`` for the workers to end (the runtime is closed then, if owned)."""
        self.close()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- requests ---------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job at the back, or raise QueueFull."""
        with self._cond:
            if self._stopping:
                raise QueueStopped()
            if len(self._waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(len(self._waiting), self._retry_after())
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client has gone: drop the job if it waits, stop it at the next token if it runs."""
        with self._cond:
            if job.cancelled or job.finished:
                return
            job._cancel()
            try:
                self._waiting.remove(job)
            except ValueError:
                pass  # running or finished: should_stop() ends it
            else:
                self.counts["cancelled"] += 1

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "waiting": len(self._waiting),
                "running": len(self._running),
                "workers": len(self._threads),
                "max_queue": self.max_queue,
                **self.counts,
            }

    def _retry_after(self) -> int:
        # Everyone waiting has to be served first; a second is the least we say.
        per_job = self._service_s or 1.0
        return max(1, min(600, math.ceil(per_job * (len(self._waiting) + 1))))

    # -- worker thread ----------------------------------------------------

    def _first_worker(self) -> None:
        """Load the runtime (when given a factory), start any further workers, then serve; close it last."""
        if self.runtime is None:
            try:
                self.runtime = self._runtime_or_factory()
            except BaseException as exc:  # reported to every request and by /health
                self.load_error = exc
                log.error("could not load the model: %s", exc)
        extra = max(1, int(getattr(self.runtime, "concurrency", 1) or 1)) - 1 if self.load_error is None else 0
        for _ in range(extra):
            self._start_worker(self._serve)
        self.ready.set()
        try:
            self._serve()
        finally:
            for thread in self._threads[1:]:
                thread.join(10.0)
            if self._owns_runtime and self.runtime is not None and hasattr(self.runtime, "close"):
                self.runtime.close()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait(timeout=1.0)
                if self._stopping:
                    return
                job = self._waiting.popleft()
                self._running.add(job)
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running.discard(job)

    def _run(self, job: Job) -> None:
        if self.load_error is not None:
            job.finished = True
            job._emit(ERROR, self.load_error)
            return
        started = time.monotonic()
        outcome, last = "served", (DONE, None)
        try:
            outputs = iter(job.work(self.runtime, job.should_stop))
            held = None  # once stopped, only the last output (the final record) goes back
            after_stop = 0
            try:
                for item in outputs:
                    if not job.cancelled:
                        job._emit(ITEM, item)
                        continue
                    held = (item,)
                    after_stop += 1
                    if after_stop > FINAL_RECORD_ITEMS:
                        break  # a runtime that ignores should_stop still stops here
                if held is not None:
                    job._emit(ITEM, held[0])
            finally:
                close = getattr(outputs, "close", None)
                if close is not None:
                    close()
        except Exception as exc:
            outcome, last = "failed", (ERROR, exc)
        # Decide the outcome before the last event: once it is out, the
        # request handler may call cancel() on a job that is already done.
        if job.cancelled:
            outcome = "cancelled"
        elapsed = time.monotonic() - started
        with self._cond:
            job.finished = True
            self.counts[outcome] += 1
            self._service_s = elapsed if not self._service_s else 0.8 * self._service_s + 0.2 * elapsed
        job._emit(*last)
