"""Batching under load: a bounded queue feeding ONE worker thread that owns the model.

Request handlers run on the server's event loop; the model is not thread-safe and a forward pass
is long, so every model call happens on one worker thread. :meth:`Scheduler.run` puts a job on a
bounded thread-safe queue (``queue.Queue``: the producer is the event loop, the consumer a plain
thread, which an ``asyncio.Queue`` cannot serve) and awaits an ``asyncio`` future that the worker
settles through ``loop.call_soon_threadsafe``. Each step the worker blocks for one job, takes up to
``max_batch - 1`` more that are already waiting, and answers them together
(:meth:`lens_safety.serving.safeguard.Safeguard.answer`); requests arriving during a step wait for
the next one.

* a full queue refuses at once (:class:`QueueFull`, HTTP 429), so memory and latency stay bounded;
* every job has a deadline: a job still queued at its deadline is never run, one whose step
  overruns it is answered with :class:`RequestTimeout` (HTTP 504) and its result dropped (a
  generation in progress is not interrupted);
* a handler that goes away (client disconnect) marks its job abandoned; the worker skips it;
* at shutdown, :meth:`Scheduler.abort` (when the grace period is over) answers every queued and
  running job with :class:`ShuttingDown` (HTTP 503) at once; :meth:`Scheduler.close` refuses new
  jobs, fails the queued ones the same way and waits for the step in progress to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lens_safety.serving.protocol import ChatRequest
from lens_safety.serving.safeguard import Answer


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs already."""


class ShuttingDown(Exception):
    """The server is stopping and takes no more work."""


class RequestTimeout(Exception):
    """The request was not answered within its deadline."""


@dataclass
class Job:
    request: ChatRequest
    future: asyncio.Future[Answer]
    loop: asyncio.AbstractEventLoop
    deadline: float
    abandoned: bool = False


def _settle(future: asyncio.Future[Answer], result: Answer | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class Scheduler:
    """Bounded queue + one worker thread (module docstring).

    Args:
        answer: answers a batch of requests, one result (or exception) per request, in order.
        max_batch: requests answered together in one step.
        max_queue: jobs waiting for a step, at most.
        timeout: seconds from submission to answer, at most.
    """

    def __init__(
        self,
        answer: Callable[[Sequence[ChatRequest]], list[Answer | Exception]],
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        timeout: float = 300.0,
    ) -> None:
        self._answer = answer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.timeout = timeout
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="lens-safety-worker", daemon=True)
        self.in_flight = 0
        self._current: list[Job] = []
        #: answered / failed: settled by the worker; dropped: finished after its client stopped waiting
        #: (timeout, shutdown); rejected: queue full; timed_out: answered 504
        self.counts = {"answered": 0, "failed": 0, "dropped": 0, "rejected": 0, "timed_out": 0, "steps": 0}

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread.is_alive()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def run(self, request: ChatRequest) -> Answer:
        """The answer to ``request``; raises QueueFull, ShuttingDown, RequestTimeout or the worker's error."""
        if self._closed:
            raise ShuttingDown()
        loop = asyncio.get_running_loop()
        job = Job(request, loop.create_future(), loop, time.monotonic() + self.timeout)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.counts["rejected"] += 1
            raise QueueFull() from None
        try:
            return await asyncio.wait_for(job.future, timeout=self.timeout)
        except TimeoutError:
            self.counts["timed_out"] += 1
            raise RequestTimeout() from None
        finally:
            job.abandoned = True

    def abort(self) -> None:
        """Refuse new jobs and answer every queued and running job with ShuttingDown now (the step
        in progress runs on; its results are dropped)."""
        self._closed = True
        for job in self._drain() + list(self._current):
            self._resolve(job, ShuttingDown())

    def _drain(self) -> list[Job]:
        jobs: list[Job] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def close(self, wait: float = 30.0) -> None:
        """Refuse new jobs, fail the queued ones (ShuttingDown), wait up to ``wait`` s for the step."""
        self._closed = True
        for job in self._drain():
            self._resolve(job, ShuttingDown())
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(wait)

    # ------------------------------------------------------------------ worker side
    def _resolve(self, job: Job, result: Answer | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody waits for this job
            job.loop.call_soon_threadsafe(_settle, job.future, result)

    def _take(self) -> list[Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # close() asked to stop: finish this step first
                self._queue.put(None)
                break
            batch.append(job)
        return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            now = time.monotonic()
            live = [job for job in batch if not job.abandoned and now < job.deadline]
            for job in batch:
                if job not in live:
                    self._resolve(job, RequestTimeout())
            if not live:
                continue
            self.in_flight, self._current = len(live), live
            results: Sequence[Answer | BaseException]
            try:
                results = self._answer([job.request for job in live])
            except Exception as exc:  # never lose the worker: every job gets the error
                results = [exc] * len(live)
            self.counts["steps"] += 1
            for job, result in zip(live, results, strict=True):
                failed = isinstance(result, BaseException)
                self.counts["dropped" if job.abandoned else "failed" if failed else "answered"] += 1
                self._resolve(job, result)
            self.in_flight, self._current = 0, []

    def stats(self) -> dict[str, Any]:
        return {"queued": self.queued, "in_flight": self.in_flight, **self.counts}
