"""Several stores in one training: how many rows of every batch each store gives, and the mixed batches.

The first store leads: an epoch is one pass over its training rows, in batches of its rows per batch. Every other
store cycles through its own training rows (a fresh shuffle on every pass), so each batch holds every store's
share. A batch's position (epoch, step) alone fixes the rows of every store, so a run resumed at any step draws
exactly the batches an uninterrupted one would; each rank draws from its own shard of every store.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.selection import Subset


def batch_rows(shares: Sequence[float | None], batch_size: int, names: Sequence[str]) -> list[int]:
    """Rows of a ``batch_size`` batch that each store gives.

    A store with a share gives that fraction of the batch (rounded); the stores without one divide the rest of the
    batch equally (the first ones get the remainder). Every store gives at least one row.
    """
    rows = [round(s * batch_size) if s is not None else 0 for s in shares]
    free = [i for i, s in enumerate(shares) if s is None]
    left = batch_size - sum(rows)
    if free:
        for k, i in enumerate(free):
            rows[i] = max(0, left) // len(free) + (1 if k < max(0, left) % len(free) else 0)
    else:
        rows[int(np.argmax(rows))] += left  # rounding: the largest share absorbs the difference
    for i, n in enumerate(rows):
        if n < 1:
            share = f"share {shares[i]:g}" if shares[i] is not None else "the rest of the batch"
            raise DatasetError(
                f"store {names[i]!r} gets no row of a batch of {batch_size} ({share}); give it a larger share "
                f"(--data PATH:SHARE) or use a larger train.batch_size"
            )
    return rows


@dataclass(frozen=True)
class StorePart:
    """One store's part of this rank's batches: its training shard and its rows per batch."""

    name: str
    train: Subset
    rows: int


def mixed_batches(parts: Sequence[StorePart], epoch: int, steps: int, seed: int,
                  start_batch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches ``start_batch .. steps-1`` of ``epoch``: every store's rows, concatenated in store order."""
    lead, *others = parts
    streams = [lead.train.batches(lead.rows, epoch=epoch, seed=seed, shuffle=True, drop_last=True,
                                  start_batch=start_batch)]
    streams += [_cycle(p.train, p.rows, seed, epoch * steps + start_batch) for p in others]
    try:
        for _ in range(start_batch, steps):
            pieces = [next(stream) for stream in streams]
            if len(pieces) == 1:
                yield pieces[0]
            else:
                yield np.concatenate([x for x, _ in pieces]), np.concatenate([y for _, y in pieces])
    finally:
        for stream in streams:
            close = getattr(stream, "close", None)
            if close is not None:
                close()


def _cycle(train: Subset, rows: int, seed: int, first: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batch ``first`` onwards of an endless walk through ``train``: pass ``p`` is shuffled as epoch ``p``."""
    per_pass = train.num_batches(rows, drop_last=True)
    if per_pass < 1:
        raise DatasetError(f"{train.path}: {train.name} has {len(train)} images, less than its {rows} rows of a "
                           "batch; give the store a smaller share or use fewer workers")
    pass_index, start = divmod(first, per_pass)
    while True:
        batches = train.batches(rows, epoch=pass_index, seed=seed, shuffle=True, drop_last=True, start_batch=start)
        try:
            yield from batches
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        pass_index, start = pass_index + 1, 0
