"""Gather the images of concurrent requests into one model call (micro-batching).

Each request thread hands its items to :meth:`MicroBatcher.submit` and waits; one worker thread takes the first
waiting request with every other request already waiting (up to ``max_batch`` items), runs the model once on all of
them and hands each request its own results. Requests that arrive while the model runs wait for the next call, so
under load the batches grow by themselves and an idle server answers at once; ``max_wait`` > 0 also holds a call
back that long for more requests. The model is only ever called from that one
thread, so a framework that is not thread-safe is safe here, and N concurrent requests cost fewer than N calls.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

DEFAULT_MAX_WAIT = 0.0
"""Seconds the first request of a batch waits for others beyond those already waiting (0: none; measured in
benchmarks/serve_load.py, waiting only added latency: requests gather while the previous call runs)."""
DEFAULT_MAX_BATCH = 32
"""Most items in one model call."""


@dataclass
class _Request(Generic[In, Out]):
    items: Sequence[In]
    done: Future[list[Out]] = field(default_factory=Future)


class MicroBatcher(Generic[In, Out]):
    """Runs ``run`` (items in, one result per item out, same order) on the items of concurrent callers together.

    ``calls`` counts the calls of ``run`` and ``items`` the items passed to it: fewer calls than requests means
    requests were batched.
    """

    def __init__(self, run: Callable[[list[In]], list[Out]], max_wait: float = DEFAULT_MAX_WAIT,
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_wait < 0 or max_batch < 1:
            raise ValueError(f"max_wait={max_wait} must be >= 0 and max_batch={max_batch} >= 1")
        self._run, self.max_wait, self.max_batch = run, max_wait, max_batch
        self._queue: queue.Queue[_Request[In, Out] | None] = queue.Queue()
        self.calls = 0
        self.items = 0
        self._worker = threading.Thread(target=self._work, name="deepgalaxy-batcher", daemon=True)
        self._worker.start()

    def submit(self, items: Sequence[In]) -> list[Out]:
        """Results for ``items``, computed with whatever other requests arrive meanwhile; raises what ``run`` raised."""
        if not self._worker.is_alive():
            raise RuntimeError("the batcher is closed")
        request: _Request[In, Out] = _Request(list(items))
        self._queue.put(request)
        return request.done.result()

    def close(self) -> None:
        """Stop the worker after the requests already queued."""
        self._queue.put(None)
        self._worker.join()

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, count, stop = [first], len(first.items), False
            deadline = time.monotonic() + self.max_wait
            while count < self.max_batch:
                try:
                    left = deadline - time.monotonic()
                    more = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
                count += len(more.items)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[_Request[In, Out]]) -> None:
        items = [item for request in batch for item in request.items]
        try:
            self.calls += 1
            self.items += len(items)
            results = self._run(items)
            if len(results) != len(items):
                raise RuntimeError(f"the batched function gave {len(results)} results for {len(items)} items")
        except Exception as exc:  # every waiting request gets the failure, the worker keeps serving
            for request in batch:
                request.done.set_exception(exc)
            return
        start = 0
        for request in batch:
            request.done.set_result(results[start : start + len(request.items)])
            start += len(request.items)


__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_WAIT", "MicroBatcher"]
