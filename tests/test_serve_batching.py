"""The serve micro-batcher and its caches, without a server: concurrent requests share model calls with no idle
wait, every request gets its own results, a failure reaches every waiting request, and the LRU stays bounded."""

from __future__ import annotations

import threading
import time

import pytest

from deepgalaxy.runs.serve.batching import DEFAULT_MAX_WAIT, MicroBatcher
from deepgalaxy.runs.serve.service import LRU


def test_requests_that_arrive_while_the_model_runs_share_the_next_call() -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        calls.append(list(items))
        time.sleep(0.05)  # a model call: everything submitted meanwhile waits for the next one
        return [x * 10 for x in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(run)
    assert DEFAULT_MAX_WAIT == 0 and batcher.max_wait == 0
    start = threading.Barrier(8)
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        start.wait()
        results[i] = batcher.submit([i, i + 100])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    batcher.close()
    assert results == {i: [i * 10, (i + 100) * 10] for i in range(8)}
    assert batcher.items == 16 and batcher.calls == len(calls) <= 2, calls  # 8 requests, at most 2 model calls
    assert sorted(x for call in calls for x in call) == sorted([*range(8), *range(100, 108)])


def test_a_failing_call_fails_its_requests_and_the_batcher_keeps_serving() -> None:
    def run(items: list[int]) -> list[int]:
        if -1 in items:
            raise ValueError("bad item")
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(run)
    with pytest.raises(ValueError, match="bad item"):
        batcher.submit([-1])
    assert batcher.submit([3]) == [3]
    batcher.close()


def test_the_lru_keeps_the_newest_and_computes_each_value_once_while_kept() -> None:
    made: list[int] = []
    cache = LRU(2)

    def make(key: int) -> object:
        made.append(key)
        return object()

    first = cache.get(1, lambda: make(1))
    assert cache.get(1, lambda: make(1)) is first
    cache.get(2, lambda: make(2))
    cache.get(1, lambda: make(1))  # 1 is now the newest
    cache.get(3, lambda: make(3))  # evicts 2, the least recently used
    cache.get(1, lambda: make(1))
    cache.get(2, lambda: make(2))
    assert made == [1, 2, 3, 2]
