"""Adaptive micro-batching: concurrent requests share one collate + forward per model.

Why not BentoML's ``batchable`` API: it batches one HTTP endpoint whose input is itself a list,
while here single-structure HTTP requests, gRPC calls and batch items (possibly for several ions)
should all be merged; and the gRPC server is not a BentoML API. So the batcher sits in the
predictor, below both protocols.

How: one inference thread per process takes every graph queued so far (greedy), and waits up to
``max_wait`` for more only while other requests are still being parsed / converted to graphs
(``expect``/``arrived``); a lone request is therefore never delayed, and under load the batch grows
by itself while the previous one is computing. Items are grouped by model object, so a request
that started before a model swap is inferred by the model it started with.

One thread also means torch runs single-threaded with no contention (on a shared 2-core machine
extra intra-op threads made inference ~35x slower). Futures are ``concurrent.futures`` futures:
async callers wrap them with ``asyncio.wrap_future``, sync callers block on ``result()``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Runs one group of graphs through one model: returns (mean, std) arrays in volts.
InferFn = Callable[[Any, Sequence[Any]], tuple[np.ndarray, np.ndarray]]


@dataclass
class _Job:
    model: Any
    graph: Any
    future: Future[tuple[float, float]]


_STOP = object()


class Admission:
    """Bounds the work one process accepts: structures admitted and not yet answered.

    Why at admission and not at the batcher's queue: a request refused here costs nothing (no
    parse, no graph), and the count covers every stage a request waits in (the thread pool that
    parses, the inference queue, the forward pass). Beyond ``limit`` the caller sheds the request
    at once (HTTP 503 + Retry-After, gRPC RESOURCE_EXHAUSTED) instead of letting a burst queue up
    until clients time out. A request larger than the limit (a big ``/predict_batch``) is still
    admitted when nothing else is pending, so it is slow rather than impossible.
    """

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.pending = 0
        self._on_change = on_change
        self._lock = threading.Lock()

    def try_admit(self, n: int = 1) -> bool:
        if n <= 0:
            return True
        with self._lock:
            if self.pending and self.pending + n > self.limit:
                return False
            self.pending += n
            pending = self.pending
        self._changed(pending)
        return True

    def release(self, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            self.pending = max(0, self.pending - n)
            pending = self.pending
        self._changed(pending)

    @property
    def full(self) -> bool:
        """No single structure would be admitted now (a cheap pre-check before reading a body)."""
        return self.pending >= self.limit

    def _changed(self, pending: int) -> None:
        if self._on_change is not None:
            try:
                self._on_change(pending)
            except Exception:
                logger.exception("admission callback failed")


class MicroBatcher:
    """Thread-safe queue of (model, graph) jobs served by one background inference thread."""

    def __init__(
        self,
        infer: InferFn,
        max_batch: int = 64,
        max_wait_s: float = 0.002,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._infer = infer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._preparing = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.items = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> MicroBatcher:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="voltage-inference", daemon=True
                )
                self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout)
        self._thread = None

    # ------------------------------------------------------------------ producers
    def expect(self) -> None:
        """A request started preparing: the worker may wait a little for its graph."""
        with self._lock:
            self._preparing += 1

    def arrived(self) -> None:
        """The request's preparation ended (its graph is submitted, or it failed)."""
        with self._lock:
            self._preparing = max(0, self._preparing - 1)

    def submit(self, model: Any, graph: Any) -> Future[tuple[float, float]]:
        """Queue one graph for ``model``; the future gets (voltage, uncertainty)."""
        if self._thread is None:
            self.start()
        fut: Future[tuple[float, float]] = Future()
        self._queue.put(_Job(model, graph, fut))
        return fut

    # ------------------------------------------------------------------ worker
    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, stop = [first], False
        deadline = time.perf_counter() + self.max_wait_s
        while len(jobs) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                with self._lock:
                    waiting = self._preparing > 0
                remaining = deadline - time.perf_counter()
                if not waiting or remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=min(remaining, 0.0005))
                except queue.Empty:
                    continue
            if item is _STOP:
                stop = True
                break
            jobs.append(item)
        return jobs, stop

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            jobs, stop = self._gather(item)
            self._process(jobs)
            if stop:
                return

    def _process(self, jobs: list[_Job]) -> None:
        groups: dict[int, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(id(job.model), []).append(job)
        for group in groups.values():
            live = [j for j in group if j.future.set_running_or_notify_cancel()]
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                mean, std = self._infer(live[0].model, [j.graph for j in live])
            except BaseException as exc:  # delivered to each caller, who logs and counts it
                for j in live:
                    j.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - t0
            self.batches += 1
            self.items += len(live)
            if self._on_batch is not None:
                try:
                    self._on_batch(len(live), elapsed)
                except Exception:
                    logger.exception("batch callback failed")
            for j, m, s in zip(live, mean, std, strict=True):
                j.future.set_result((float(m), float(s)))
