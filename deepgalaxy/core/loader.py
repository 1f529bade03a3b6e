"""The batch loader: epoch order, prefetched numpy batches and the in-memory copy of a selection's images.

Batches are numpy arrays (``float32`` NHWC in ``[0, 1]``, ``int64`` labels); framework adapters live in the
framework plugins. While a selection streams from the store, decoding runs in a background thread that works on whole
chunks, so the training step does not wait on decompression. A selection's decoded images are kept in memory while
its first epoch streams (:class:`ResidentImages`), within a :class:`CacheBudget` shared by every selection of one
opened store (default 1 GiB per process), so from the second epoch on a shard that fits is served from RAM, each
batch gathered and converted in the consumer's thread (no hand-off to pay for).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from deepgalaxy.core.contract import with_targets
from deepgalaxy.core.store import StoreReader

DEFAULT_CACHE_BYTES = 1 << 30
_WINDOW_BYTES = 64 << 20


def seed_key(value: int) -> int:
    """A user's seed (any int) as a non-negative entropy word for :func:`numpy.random.default_rng`."""
    return int(value) % (1 << 63)


class CacheBudget:
    """Bytes of decoded images that the selections of one opened store may keep in RAM together."""

    def __init__(self, nbytes: int) -> None:
        self._left = nbytes
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        """Claim ``nbytes`` of the budget; False (nothing claimed) when less is left."""
        with self._lock:
            if nbytes > self._left:
                return False
            self._left -= nbytes
            return True


class ResidentImages:
    """A selection's decoded images in RAM, filled chunk by chunk while its first epoch streams."""

    def __init__(self, store: StoreReader, indices: np.ndarray) -> None:
        self.store = store
        self.indices = indices
        self.images = np.empty((len(indices), *store.image_shape), dtype=np.uint8)
        self.filled = np.zeros(len(indices), dtype=bool)
        self.complete = False
        self._position: np.ndarray | None = None  # row - indices[0] -> position in images, built on first use

    @classmethod
    def reserve(cls, store: StoreReader, indices: np.ndarray, budget: CacheBudget) -> ResidentImages | None:
        """Room for the images at sorted global ``indices``, or None when the budget cannot hold them."""
        if not budget.take(len(indices) * int(np.prod(store.image_shape))):
            return None
        return cls(store, indices)

    def keep(self, chunk: int, data: np.ndarray) -> None:
        """Copy the selection's rows of a decoded chunk."""
        if self.complete:
            return
        start, stop = self.store.chunk_range(chunk)
        lo, hi = np.searchsorted(self.indices, [start, stop])
        if hi > lo and not self.filled[lo:hi].all():
            self.images[lo:hi] = data[self.indices[lo:hi] - start]
            self.filled[lo:hi] = True
            self.complete = bool(self.filled.all())

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where global ``rows`` (all of them in ``indices``) sit in ``images``: one gather through a map built once,
        not a binary search per row every epoch."""
        first = int(self.indices[0])  # a selection is never empty when it batches
        if self._position is None:
            self._position = np.zeros(int(self.indices[-1]) - first + 1, dtype=np.intp)
            self._position[self.indices - first] = np.arange(len(self.indices))
        position: np.ndarray = self._position[rows - first]
        return position


def epoch_order(store: StoreReader, indices: np.ndarray, epoch: int = 0, seed: int = 0,
                shuffle: bool = True) -> np.ndarray:
    """Global ``indices`` (sorted) in the order one epoch visits them.

    Shuffled (the default): chunks in a random order, cut into windows of a few chunks (about 64 MiB), images
    shuffled within each window. A pure function of (indices, seed, epoch): identical in every process.
    """
    if not shuffle:
        return indices.copy()
    rng = np.random.default_rng([seed_key(seed), seed_key(epoch), 0xE90C])
    groups = store.chunk_groups(indices)
    chunk_bytes = store.chunk_len * int(np.prod(store.image_shape))
    window = int(np.clip(_WINDOW_BYTES // max(chunk_bytes, 1), 2, 16))
    perm = rng.permutation(len(groups))
    parts = []
    for w in range(0, len(perm), window):
        members = np.concatenate([groups[g] for g in perm[w : w + window]])
        parts.append(members[rng.permutation(len(members))])
    return np.concatenate(parts) if parts else indices.copy()


def epoch_batches(
    store: StoreReader, order: np.ndarray, batch_size: int, prefetch: int, resident: ResidentImages | None, name: str,
    targets: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(images float32 (n, H, W, C) in [0, 1], labels int64 (n,))`` for the global rows ``order``, ``batch_size``
    at a time (the last one shorter when ``order`` is): from ``resident`` once it holds every image (made when asked
    for), else decoded from the store ``prefetch`` batches ahead in background threads (filling ``resident``).
    With property ``targets`` ``(rows of the store, K)`` the labels are records of label and targets."""
    labels = row_labels(store, order, targets)
    if resident is not None and resident.complete:
        return _resident_batches(resident, order, labels, batch_size)
    return _prefetched_batches(store, order, labels, batch_size, prefetch, resident, name)


def row_labels(store: StoreReader, rows: np.ndarray, targets: np.ndarray | None) -> np.ndarray:
    """The labels of ``rows``: int64, or records with their property targets
    (:func:`deepgalaxy.core.contract.with_targets`)."""
    labels = store.labels[rows].astype(np.int64)
    return labels if targets is None else with_targets(labels, targets[rows])


def _resident_batches(
    resident: ResidentImages, order: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches from a selection's images already decoded in RAM, made in the consumer's thread when asked for.

    Nothing is left to hide here (no decompression), and a background thread's hand-off per batch (queue, wake-up,
    GIL) cost 10-25% of the in-memory rate in ``benchmarks/data.py`` and competes with the framework's own threads.
    """
    pos = resident.positions(order)
    for start in range(0, len(order), batch_size):
        sl = slice(start, start + batch_size)
        yield _unit_float(resident.images[pos[sl]]), labels[sl]


def _unit_float(raw: np.ndarray) -> np.ndarray:
    """uint8 images as float32 in [0, 1] (one conversion, scaled in place)."""
    images = raw.astype(np.float32)
    images *= np.float32(1.0 / 255.0)
    return images


def _offer(out: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put ``item`` on ``out``, waiting while it is full; False if the consumer stopped first."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _prefetched_batches(
    ds: StoreReader, order: np.ndarray, labels: np.ndarray, batch_size: int, prefetch: int,
    resident: ResidentImages | None, name: str,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Two background threads: one decodes chunks in order of first use (keeping the selection's rows in
    ``resident``), one gathers and converts batches."""
    n_batches = math.ceil(len(order) / batch_size)
    chunk_of = order // ds.chunk_len
    batch_of = np.arange(len(order)) // batch_size
    # chunks in order of first use, and the batch of each chunk's first and last use
    uniq, first_pos = np.unique(chunk_of, return_index=True)
    last_pos = len(chunk_of) - 1 - np.unique(chunk_of[::-1], return_index=True)[1]
    seq = np.argsort(first_pos, kind="stable")
    sequence = uniq[seq]
    first_b, last_b = batch_of[first_pos[seq]], batch_of[last_pos[seq]]
    # most chunks alive at once (+2 read ahead): the decoder never blocks the batch it is needed for
    alive = np.zeros(n_batches + 1, dtype=np.int64)
    np.add.at(alive, first_b, 1)
    np.add.at(alive, last_b + 1, -1)
    max_alive = int(np.cumsum(alive).max()) + 2
    last_use = dict(zip(sequence.tolist(), last_b.tolist(), strict=True))

    decoded: dict[int, np.ndarray] = {}
    cond = threading.Condition()
    stop = threading.Event()
    failure: list[BaseException] = []
    out: queue.Queue[Any] = queue.Queue(maxsize=prefetch)

    def decoder() -> None:
        try:
            for chunk in sequence.tolist():
                with cond:
                    while len(decoded) >= max_alive and not stop.is_set():
                        cond.wait(0.1)
                if stop.is_set():
                    return
                data = ds.read_chunk(chunk)
                if resident is not None:
                    resident.keep(chunk, data)
                with cond:
                    decoded[chunk] = data
                    cond.notify_all()
        except BaseException as exc:
            with cond:
                failure.append(exc)
                cond.notify_all()

    def batcher() -> None:
        try:
            for b in range(n_batches):
                sel = order[b * batch_size : (b + 1) * batch_size]
                chunks = chunk_of[b * batch_size : (b + 1) * batch_size]
                need = np.unique(chunks).tolist()
                with cond:
                    while not failure and not stop.is_set() and any(c not in decoded for c in need):
                        cond.wait(0.1)
                    if failure:
                        raise failure[0]
                    if stop.is_set():
                        return
                    parts = {c: decoded[c] for c in need}
                raw = np.empty((len(sel), *ds.image_shape), dtype=np.uint8)
                for c in need:
                    where = np.flatnonzero(chunks == c)
                    raw[where] = parts[c][sel[where] - c * ds.chunk_len]
                item = (_unit_float(raw), labels[b * batch_size : (b + 1) * batch_size])
                with cond:
                    for c in need:
                        if last_use[c] == b:
                            decoded.pop(c, None)
                    cond.notify_all()
                if not _offer(out, item, stop):
                    return
            out.put(None)
        except BaseException as exc:
            out.put(exc)

    threads = [
        threading.Thread(target=decoder, name=f"deepgalaxy-decode[{name}]", daemon=True),
        threading.Thread(target=batcher, name=f"deepgalaxy-batch[{name}]", daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        yield from _consume(out)
    finally:
        stop.set()
        with cond:
            cond.notify_all()
        _drain(out)  # unblock a batcher waiting on a full queue
        for t in threads:
            t.join(timeout=5)


def _consume(out: queue.Queue[Any]) -> Iterator[Any]:
    """Yield what a producer thread puts until its ``None`` sentinel; re-raise an exception it put instead."""
    while True:
        item = out.get()
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _drain(out: queue.Queue[Any]) -> None:
    """Empty the queue, so a producer blocked in ``put`` gets to see the stop flag."""
    while True:
        try:
            out.get_nowait()
        except queue.Empty:
            return


__all__ = ["DEFAULT_CACHE_BYTES", "CacheBudget", "ResidentImages", "epoch_batches", "epoch_order", "seed_key"]
